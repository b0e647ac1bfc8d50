//! Model families as data: hyper-parameters and the name tables that map each dialect's tensor
//! names to canonical ones. Canonical names are HF's (`model.layers.{L}.self_attn.q_proj.weight`):
//! they keep every tensor separate, so each other dialect is a rename plus named transforms.

pub mod llama;
pub mod neva;
pub mod yaml;

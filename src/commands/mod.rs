//! One module per subcommand; each is a short function over library calls.

pub mod inspect;
pub mod synth;

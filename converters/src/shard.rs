//! Tensor-parallel sharding rules (being written).

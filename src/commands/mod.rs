//! One module per subcommand; each is a short function over library calls.

pub mod assemble;
pub mod bench;
pub mod bench_gpu;
pub mod convert;
pub mod diff;
pub mod evaluate;
pub mod generate;
pub mod inspect;
pub mod surgery;
pub mod synth;
pub mod train;
pub mod validate;

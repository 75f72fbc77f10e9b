//! Test support shared by lowbit's tests, benches, fuzz targets, the CLI's demo and bench, and `bench-peers`
//! (a crate, so nothing is included with `#[path]`): one deterministic RNG, synthetic LLM-like weights and
//! layers for any [`lowbit::Scheme`], scheme matrices, and the machine's memory-bandwidth probe.
//!
//! Agreement checks live in the library itself ([`lowbit::linear::Agreement`], with the stated bound of
//! [`lowbit::linear::QuantLinear::error_bound`]).

pub mod membw;
pub mod rng;
pub mod synthetic;

pub use rng::Rng;

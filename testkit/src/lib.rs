//! Test support shared by lowbit's tests, benches, fuzz targets, `bench-peers` and the `lowbit` CLI (a crate,
//! so nothing is included with `#[path]`): one deterministic RNG, synthetic LLM-like weights and layers for
//! any [`lowbit::Scheme`], scheme matrices, the machine's memory-bandwidth probe, and the implementation of
//! `lowbit demo` ([`demo`]) and `lowbit bench` ([`mod@bench`]), which the CLI only parses and dispatches.
//!
//! Agreement checks live in the library itself ([`lowbit::linear::Agreement`], with the stated bound of
//! [`lowbit::linear::QuantLinear::error_bound`]).

pub mod agreement;
pub mod bench;
pub mod compute;
pub mod console;
pub mod demo;
pub mod error;
pub mod gguf;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod membw;
pub mod model;
pub mod rng;
pub mod scratch;
pub mod stats;
pub mod synthetic;
pub mod timing;

pub use error::{Context, Error};
pub use rng::Rng;
pub use scratch::ScratchDir;

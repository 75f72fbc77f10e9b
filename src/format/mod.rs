//! Data-only format types: which format ([`Scheme`](scheme::Scheme)), and borrowed views of a quantized
//! layer that the reference and the kernels read. Nothing here runs a kernel or touches a file.

pub mod layer;
pub mod scheme;

//! Reading and writing quantized tensors in safetensors files.

pub mod bnb;

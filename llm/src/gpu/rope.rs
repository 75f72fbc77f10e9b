//! The RoPE cos / sin tables [`GpuOps::encode_rope`](super::GpuOps::encode_rope) reads: `[max_pos, half]`
//! each, `half = head_dim / 2`, uploaded once per model.

use super::buffers::storage_f32;
use crate::{Error, Result};
use lowbit::gpu::{wgpu, GpuContext};

/// cos and sin tables on the GPU: row `p` holds `cos(p·inv_freq_i)` / `sin(p·inv_freq_i)` for `i < half`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    /// `[max_pos, half]` f32 cosines.
    pub cos: wgpu::Buffer,
    /// `[max_pos, half]` f32 sines.
    pub sin: wgpu::Buffer,
    /// Rows of the tables: positions `0 .. max_pos`.
    pub max_pos: usize,
    /// Columns: `head_dim / 2`.
    pub half: usize,
}

impl RopeTable {
    /// Uploads tables the host computed (any convention: the shader only reads them). Errors
    /// ([`Error::Invalid`]) when `cos` or `sin` is not `max_pos · half` long or `half == 0`.
    pub fn from_slices(ctx: &GpuContext, cos: &[f32], sin: &[f32], max_pos: usize, half: usize) -> Result<RopeTable> {
        let want = max_pos.checked_mul(half).ok_or_else(|| Error::Invalid("rope table size overflows".into()))?;
        if half == 0 || cos.len() != want || sin.len() != want {
            return Err(Error::Invalid(format!(
                "rope tables: cos {} and sin {} values for max_pos {max_pos} x half {half} (half > 0)",
                cos.len(),
                sin.len()
            )));
        }
        Ok(RopeTable { cos: storage_f32(ctx, "rope cos", cos), sin: storage_f32(ctx, "rope sin", sin), max_pos, half })
    }

    /// The host tables of the plain (unscaled) Llama RoPE, computed in f64 and rounded once to f32:
    /// `inv_freq_i = theta^(−2i/head_dim)`, `angle = pos · inv_freq_i`. Returns `(cos, sin)`, each
    /// `[max_pos, head_dim / 2]`.
    pub fn llama_tables(theta: f64, head_dim: usize, max_pos: usize) -> (Vec<f32>, Vec<f32>) {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                let inv = theta.powf(-2.0 * i as f64 / head_dim as f64);
                let a = p as f64 * inv;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        (cos, sin)
    }
}

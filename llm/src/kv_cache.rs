//! [`KvCache`]: keys and values of every layer for positions `0..len()`, preallocated for `capacity`
//! positions so that decoding allocates nothing.

use crate::{Config, Error, Result};

/// Per layer, keys and values laid out `[kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// A cache for `capacity` positions of a model with `config`.
    pub fn new(config: &Config, capacity: usize) -> Result<KvCache> {
        let per = config.num_key_value_heads * capacity * config.head_dim;
        let bytes = per as u128 * 8 * config.num_hidden_layers as u128;
        if capacity == 0 || bytes > 64 << 30 {
            return Err(Error::Invalid(format!(
                "a KV cache of {capacity} positions ({bytes} bytes); expected 1 position or more and at most 64 GiB"
            )));
        }
        Ok(KvCache {
            layers: (0..config.num_hidden_layers).map(|_| (vec![0.0; per], vec![0.0; per])).collect(),
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            capacity,
            len: 0,
        })
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No positions held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position (keeps the memory).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Drops positions from `len` on (e.g. to re-run from a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    /// Writes `k` and `v` (`[kv_heads, head_dim]` each) of layer `layer` at position `pos`.
    pub(crate) fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (hd, cap) = (self.head_dim, self.capacity);
        let (kc, vc) = &mut self.layers[layer];
        for h in 0..self.kv_heads {
            let dst = (h * cap + pos) * hd;
            kc[dst..dst + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            vc[dst..dst + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }

    /// Keys and values of layer `layer` for kv head `h`, positions `0..n` (`[n, head_dim]` each).
    pub(crate) fn head(&self, layer: usize, h: usize, n: usize) -> (&[f32], &[f32]) {
        let (hd, cap) = (self.head_dim, self.capacity);
        let (kc, vc) = &self.layers[layer];
        let r = h * cap * hd..(h * cap + n) * hd;
        (&kc[r.clone()], &vc[r])
    }
}

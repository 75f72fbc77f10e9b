//! LoRA adapters: `y += s · (x·Aᵀ)·Bᵀ` with `A: [r, in]`, `B: [out, r]` and `s = alpha / r`
//! (or `alpha / √r` for rsLoRA), as PEFT defines them (`docs/formats.md` §5).

use crate::element::check_finite;
use crate::{Error, Result};

/// One LoRA adapter for a linear layer of shape `[out, in]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    name: String,
    rank: usize,
    in_features: usize,
    out_features: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    alpha: f32,
    use_rslora: bool,
    enabled: bool,
}

impl LoraAdapter {
    /// An enabled adapter of rank `rank` from `a` (`[rank, in]`, row-major) and `b` (`[out, rank]`); `in` and
    /// `out` follow from the lengths. Errors on a zero rank, lengths that are not multiples of the rank, or
    /// non-finite values. Whether the shapes fit a layer is checked when it is attached.
    pub fn new(
        name: impl Into<String>,
        rank: usize,
        a: Vec<f32>,
        b: Vec<f32>,
        alpha: f32,
        use_rslora: bool,
    ) -> Result<LoraAdapter> {
        let name = name.into();
        if rank == 0 {
            return Err(Error::invalid("rank", 0, "a LoRA rank of at least 1"));
        }
        if !a.len().is_multiple_of(rank) || a.is_empty() {
            return Err(Error::shape(
                format!("length of lora_A of adapter `{name}` (rank {rank})"),
                a.len(),
                "a positive multiple of the rank ([rank, in])",
            ));
        }
        if !b.len().is_multiple_of(rank) || b.is_empty() {
            return Err(Error::shape(
                format!("length of lora_B of adapter `{name}` (rank {rank})"),
                b.len(),
                "a positive multiple of the rank ([out, rank])",
            ));
        }
        if !alpha.is_finite() {
            return Err(Error::invalid("lora_alpha", alpha, "a finite number"));
        }
        check_finite(&format!("lora_A of adapter `{name}`"), &a)?;
        check_finite(&format!("lora_B of adapter `{name}`"), &b)?;
        let (in_features, out_features) = (a.len() / rank, b.len() / rank);
        Ok(LoraAdapter { name, rank, in_features, out_features, a, b, alpha, use_rslora, enabled: true })
    }

    /// The adapter's name (PEFT's adapter name, e.g. `"default"`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Input features (columns of `A`).
    pub fn in_features(&self) -> usize {
        self.in_features
    }
    /// Output features (rows of `B`).
    pub fn out_features(&self) -> usize {
        self.out_features
    }
    /// `A`, `[rank, in]` row-major.
    pub fn a(&self) -> &[f32] {
        &self.a
    }
    /// `B`, `[out, rank]` row-major.
    pub fn b(&self) -> &[f32] {
        &self.b
    }
    /// `A` for updating in place (training): its shape cannot change. The caller keeps the values finite
    /// (forwards check their outputs, so a non-finite value shows up as [`crate::Error::NonFinite`]).
    pub fn a_mut(&mut self) -> &mut [f32] {
        &mut self.a
    }
    /// `B` for updating in place (training); see [`a_mut`](Self::a_mut).
    pub fn b_mut(&mut self) -> &mut [f32] {
        &mut self.b
    }
    /// `A` and `B` mutable at once (an optimizer step updates both); see [`a_mut`](Self::a_mut).
    pub fn weights_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        (&mut self.a, &mut self.b)
    }
    /// `lora_alpha`.
    pub fn alpha(&self) -> f32 {
        self.alpha
    }
    /// Whether the scaling is `alpha / √r` (rsLoRA) rather than `alpha / r`.
    pub fn use_rslora(&self) -> bool {
        self.use_rslora
    }
    /// The factor `s` applied to `(x·Aᵀ)·Bᵀ`: `alpha / r`, or `alpha / √r` with rsLoRA (computed in f32).
    pub fn scaling(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
    /// Whether [`QuantLinear::forward`](crate::linear::QuantLinear::forward) applies this adapter.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }
    /// Enables or disables the adapter.
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }
}

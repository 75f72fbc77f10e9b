//! Optimizers for (Q)LoRA fine-tuning over caller-owned `f32` parameters: [`Optimizer`] with AdamW
//! (torch's arithmetic), bitsandbytes-style 8-bit AdamW, and plain SGD; LoRA+ learning rates and
//! global-norm gradient clipping.
//!
//! * **AdamW** follows `torch.optim.AdamW`'s single-tensor path (`foreach=False`, `amsgrad=False`,
//!   `maximize=False`, `capturable=False`) operation by operation, in f32, with the scalars derived in f64 as
//!   torch derives them from Python floats and then rounded to f32 where torch's kernels take them as `f32`
//!   scalars. Per element, with `lr_p` the parameter's learning rate and `t` the step (from 1):
//!   1. `θ ← θ·f32(1 − lr_p·wd)` (only when `wd ≠ 0`);
//!   2. `m ← lerp(m, g, f32(1 − β1))`, torch's lerp: `fma(w, g − m, m)` for `w < 0.5`, else
//!      `fma(w − 1, g − m, g)`;
//!   3. `v ← fma(f32(1 − β2)·g, g, v·f32(β2))` (`mul_(β2).addcmul_(g, g, value = 1 − β2)`);
//!   4. `denom ← √v / f32((1 − β2ᵗ)^0.5) + f32(eps)`;
//!   5. `θ ← θ + (f32(−lr_p / (1 − β1ᵗ))·m) / denom`.
//!
//!   The fused multiply-adds are those of torch's vectorised CPU kernels on x86-64 with AVX2 / AVX-512 (checked
//!   against torch 2.15 in `tests/optim_torch.rs`). The one known difference: torch's CPU `sqrt` goes through
//!   MKL's vector math library, which is not correctly rounded (off by one ulp for some inputs); lowbit's `√`
//!   is. The resulting parameter differences and their bound are stated in that test.
//! * **AdamW8bit** ([`OptimizerKind::AdamW8bit`]): bitsandbytes' `bnb.optim.AdamW8bit` as its CPU backend
//!   (bitsandbytes 0.50.2, `bitsandbytes/backends/cpu/ops.py` and `libbitsandbytes_cpu`) computes it. Scalars
//!   as above (f64, then `f32`), `c2 = √(1 − β2ᵗ)` (`math.sqrt`).
//!   - Parameters of at least [`MIN_8BIT_SIZE`] elements keep **8-bit states**: blocks of
//!     [`STATE_BLOCKSIZE`] = 256 elements, one byte per element and one f32 `absmax` per block and state, `m`
//!     on the signed map ([`StateMap::Signed`], bitsandbytes' `create_dynamic_map(signed=True)`), `v` on the
//!     unsigned one ([`StateMap::Unsigned`]). Each step dequantizes (`map[code]·absmax`), updates in f32 with
//!     `m ← fma(g, f32(1 − β1), m·f32(β1))` (not torch's lerp), `v ← fma(f32(1 − β2)·g, g, v·f32(β2))`,
//!     `denom ← √v / f32(c2) + f32(eps)`, `θ ← θ·f32(1 − lr_p·wd)` (only when `wd > 0`),
//!     `θ ← θ + (f32(−lr_p / (1 − β1ᵗ))·m) / denom`, and requantizes both states with
//!     [`quantize_blockwise`] (bitsandbytes' lookup-table rule: **not** the nearest map entry, see there).
//!   - Smaller parameters keep f32 states and get bitsandbytes' 32-bit CPU Adam, which differs again:
//!     the same `m`, `v` updates, then `θ ← θ·f32(1 − lr_p·wd)` (when `wd > 0`) and
//!     `θ ← fma(m / (√v + f32(eps·c2)), f32(−lr_p·c2 / (1 − β1ᵗ)), θ)`.
//!
//!   Against bitsandbytes 0.50.2 on the CPU (`tests/optim_torch.rs`, 3 steps, weight decay, no LoRA+ or
//!   clipping on the bitsandbytes side): the final 8-bit states (codes and absmax of `m` and `v`) and both maps
//!   are **bit-identical** (they never depend on `θ` or `√`). The parameters agree
//!   except where torch's CPU `sqrt` (MKL vector math, not correctly rounded) is one ulp off lowbit's
//!   correctly rounded `√`; the resulting bound is derived in that test (measured: 7 of 4396 parameter values
//!   differ after step 1 and 19 after step 3, none of the 100 of the 32-bit tensor).
//! * **SGD**: `θ ← fma(f32(−lr_p), g, θ)` (torch's `param.add_(grad, alpha=-lr)`); no momentum, no weight
//!   decay.
//! * **LoRA+**: a parameter declared with [`ParamSpec::lora_b`] gets `lr_p = lora_plus_ratio·lr` (in f64),
//!   the others `lr`.
//! * **Clipping** ([`OptimizerConfig::max_grad_norm`]), like `torch.nn.utils.clip_grad_norm_`: the global L2
//!   norm over all gradients is accumulated in f64 (`Σ g²`, then `√`), rounded to f32, and the coefficient is
//!   computed as torch computes it, in f32: `coef = f32(max_norm) · (1 / (norm + f32(1e-6)))`. Gradients are
//!   multiplied by `coef` (in f32, in place) when `coef < 1`.
//!
//! Hyperparameters are `f64`, like torch's Python floats, so that the derived scalars (`1 − β1`,
//! `lr/(1 − β1ᵗ)`, `1 − lr·wd`) are the same numbers as torch's, including for the defaults 0.9 and 0.999.

use std::sync::OnceLock;

use crate::element::check_finite;
use crate::{Error, Result};

/// Parameters with fewer elements than this keep 32-bit Adam states (and bitsandbytes' 32-bit update rule)
/// under [`OptimizerKind::AdamW8bit`]; larger ones get 8-bit states (bitsandbytes' `min_8bit_size` default:
/// `numel < min_8bit_size` means 32-bit).
pub const MIN_8BIT_SIZE: usize = 4096;

/// Which update rule an [`Optimizer`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OptimizerKind {
    /// AdamW with f32 states, torch's arithmetic (module docs).
    AdamW,
    /// AdamW with bitsandbytes' blockwise 8-bit states (blocks of 256, an f32 absmax per block; signed dynamic
    /// map for `m`, unsigned for `v`) for parameters of at least [`MIN_8BIT_SIZE`] elements, bitsandbytes'
    /// 32-bit Adam below; bitsandbytes' CPU arithmetic (module docs).
    AdamW8bit,
    /// Plain SGD: no momentum, no weight decay.
    Sgd,
}

impl OptimizerKind {
    /// Every kind, in the order [`parse`](Self::parse) lists them.
    pub const ALL: [OptimizerKind; 3] = [OptimizerKind::AdamW, OptimizerKind::AdamW8bit, OptimizerKind::Sgd];

    /// Parses `adamw`, `adamw8bit` or `sgd` (ASCII case-insensitive); anything else is an error listing them.
    pub fn parse(s: &str) -> Result<OptimizerKind> {
        let lower = s.trim().to_ascii_lowercase();
        OptimizerKind::ALL
            .into_iter()
            .find(|k| k.name() == lower)
            .ok_or_else(|| Error::invalid("optimizer", format!("{s:?}"), "one of \"adamw\", \"adamw8bit\", \"sgd\""))
    }

    /// The name [`parse`](Self::parse) accepts.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::AdamW8bit => "adamw8bit",
            OptimizerKind::Sgd => "sgd",
        }
    }

    fn is_adam(self) -> bool {
        matches!(self, OptimizerKind::AdamW | OptimizerKind::AdamW8bit)
    }
}

impl std::fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Hyperparameters of an [`Optimizer`]. Build with [`OptimizerConfig::new`] and adjust the public fields;
/// [`validate`](Self::validate) (also run by [`Optimizer::new`]) checks them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimizerConfig {
    /// The update rule.
    pub kind: OptimizerKind,
    /// Learning rate (finite, > 0). Change it during training with [`Optimizer::set_lr`].
    pub lr: f64,
    /// Adam's first-moment decay β1, in `[0, 1)` (default 0.9). Ignored by SGD.
    pub beta1: f64,
    /// Adam's second-moment decay β2, in `[0, 1)` (default 0.999). Ignored by SGD.
    pub beta2: f64,
    /// Adam's denominator term (finite, > 0; default 1e-8). Ignored by SGD.
    pub eps: f64,
    /// Decoupled weight decay (finite, ≥ 0; default 0, like the Hugging Face Trainer). Must be 0 for SGD.
    pub weight_decay: f64,
    /// LoRA+ ratio `lr_B / lr` for parameters marked [`ParamSpec::lora_b`] (finite, > 0; 1 = plain LoRA).
    pub lora_plus_ratio: f64,
    /// Clip the global gradient norm to this value (finite, > 0) before each step; `None`: no clipping.
    pub max_grad_norm: Option<f64>,
}

impl OptimizerConfig {
    /// `kind` with learning rate `lr` and the defaults: β = (0.9, 0.999), eps 1e-8, no weight decay, LoRA+
    /// ratio 1, no clipping. Not validated until [`validate`](Self::validate) or [`Optimizer::new`].
    pub fn new(kind: OptimizerKind, lr: f64) -> OptimizerConfig {
        OptimizerConfig {
            kind,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            lora_plus_ratio: 1.0,
            max_grad_norm: None,
        }
    }

    /// Checks every field against the ranges documented on it; the error names the field, its value and
    /// the accepted range.
    pub fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        for (arg, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::invalid(arg, v, "a number in [0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::invalid("eps", self.eps, "a finite number > 0"));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::invalid("weight_decay", self.weight_decay, "a finite number ≥ 0"));
        }
        if self.kind == OptimizerKind::Sgd && self.weight_decay != 0.0 {
            return Err(Error::invalid(
                "weight_decay",
                self.weight_decay,
                "0 with the sgd optimizer (plain SGD has no weight decay; use adamw for decoupled decay)",
            ));
        }
        if !(self.lora_plus_ratio.is_finite() && self.lora_plus_ratio > 0.0) {
            return Err(Error::invalid(
                "lora_plus_ratio",
                self.lora_plus_ratio,
                "a finite number > 0 (1 = plain LoRA)",
            ));
        }
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return Err(Error::invalid("max_grad_norm", n, "a finite number > 0, or None for no clipping"));
            }
        }
        Ok(())
    }

    /// The learning rate of a parameter: `lr·lora_plus_ratio` for a LoRA `B` matrix, else `lr`.
    pub fn lr_for(&self, spec: &ParamSpec) -> f64 {
        if spec.lora_b {
            self.lr * self.lora_plus_ratio
        } else {
            self.lr
        }
    }
}

fn check_lr(lr: f64) -> Result<()> {
    if lr.is_finite() && lr > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid("lr", lr, "a finite learning rate > 0"))
    }
}

/// What the optimizer needs to know about one parameter tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Number of `f32` elements (≥ 1).
    pub len: usize,
    /// Whether this is a LoRA `B` matrix (gets the LoRA+ learning rate).
    pub lora_b: bool,
}

/// What one [`Optimizer::step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of all gradients before clipping, accumulated in f64.
    pub grad_norm: f64,
    /// The factor the gradients were multiplied by: `min(coef, 1)`, 1 when not clipped (or no clipping).
    pub clip_coef: f32,
    /// The step just taken, counting from 1.
    pub step: u64,
}

/// Per-parameter optimizer state.
#[derive(Clone, Debug)]
pub(crate) enum State {
    /// SGD: none.
    None,
    /// Adam moments in f32 (AdamW; AdamW8bit below [`MIN_8BIT_SIZE`] elements).
    Adam { m: Vec<f32>, v: Vec<f32> },
    /// AdamW8bit's blockwise 8-bit moments: `m` on [`StateMap::Signed`], `v` on [`StateMap::Unsigned`].
    Adam8bit { m_codes: Vec<u8>, m_absmax: Vec<f32>, v_codes: Vec<u8>, v_absmax: Vec<f32> },
}

impl State {
    fn bytes(&self) -> usize {
        match self {
            State::None => 0,
            State::Adam { m, v } => 4 * (m.len() + v.len()),
            State::Adam8bit { m_codes, m_absmax, v_codes, v_absmax } => {
                m_codes.len() + v_codes.len() + 4 * (m_absmax.len() + v_absmax.len())
            }
        }
    }
}

/// A read-only view of one parameter's 8-bit Adam state ([`Optimizer::adam8bit_state`]), laid out as
/// bitsandbytes' `state1`, `absmax1`, `state2`, `absmax2`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam8bitState<'a> {
    /// One code per element into [`StateMap::Signed`] (bitsandbytes' `state1`).
    pub m_codes: &'a [u8],
    /// One f32 scale per block of [`STATE_BLOCKSIZE`] elements (`absmax1`).
    pub m_absmax: &'a [f32],
    /// One code per element into [`StateMap::Unsigned`] (`state2`).
    pub v_codes: &'a [u8],
    /// One f32 scale per block (`absmax2`).
    pub v_absmax: &'a [f32],
}

/// An optimizer over caller-owned `f32` parameter slices (module docs: the update rules).
///
/// The parameter list is fixed at construction ([`ParamSpec`]s); every [`step`](Self::step) takes the
/// parameters and gradients in the same order and with the same lengths.
///
/// ```
/// use lowbit::optim::{Optimizer, OptimizerConfig, OptimizerKind, ParamSpec};
///
/// let mut a = vec![0.5f32; 6]; // a LoRA A matrix
/// let mut b = vec![0.0f32; 4]; // its B matrix: LoRA+ gives it 16× the learning rate
/// let mut config = OptimizerConfig::new(OptimizerKind::AdamW, 1e-3);
/// config.lora_plus_ratio = 16.0;
/// config.max_grad_norm = Some(1.0);
/// let specs = [ParamSpec { len: 6, lora_b: false }, ParamSpec { len: 4, lora_b: true }];
/// let mut opt = Optimizer::new(config, &specs)?;
///
/// let (mut ga, mut gb) = (vec![0.1f32; 6], vec![-2.0f32; 4]);
/// let stats = opt.step(&mut [&mut a, &mut b], &mut [&mut ga, &mut gb])?;
/// assert_eq!(stats.step, 1);
/// assert!(stats.grad_norm > 1.0 && stats.clip_coef < 1.0); // clipped to norm 1
/// assert!(a[0] < 0.5 && b[0] > 0.0); // the first Adam step moves each element by about lr_p
/// assert!((b[0] - 16e-3).abs() < 1e-5);
///
/// // A wrong length is an error, and nothing changes.
/// let before = a.clone();
/// assert!(opt.step(&mut [&mut a, &mut b], &mut [&mut ga[..5], &mut gb]).is_err());
/// assert_eq!(a, before);
/// # Ok::<(), lowbit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Optimizer {
    config: OptimizerConfig,
    specs: Vec<ParamSpec>,
    states: Vec<State>,
    step: u64,
}

impl Optimizer {
    /// An optimizer for parameters shaped like `params` (at least one, each with `len ≥ 1`), with zeroed
    /// states. Errors: an invalid `config` ([`OptimizerConfig::validate`]), no parameters, or an empty one.
    pub fn new(config: OptimizerConfig, params: &[ParamSpec]) -> Result<Optimizer> {
        config.validate()?;
        if params.is_empty() {
            return Err(Error::invalid("params", "an empty list", "at least one parameter"));
        }
        if let Some(i) = params.iter().position(|p| p.len == 0) {
            return Err(Error::invalid("params", format!("params[{i}].len = 0"), "every parameter with len ≥ 1"));
        }
        let states = params
            .iter()
            .map(|p| match config.kind {
                OptimizerKind::Sgd => State::None,
                OptimizerKind::AdamW8bit if p.len >= MIN_8BIT_SIZE => {
                    let blocks = state_blocks(p.len);
                    State::Adam8bit {
                        m_codes: vec![0; p.len],
                        m_absmax: vec![0.0; blocks],
                        v_codes: vec![0; p.len],
                        v_absmax: vec![0.0; blocks],
                    }
                }
                OptimizerKind::AdamW | OptimizerKind::AdamW8bit => {
                    State::Adam { m: vec![0.0; p.len], v: vec![0.0; p.len] }
                }
            })
            .collect();
        Ok(Optimizer { config, specs: params.to_vec(), states, step: 0 })
    }

    /// The configuration (with the current learning rate).
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// The parameter specs given to [`new`](Self::new).
    pub fn params(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Sets the base learning rate for the following steps (for schedules); LoRA+ parameters get
    /// `lr·lora_plus_ratio`. Errors (and keeps the old rate) unless `lr` is finite and > 0.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.config.lr = lr;
        Ok(())
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Bytes of optimizer state held: 8 per element for f32 moments (AdamW; AdamW8bit below
    /// [`MIN_8BIT_SIZE`]), 2 per element plus 8 per block of [`STATE_BLOCKSIZE`] for AdamW8bit's 8-bit states
    /// (two codes, two f32 absmax); 0 for SGD.
    pub fn state_bytes(&self) -> usize {
        self.states.iter().map(State::bytes).sum()
    }

    /// The 8-bit Adam state of parameter `i`: `Some` under [`OptimizerKind::AdamW8bit`] for a parameter of at
    /// least [`MIN_8BIT_SIZE`] elements, `None` otherwise (other kinds, smaller parameters, `i` out of range).
    /// Decode a state with [`dequantize_blockwise`].
    pub fn adam8bit_state(&self, i: usize) -> Option<Adam8bitState<'_>> {
        match self.states.get(i)? {
            State::Adam8bit { m_codes, m_absmax, v_codes, v_absmax } => {
                Some(Adam8bitState { m_codes, m_absmax, v_codes, v_absmax })
            }
            _ => None,
        }
    }

    /// The state of parameter `i` (tests).
    #[cfg(test)]
    pub(crate) fn state(&self, i: usize) -> &State {
        &self.states[i]
    }

    /// One optimization step: clips `grads` in place if configured, then updates `params` in place.
    ///
    /// Validated before anything is modified: as many parameters and gradients as [`ParamSpec`]s, each of the
    /// declared length, and every gradient finite. On error, parameters, gradients, states and the step count
    /// are unchanged. Parameters are not checked for finiteness.
    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &mut [&mut [f32]]) -> Result<StepStats> {
        self.check(params, grads)?;
        let grad_norm = global_norm(grads);
        let mut clip_coef = 1.0f32;
        if let Some(max_norm) = self.config.max_grad_norm {
            let coef = clip_coefficient(max_norm, grad_norm);
            if coef < 1.0 {
                for g in grads.iter_mut() {
                    g.iter_mut().for_each(|x| *x *= coef);
                }
                clip_coef = coef;
            }
        }
        self.step += 1;
        let c = &self.config;
        for (((p, g), spec), state) in params.iter_mut().zip(grads.iter()).zip(&self.specs).zip(&mut self.states) {
            let lr = c.lr_for(spec);
            match state {
                State::None => sgd_update(p, g, lr),
                State::Adam { m, v } if c.kind == OptimizerKind::AdamW8bit => {
                    bnb_adam32_update(p, g, m, v, &BnbScalars::new(c, lr, self.step));
                }
                State::Adam { m, v } => {
                    adamw_update(p, g, m, v, &AdamScalars::new(c, lr, self.step));
                }
                State::Adam8bit { m_codes, m_absmax, v_codes, v_absmax } => {
                    let s = BnbScalars::new(c, lr, self.step);
                    bnb_adam8_update(p, g, (m_codes, m_absmax), (v_codes, v_absmax), &s);
                }
            }
        }
        Ok(StepStats { grad_norm, clip_coef, step: self.step })
    }

    fn check(&self, params: &[&mut [f32]], grads: &[&mut [f32]]) -> Result<()> {
        let n = self.specs.len();
        if params.len() != n {
            return Err(Error::shape("number of parameters passed to Optimizer::step", params.len(), n));
        }
        if grads.len() != n {
            return Err(Error::shape("number of gradients passed to Optimizer::step", grads.len(), n));
        }
        for (i, ((p, g), spec)) in params.iter().zip(grads).zip(&self.specs).enumerate() {
            if p.len() != spec.len {
                return Err(Error::shape(format!("length of params[{i}]"), p.len(), spec.len));
            }
            if g.len() != spec.len {
                return Err(Error::shape(format!("length of grads[{i}]"), g.len(), spec.len));
            }
        }
        if !self.config.kind.is_adam() && self.states.iter().any(|s| !matches!(s, State::None)) {
            return Err(Error::format("optimizer state", "SGD with Adam states (internal error)"));
        }
        for (i, g) in grads.iter().enumerate() {
            check_finite(&format!("grads[{i}]"), g)?;
        }
        Ok(())
    }
}

/// `√(Σ g²)` over all gradients, squares and sum in f64.
pub(crate) fn global_norm(grads: &[&mut [f32]]) -> f64 {
    grads.iter().flat_map(|g| g.iter()).map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

/// torch's `clip_grad_norm_` coefficient from the norm: in f32, `f32(max_norm) · (1 / (f32(norm) + f32(1e-6)))`
/// (torch evaluates `max_norm / (total_norm + 1e-6)` on an f32 tensor as `reciprocal() * max_norm`).
pub(crate) fn clip_coefficient(max_norm: f64, norm: f64) -> f32 {
    (1.0f32 / (norm as f32 + 1e-6f32)) * max_norm as f32
}

/// `θ ← fma(f32(−lr), g, θ)`.
pub(crate) fn sgd_update(p: &mut [f32], g: &[f32], lr: f64) {
    let neg_lr = -lr as f32;
    for (x, &gi) in p.iter_mut().zip(g) {
        *x = neg_lr.mul_add(gi, *x);
    }
}

/// The f32 scalars of one AdamW step for one parameter, derived in f64 as torch derives them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamScalars {
    /// `f32(1 − lr·wd)`, or `None` when `wd = 0` (torch skips the multiply).
    pub decay: Option<f32>,
    /// `f32(1 − β1)`: the lerp weight.
    pub w1: f32,
    /// `f32(β2)`.
    pub beta2: f32,
    /// `f32(1 − β2)`.
    pub one_minus_beta2: f32,
    /// `f32((1 − β2ᵗ)^0.5)` (Python's `** 0.5`, i.e. `pow`).
    pub bc2_sqrt: f32,
    /// `f32(eps)`.
    pub eps: f32,
    /// `f32(−lr / (1 − β1ᵗ))`.
    pub neg_step_size: f32,
}

impl AdamScalars {
    pub(crate) fn new(c: &OptimizerConfig, lr: f64, step: u64) -> AdamScalars {
        let t = step as f64;
        let bc1 = 1.0 - c.beta1.powf(t);
        let bc2 = 1.0 - c.beta2.powf(t);
        AdamScalars {
            decay: (c.weight_decay != 0.0).then_some((1.0 - lr * c.weight_decay) as f32),
            w1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            bc2_sqrt: bc2.powf(0.5) as f32,
            eps: c.eps as f32,
            neg_step_size: (-(lr / bc1)) as f32,
        }
    }
}

/// torch's CPU `lerp` with an f32 scalar weight, as its vectorised kernel computes it (one fused multiply-add).
#[inline]
pub(crate) fn lerp(start: f32, end: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        w.mul_add(end - start, start)
    } else {
        (w - 1.0).mul_add(end - start, end)
    }
}

/// One AdamW step of one parameter, in place (module docs: the five operations).
pub(crate) fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamScalars) {
    for (((x, &gi), mi), vi) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        if let Some(d) = s.decay {
            *x *= d;
        }
        *mi = lerp(*mi, gi, s.w1);
        *vi = (s.one_minus_beta2 * gi).mul_add(gi, *vi * s.beta2);
        let denom = vi.sqrt() / s.bc2_sqrt + s.eps;
        *x += (s.neg_step_size * *mi) / denom;
    }
}

/// Elements per block of AdamW8bit's quantized states (bitsandbytes' fixed `blocksize = 256` for the 8-bit
/// optimizers): each block has its own f32 `absmax`.
pub const STATE_BLOCKSIZE: usize = 256;

/// Number of [`STATE_BLOCKSIZE`] blocks of a state of `len` elements (the last one may be partial).
pub fn state_blocks(len: usize) -> usize {
    len.div_ceil(STATE_BLOCKSIZE)
}

/// bitsandbytes' unsigned dynamic 8-bit map, `bitsandbytes.functional.create_dynamic_map(signed=False)` as f32:
/// 256 sorted values, index 0 is 0.0 and index 255 is 1.0; the map of AdamW8bit's second moment `v`.
///
/// The rule is the signed map's ([`crate::double_quant::DYNAMIC_MAP`]) without the sign: for `i` in `0..7`, the
/// means of consecutive points of `linspace(0.1, 1, 2^(i+1) + 1)` (torch's f32 `linspace`) scaled by
/// `10^(i−6)`, plus 0 and 1. The literals were dumped from bitsandbytes 0.50.2 (shortest decimals that
/// round-trip each f32); the unit test `unsigned_map_follows_the_rule` regenerates them and
/// `tests/optim_torch.rs` compares them with the fixture.
#[rustfmt::skip]
pub const DYNAMIC_MAP_UNSIGNED: [f32; 256] = [
    0.0, 3.2500003e-7, 7.75e-7, 2.1249998e-6, 4.3749997e-6, 6.625e-6, 8.874999e-6, 1.5624999e-5,
    2.6875001e-5, 3.8125e-5, 4.9374998e-5, 6.0625003e-5, 7.1875e-5, 8.312499e-5, 9.4375e-5, 0.000128125,
    0.000184375, 0.00024062501, 0.00029687502, 0.00035312498, 0.00040937503, 0.00046562502, 0.00052187504, 0.000578125,
    0.000634375, 0.00069062505, 0.000746875, 0.0008031251, 0.00085937505, 0.000915625, 0.00097187504, 0.001140625,
    0.001421875, 0.001703125, 0.001984375, 0.002265625, 0.0025468748, 0.002828125, 0.0031093748, 0.0033906251,
    0.003671875, 0.003953125, 0.0042343745, 0.004515625, 0.0047968747, 0.005078125, 0.005359375, 0.0056406246,
    0.005921875, 0.0062031248, 0.006484375, 0.0067656254, 0.0070468746, 0.007328125, 0.0076093744, 0.007890625,
    0.008171875, 0.008453124, 0.008734375, 0.009015624, 0.0092968745, 0.009578126, 0.009859375, 0.010703126,
    0.012109376, 0.013515624, 0.014921876, 0.016328124, 0.017734377, 0.019140625, 0.020546874, 0.021953126,
    0.023359375, 0.024765624, 0.026171876, 0.027578129, 0.028984373, 0.030390626, 0.031796873, 0.033203125,
    0.034609374, 0.036015626, 0.03742188, 0.038828123, 0.040234376, 0.041640624, 0.043046873, 0.044453125,
    0.045859374, 0.047265626, 0.04867187, 0.050078124, 0.051484372, 0.052890625, 0.054296877, 0.05570313,
    0.057109382, 0.058515627, 0.059921872, 0.061328124, 0.06273438, 0.06414063, 0.06554688, 0.06695312,
    0.068359375, 0.06976563, 0.07117188, 0.072578125, 0.07398438, 0.07539063, 0.07679688, 0.07820313,
    0.07960938, 0.081015624, 0.08242188, 0.08382813, 0.085234374, 0.086640626, 0.08804687, 0.08945312,
    0.090859376, 0.09226563, 0.09367188, 0.095078126, 0.09648438, 0.09789063, 0.099296875, 0.103515625,
    0.11054687, 0.11757813, 0.12460937, 0.13164061, 0.13867188, 0.14570314, 0.15273437, 0.15976563,
    0.16679686, 0.17382812, 0.18085939, 0.18789062, 0.19492188, 0.20195311, 0.20898438, 0.21601564,
    0.22304687, 0.23007813, 0.23710936, 0.24414062, 0.25117186, 0.25820312, 0.26523438, 0.2722656,
    0.27929688, 0.28632814, 0.29335937, 0.3003906, 0.30742186, 0.31445312, 0.3214844, 0.32851562,
    0.33554685, 0.3425781, 0.34960938, 0.35664064, 0.36367187, 0.3707031, 0.37773436, 0.38476562,
    0.3917969, 0.39882812, 0.40585935, 0.4128906, 0.41992188, 0.42695314, 0.43398437, 0.4410156,
    0.44804686, 0.45507812, 0.4621094, 0.46914062, 0.47617185, 0.4832031, 0.49023438, 0.4972656,
    0.5042969, 0.5113281, 0.51835936, 0.5253906, 0.5324218, 0.53945315, 0.54648435, 0.5535157,
    0.5605469, 0.56757814, 0.5746094, 0.5816406, 0.5886719, 0.5957031, 0.6027344, 0.60976565,
    0.61679685, 0.6238282, 0.6308594, 0.63789064, 0.6449219, 0.6519531, 0.6589844, 0.6660156,
    0.6730469, 0.68007815, 0.68710935, 0.6941407, 0.7011719, 0.70820314, 0.7152344, 0.7222656,
    0.7292969, 0.7363281, 0.7433594, 0.75039065, 0.75742185, 0.7644532, 0.7714844, 0.7785156,
    0.7855469, 0.7925781, 0.7996094, 0.8066406, 0.8136718, 0.82070315, 0.82773435, 0.8347657,
    0.8417969, 0.8488281, 0.8558594, 0.8628906, 0.8699219, 0.8769531, 0.8839843, 0.89101565,
    0.89804685, 0.9050782, 0.9121094, 0.9191406, 0.9261719, 0.9332031, 0.9402344, 0.9472656,
    0.9542968, 0.96132815, 0.96835935, 0.9753907, 0.9824219, 0.9894531, 0.9964844, 1.0,
];

/// Which dynamic map an 8-bit state is coded on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateMap {
    /// [`crate::double_quant::DYNAMIC_MAP`] (bitsandbytes' `create_dynamic_map(signed=True)`): Adam's `m`.
    Signed,
    /// [`DYNAMIC_MAP_UNSIGNED`] (`create_dynamic_map(signed=False)`): Adam's `v`.
    Unsigned,
}

impl StateMap {
    /// The 256 map values (sorted ascending).
    pub fn values(self) -> &'static [f32; 256] {
        match self {
            StateMap::Signed => &crate::double_quant::DYNAMIC_MAP,
            StateMap::Unsigned => &DYNAMIC_MAP_UNSIGNED,
        }
    }

    /// bitsandbytes' quantization lookup table for this map (built once; `lut[j]` is the code of the grid
    /// point `x_j`, [`quantize_blockwise`]).
    fn lut(self) -> &'static [u8] {
        static SIGNED: OnceLock<Box<[u8]>> = OnceLock::new();
        static UNSIGNED: OnceLock<Box<[u8]>> = OnceLock::new();
        let cell = match self {
            StateMap::Signed => &SIGNED,
            StateMap::Unsigned => &UNSIGNED,
        };
        cell.get_or_init(|| build_lut(self.values()))
    }
}

/// Number of grid points of bitsandbytes' CPU quantization lookup table.
const LUT_LEN: usize = 1 << 16;

/// bitsandbytes' `build_quantize_lut`: thresholds `t_i = (map[i] + map[i+1])·0.5` (f32, `i < 255`); grid
/// points `x_j = (j + j) / 65535 − 1` (f32, `j < 65536`); `lut[j]` = the first `i` with `x_j ≤ t_i`, else 255.
fn build_lut(map: &[f32; 256]) -> Box<[u8]> {
    let thresholds: Vec<f32> = map.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
    let mut lut = vec![0u8; LUT_LEN];
    let mut i = 0usize;
    for (j, out) in lut.iter_mut().enumerate() {
        let jf = j as f32;
        let x = (jf + jf) / 65535.0 - 1.0;
        while i < thresholds.len() && x > thresholds[i] {
            i += 1;
        }
        *out = i as u8; // i ≤ 255
    }
    lut.into_boxed_slice()
}

/// Quantizes one block as bitsandbytes' `quantize_cpu_impl<float>` does; returns its absmax.
fn quantize_block(values: &[f32], lut: &[u8], codes: &mut [u8]) -> f32 {
    // `std::max(absmax, |x|)` from −∞ (a NaN never wins), then `max(0, ·)`.
    let mut absmax = f32::NEG_INFINITY;
    for &x in values {
        let a = x.abs();
        if a > absmax {
            absmax = a;
        }
    }
    let absmax = if 0.0 > absmax { 0.0 } else { absmax };
    if absmax == 0.0 {
        codes.iter_mut().for_each(|c| *c = 0);
        return absmax;
    }
    let inv = 1.0 / absmax;
    for (c, &x) in codes.iter_mut().zip(values) {
        let normed = (inv * x).clamp(-1.0, 1.0); // NaN stays NaN
        let y = (normed + 1.0) * 0.5;
        // `(int)fmaf(65535, y, 0.5)`, truncating; NaN → 0 (as C's `cvttss2si` → 0x8000_0000, masked).
        let j = (65535.0f32.mul_add(y, 0.5) as i32 as u32 & 0xffff) as usize;
        *c = lut.get(j).copied().unwrap_or(0);
    }
    absmax
}

/// Quantizes `values` in blocks of [`STATE_BLOCKSIZE`] into `codes` (one per value) and `absmax` (one per
/// block, [`state_blocks`]), bit for bit as bitsandbytes' CPU `quantize_blockwise` (0.50.2,
/// `libbitsandbytes_cpu`) does:
///
/// * `absmax` = the largest `|x|` of the block (0 if none is > 0); an all-zero block gets absmax 0 and code 0
///   everywhere;
/// * otherwise, per value: `n = clamp(x·f32(1/absmax), −1, 1)`, grid index `j = trunc(fma(65535, (n + 1)·0.5,
///   0.5))` (all f32), and `code = lut[j]`, where `lut[j]` is the map entry nearest the grid point
///   `x_j = 2j/65535 − 1` (ties to the lower code; thresholds and grid points computed in f32).
///
/// So a value is first snapped to a 65536-point grid on `[−1, 1]` (spacing `2/65535 ≈ 3.1e-5`, not containing
/// 0), then to the map: the result is the nearest map entry except near a threshold or below the grid's
/// resolution (e.g. `m = 0` in a block with a non-zero absmax gets the signed map's code 131, `2.125e-5·absmax`).
/// Non-finite values are not refused; they quantize as in bitsandbytes (a NaN is skipped by the absmax and gets
/// the code of `lut[0]`).
///
/// Errors: `codes.len() != values.len()` or `absmax.len() != state_blocks(values.len())`; nothing is written
/// then.
pub fn quantize_blockwise(values: &[f32], map: StateMap, codes: &mut [u8], absmax: &mut [f32]) -> Result<()> {
    check_blockwise(values.len(), codes.len(), absmax.len())?;
    let lut = map.lut();
    for ((v, c), a) in values.chunks(STATE_BLOCKSIZE).zip(codes.chunks_mut(STATE_BLOCKSIZE)).zip(absmax.iter_mut()) {
        *a = quantize_block(v, lut, c);
    }
    Ok(())
}

/// Decodes blockwise 8-bit codes: `out[i] = map[codes[i]]·absmax[i / STATE_BLOCKSIZE]` (one f32 product,
/// bitsandbytes' `dequantizeBlockwise8bitCpu<float>`).
///
/// Errors: `out.len() != codes.len()` or `absmax.len() != state_blocks(codes.len())`; nothing is written then.
pub fn dequantize_blockwise(codes: &[u8], absmax: &[f32], map: StateMap, out: &mut [f32]) -> Result<()> {
    check_blockwise(out.len(), codes.len(), absmax.len())?;
    let values = map.values();
    for ((o, c), &a) in out.chunks_mut(STATE_BLOCKSIZE).zip(codes.chunks(STATE_BLOCKSIZE)).zip(absmax) {
        for (x, &code) in o.iter_mut().zip(c) {
            *x = values[usize::from(code)] * a;
        }
    }
    Ok(())
}

fn check_blockwise(len: usize, codes: usize, absmax: usize) -> Result<()> {
    if codes != len {
        return Err(Error::shape("number of 8-bit state codes", codes, len));
    }
    let blocks = state_blocks(len);
    if absmax != blocks {
        return Err(Error::shape(
            format!("number of absmax values for {len} elements in blocks of 256"),
            absmax,
            blocks,
        ));
    }
    Ok(())
}

/// The f32 scalars of one bitsandbytes Adam step (AdamW8bit) for one parameter, derived in f64 as its Python
/// code derives them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BnbScalars {
    /// `f32(1 − lr·wd)`, or `None` unless `wd > 0`.
    pub decay: Option<f32>,
    /// `f32(β1)`, `f32(1 − β1)`, `f32(β2)`, `f32(1 − β2)`.
    pub beta1: f32,
    pub w1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// 8-bit path: `f32(c2)`, `c2 = √(1 − β2ᵗ)`; `f32(eps)`; `f32(−lr / (1 − β1ᵗ))`.
    pub c2: f32,
    pub eps: f32,
    pub neg_step_size: f32,
    /// 32-bit path: `f32(eps·c2)` and `f32(−lr·c2 / (1 − β1ᵗ))`.
    pub eps_c2: f32,
    pub step_size32: f32,
}

impl BnbScalars {
    pub(crate) fn new(c: &OptimizerConfig, lr: f64, step: u64) -> BnbScalars {
        let t = step as f64;
        let correction1 = 1.0 - c.beta1.powf(t);
        let correction2 = (1.0 - c.beta2.powf(t)).sqrt();
        BnbScalars {
            decay: (c.weight_decay > 0.0).then_some((1.0 - lr * c.weight_decay) as f32),
            beta1: c.beta1 as f32,
            w1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            c2: correction2 as f32,
            eps: c.eps as f32,
            neg_step_size: (-lr / correction1) as f32,
            eps_c2: (c.eps * correction2) as f32,
            step_size32: (-lr * correction2 / correction1) as f32,
        }
    }

    /// `m ← m·β1 + (1 − β1)·g` and `v ← v·β2 + (1 − β2)·g²` as torch's `mul_` then `add_(alpha)` /
    /// `addcmul_(value)` compute them (the second one fused).
    #[inline]
    fn moments(&self, g: f32, m: f32, v: f32) -> (f32, f32) {
        (g.mul_add(self.w1, m * self.beta1), (self.one_minus_beta2 * g).mul_add(g, v * self.beta2))
    }
}

/// bitsandbytes' 32-bit CPU Adam step (AdamW8bit below [`MIN_8BIT_SIZE`]), in place (module docs).
pub(crate) fn bnb_adam32_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &BnbScalars) {
    for (((x, &gi), mi), vi) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        (*mi, *vi) = s.moments(gi, *mi, *vi);
        if let Some(d) = s.decay {
            *x *= d;
        }
        let update = *mi / (vi.sqrt() + s.eps_c2);
        *x = update.mul_add(s.step_size32, *x);
    }
}

/// bitsandbytes' 8-bit blockwise CPU Adam step, in place: per block, dequantize `m` and `v`, update them and
/// the parameters, requantize (module docs).
pub(crate) fn bnb_adam8_update(
    p: &mut [f32],
    g: &[f32],
    (m_codes, m_absmax): (&mut [u8], &mut [f32]),
    (v_codes, v_absmax): (&mut [u8], &mut [f32]),
    s: &BnbScalars,
) {
    let (m_map, v_map) = (StateMap::Signed.values(), StateMap::Unsigned.values());
    let (m_lut, v_lut) = (StateMap::Signed.lut(), StateMap::Unsigned.lut());
    let mut m = [0.0f32; STATE_BLOCKSIZE];
    let mut v = [0.0f32; STATE_BLOCKSIZE];
    let blocks = p
        .chunks_mut(STATE_BLOCKSIZE)
        .zip(g.chunks(STATE_BLOCKSIZE))
        .zip(m_codes.chunks_mut(STATE_BLOCKSIZE).zip(m_absmax.iter_mut()))
        .zip(v_codes.chunks_mut(STATE_BLOCKSIZE).zip(v_absmax.iter_mut()));
    for (((pb, gb), (mc, ma)), (vc, va)) in blocks {
        let n = pb.len();
        let (m, v) = (&mut m[..n], &mut v[..n]);
        for (((((x, &gi), mi), vi), &cm), &cv) in
            pb.iter_mut().zip(gb).zip(m.iter_mut()).zip(v.iter_mut()).zip(&*mc).zip(&*vc)
        {
            (*mi, *vi) = s.moments(gi, m_map[usize::from(cm)] * *ma, v_map[usize::from(cv)] * *va);
            let denom = vi.sqrt() / s.c2 + s.eps;
            if let Some(d) = s.decay {
                *x *= d;
            }
            *x += (s.neg_step_size * *mi) / denom;
        }
        *ma = quantize_block(m, m_lut, mc);
        *va = quantize_block(v, v_lut, vc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// f32 unit roundoff `u = 2⁻²⁴`.
    const U: f64 = f32::EPSILON as f64 / 2.0;

    fn specs(lens: &[usize], lora_b: &[bool]) -> Vec<ParamSpec> {
        lens.iter().zip(lora_b).map(|(&len, &lora_b)| ParamSpec { len, lora_b }).collect()
    }

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn adam_state(opt: &Optimizer, i: usize) -> (Vec<f32>, Vec<f32>) {
        match opt.state(i) {
            State::Adam { m, v } => (m.clone(), v.clone()),
            other => panic!("expected f32 Adam state, got {other:?}"),
        }
    }

    #[test]
    fn kinds_parse_and_name() {
        for k in OptimizerKind::ALL {
            assert_eq!(OptimizerKind::parse(k.name()).unwrap(), k);
            assert_eq!(OptimizerKind::parse(&k.name().to_uppercase()).unwrap(), k);
        }
        let err = OptimizerKind::parse("adam").unwrap_err().to_string();
        assert!(err.contains("\"adam\"") && err.contains("adamw8bit") && err.contains("sgd"), "{err}");
    }

    #[test]
    fn invalid_configs_are_refused_with_the_field_named() {
        let base = OptimizerConfig::new(OptimizerKind::AdamW, 1e-3);
        base.validate().unwrap();
        let cases: Vec<(&str, OptimizerConfig)> = vec![
            ("`lr`", OptimizerConfig { lr: 0.0, ..base }),
            ("`lr`", OptimizerConfig { lr: f64::NAN, ..base }),
            ("`lr`", OptimizerConfig { lr: -1e-3, ..base }),
            ("`beta1`", OptimizerConfig { beta1: 1.0, ..base }),
            ("`beta2`", OptimizerConfig { beta2: -0.1, ..base }),
            ("`eps`", OptimizerConfig { eps: 0.0, ..base }),
            ("`weight_decay`", OptimizerConfig { weight_decay: f64::INFINITY, ..base }),
            ("`weight_decay`", OptimizerConfig { weight_decay: -0.01, ..base }),
            ("`weight_decay`", OptimizerConfig { kind: OptimizerKind::Sgd, weight_decay: 0.01, ..base }),
            ("`lora_plus_ratio`", OptimizerConfig { lora_plus_ratio: 0.0, ..base }),
            ("`max_grad_norm`", OptimizerConfig { max_grad_norm: Some(f64::NAN), ..base }),
            ("`max_grad_norm`", OptimizerConfig { max_grad_norm: Some(0.0), ..base }),
        ];
        for (field, c) in cases {
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("expected"), "{field}: {err}");
            assert!(Optimizer::new(c, &[ParamSpec { len: 1, lora_b: false }]).is_err());
        }
        assert!(Optimizer::new(base, &[]).unwrap_err().to_string().contains("at least one"));
        let err = Optimizer::new(base, &specs(&[3, 0], &[false, true])).unwrap_err().to_string();
        assert!(err.contains("params[1].len = 0"), "{err}");
        let mut opt = Optimizer::new(base, &specs(&[3], &[false])).unwrap();
        assert!(opt.set_lr(f64::INFINITY).is_err());
        assert_eq!(opt.config().lr, 1e-3);
        opt.set_lr(2e-4).unwrap();
        assert_eq!(opt.config().lr, 2e-4);
    }

    #[test]
    fn a_refused_step_changes_nothing() {
        for kind in OptimizerKind::ALL {
            let mut c = OptimizerConfig::new(kind, 1e-2);
            c.max_grad_norm = Some(0.1);
            let lens = [5, MIN_8BIT_SIZE + 3];
            let mut opt = Optimizer::new(c, &specs(&lens, &[false, true])).unwrap();
            let (mut p0, mut p1) = (values(lens[0], 1, 1.0), values(lens[1], 2, 1.0));
            let (mut g0, mut g1) = (values(lens[0], 3, 1.0), values(lens[1], 4, 1.0));
            opt.step(&mut [&mut p0, &mut p1], &mut [&mut g0, &mut g1]).unwrap();
            let (mut g0, mut g1) = (values(lens[0], 5, 1.0), values(lens[1], 6, 1.0));
            let snapshot = |o: &Optimizer| format!("{:?}", o.states);
            let (before_p, before_g, before_s) = ((p0.clone(), p1.clone()), (g0.clone(), g1.clone()), snapshot(&opt));

            g1[17] = f32::NAN;
            let err = opt.step(&mut [&mut p0, &mut p1], &mut [&mut g0, &mut g1]).unwrap_err();
            assert!(matches!(&err, Error::NonFinite { arg, index: 17, .. } if arg == "grads[1]"), "{err}");
            g1[17] = before_g.1[17];
            let err = opt.step(&mut [&mut p0, &mut p1[..10]], &mut [&mut g0, &mut g1]).unwrap_err().to_string();
            assert!(err.contains("params[1]") && err.contains(&lens[1].to_string()), "{err}");
            let err = opt.step(&mut [&mut p0, &mut p1], &mut [&mut g0[..4], &mut g1]).unwrap_err().to_string();
            assert!(err.contains("grads[0]"), "{err}");
            let err = opt.step(&mut [&mut p0], &mut [&mut g0]).unwrap_err().to_string();
            assert!(err.contains("number of parameters"), "{err}");
            let err = opt.step(&mut [&mut p0, &mut p1], &mut [&mut g0]).unwrap_err().to_string();
            assert!(err.contains("number of gradients"), "{err}");

            assert_eq!((p0.clone(), p1.clone()), before_p, "{kind}: params changed by a refused step");
            assert_eq!((g0.clone(), g1.clone()), before_g, "{kind}: grads changed by a refused step");
            assert_eq!(snapshot(&opt), before_s, "{kind}: state changed by a refused step");
            assert_eq!(opt.steps(), 1);
            // ... and the same call with valid inputs goes through.
            opt.step(&mut [&mut p0, &mut p1], &mut [&mut g0, &mut g1]).unwrap();
            assert_eq!(opt.steps(), 2);
            assert_ne!((p0, p1), before_p);
        }
    }

    #[test]
    fn adamw8bit_keeps_8bit_states_from_min_8bit_size_on() {
        let c = OptimizerConfig::new(OptimizerKind::AdamW8bit, 1e-3);
        let lens = [MIN_8BIT_SIZE - 1, MIN_8BIT_SIZE, MIN_8BIT_SIZE + 1];
        let opt = Optimizer::new(c, &specs(&lens, &[false, false, true])).unwrap();
        assert!(matches!(opt.state(0), State::Adam { .. }));
        assert!(opt.adam8bit_state(0).is_none() && opt.adam8bit_state(3).is_none());
        for (i, blocks) in [(1, 16), (2, 17)] {
            let st = opt.adam8bit_state(i).unwrap();
            assert_eq!((st.m_codes.len(), st.v_codes.len()), (lens[i], lens[i]));
            assert_eq!((st.m_absmax.len(), st.v_absmax.len()), (blocks, blocks));
        }
        let adamw =
            Optimizer::new(OptimizerConfig::new(OptimizerKind::AdamW, 1e-3), &specs(&lens, &[false; 3])).unwrap();
        assert!(adamw.adam8bit_state(1).is_none());
    }

    #[test]
    fn state_bytes_counts_the_moments() {
        let lens = [10, MIN_8BIT_SIZE, MIN_8BIT_SIZE + 1];
        let s = specs(&lens, &[false, false, true]);
        let total: usize = lens.iter().sum();
        let adam = Optimizer::new(OptimizerConfig::new(OptimizerKind::AdamW, 1e-3), &s).unwrap();
        assert_eq!(adam.state_bytes(), 8 * total);
        let sgd = Optimizer::new(OptimizerConfig::new(OptimizerKind::Sgd, 1e-3), &s).unwrap();
        assert_eq!(sgd.state_bytes(), 0);
        // AdamW8bit: f32 moments below MIN_8BIT_SIZE, else 2 bytes per element + 2 f32 per block of 256.
        let adam8 = Optimizer::new(OptimizerConfig::new(OptimizerKind::AdamW8bit, 1e-3), &s).unwrap();
        let eight = 2 * (2 * MIN_8BIT_SIZE + 1) + 8 * (16 + 17);
        assert_eq!(adam8.state_bytes(), 8 * 10 + eight);
        assert!(adam8.state_bytes() * 3 < adam.state_bytes());
    }

    /// The scalar rule of `create_dynamic_map(signed=False)` (module docs of [`DYNAMIC_MAP_UNSIGNED`]), with
    /// torch's f32 `linspace` (it computes the second half backwards from the end).
    fn unsigned_map_by_rule() -> Vec<f32> {
        let linspace = |steps: usize| -> Vec<f32> {
            let (start, end) = (0.1f32, 1.0f32);
            let step = (end - start) / (steps - 1) as f32;
            let half = steps / 2;
            (0..steps)
                .map(|i| if i < half { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 })
                .collect()
        };
        let mut v: Vec<f32> = vec![0.0, 1.0];
        for i in 0..7 {
            let s = 10f64.powi(i - 6) as f32;
            v.extend(linspace((2 << i) + 1).windows(2).map(|w| s * ((w[0] + w[1]) / 2.0)));
        }
        v.sort_by(f32::total_cmp);
        v
    }

    #[test]
    fn unsigned_map_follows_the_rule() {
        let rule = unsigned_map_by_rule();
        assert_eq!(rule.len(), 256);
        let ulps = |a: f32, b: f32| (i64::from(a.to_bits()) - i64::from(b.to_bits())).unsigned_abs();
        let differ: Vec<usize> = (0..256).filter(|&i| rule[i].to_bits() != DYNAMIC_MAP_UNSIGNED[i].to_bits()).collect();
        let worst = (0..256).map(|i| ulps(rule[i], DYNAMIC_MAP_UNSIGNED[i])).max().unwrap_or(0);
        // As for the signed map: torch's vectorised linspace rounds a few points differently from the scalar
        // formula, so the dumped literals are the truth; the rule lands within 2 ulps of every one.
        assert!(worst <= 2, "worst {worst} ulps at {differ:?}");
        assert!(differ.len() < 64, "{differ:?}");
        assert_eq!((DYNAMIC_MAP_UNSIGNED[0], DYNAMIC_MAP_UNSIGNED[255]), (0.0, 1.0));
        for map in [StateMap::Signed, StateMap::Unsigned] {
            assert!(map.values().windows(2).all(|w| w[0] < w[1]), "{map:?} sorted and distinct");
        }
        assert_eq!(StateMap::Signed.values()[127], 0.0);
    }

    /// bitsandbytes' lookup table, checked against its definition: `lut[j]` is the map entry nearest the grid
    /// point `x_j` (ties to the lower), and codes never decrease along the grid.
    #[test]
    fn lookup_table_is_the_nearest_entry_of_each_grid_point() {
        for map in [StateMap::Signed, StateMap::Unsigned] {
            let (lut, values) = (map.lut(), map.values());
            assert_eq!(lut.len(), LUT_LEN);
            assert!(lut.windows(2).all(|w| w[0] <= w[1]));
            for j in (0..LUT_LEN).step_by(97).chain([0, 32767, 32768, LUT_LEN - 1]) {
                let x = (j as f32 + j as f32) / 65535.0 - 1.0;
                let c = usize::from(lut[j]);
                let d = |i: usize| (f64::from(values[i]) - f64::from(x)).abs();
                // Thresholds are f32 midpoints: allow their rounding (half an ulp of the midpoint).
                let slack = f64::from(values[c].abs().max(1e-30)) * 1e-7;
                if c > 0 {
                    assert!(d(c) <= d(c - 1) + slack, "{map:?} j {j}: code {c}");
                }
                if c < 255 {
                    assert!(d(c) <= d(c + 1) + slack, "{map:?} j {j}: code {c}");
                }
            }
        }
        // 0 is not a grid point: it lands on x_32768 = 65536/65535 − 1 ≈ 1.53e-5, whose nearest signed entry is
        // 2.125e-5 (code 131), and whose nearest unsigned entry is 1.5625e-5 (code 7).
        assert_eq!(StateMap::Signed.lut()[32768], 131);
        assert_eq!(StateMap::Unsigned.lut()[32768], 7);
    }

    #[test]
    fn blockwise_quantization_round_trips_within_the_map_spacing() {
        let n = 3 * STATE_BLOCKSIZE + 45;
        for (map, seed) in [(StateMap::Signed, 11u64), (StateMap::Unsigned, 12)] {
            let mut x = values(n, seed, 3.0);
            if map == StateMap::Unsigned {
                x.iter_mut().for_each(|v| *v = *v * *v);
            }
            x[STATE_BLOCKSIZE..2 * STATE_BLOCKSIZE].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
            x[n - 1] = 10.0; // the partial block's absmax (the signed map has +1.0 but no −1.0)
            let (mut codes, mut absmax) = (vec![0u8; n], vec![0f32; state_blocks(n)]);
            quantize_blockwise(&x, map, &mut codes, &mut absmax).unwrap();
            assert_eq!(absmax[1], 0.0);
            assert!(codes[STATE_BLOCKSIZE..2 * STATE_BLOCKSIZE].iter().all(|&c| c == 0));
            assert_eq!(absmax[3], 10.0);
            for (b, blk) in x.chunks(STATE_BLOCKSIZE).enumerate() {
                assert_eq!(absmax[b], blk.iter().fold(0.0f32, |a, v| a.max(v.abs())));
            }
            let mut y = vec![f32::NAN; n];
            dequantize_blockwise(&codes, &absmax, map, &mut y).unwrap();
            assert_eq!(y[n - 1], x[n - 1], "the absmax element decodes exactly (code 255 = 1.0)");
            let vals = map.values();
            for k in 0..n {
                let a = absmax[k / STATE_BLOCKSIZE];
                assert_eq!(y[k].to_bits(), (vals[usize::from(codes[k])] * a).to_bits());
                if a == 0.0 {
                    continue;
                }
                // Within the larger of the two gaps around the chosen entry, plus the grid's half-spacing.
                let c = usize::from(codes[k]);
                let gap = (vals[c.min(254) + 1] - vals[c.saturating_sub(1).min(254)]).abs();
                let tol = f64::from(a) * (f64::from(gap) + 2.0 / 65535.0);
                assert!((f64::from(y[k]) - f64::from(x[k])).abs() <= tol, "{map:?} [{k}] {} vs {}", y[k], x[k]);
            }
            // Requantizing the decoded values gives the same codes (every map value sits inside its own cell).
            let (mut codes2, mut absmax2) = (vec![0u8; n], vec![0f32; state_blocks(n)]);
            quantize_blockwise(&y, map, &mut codes2, &mut absmax2).unwrap();
            // (A block whose absmax element is negative decodes it to −0.993·absmax on the signed map, so its
            // absmax shrinks and its codes shift; compare the other blocks.)
            let same = |k: &usize| absmax2[k / STATE_BLOCKSIZE] == absmax[k / STATE_BLOCKSIZE];
            let moved = (0..n).filter(same).filter(|&k| codes[k] != codes2[k]).count();
            assert!(moved * 100 <= n, "{map:?}: {moved} codes moved on requantization");
        }
    }

    #[test]
    fn blockwise_quantization_refuses_mismatched_lengths() {
        let x = vec![0.5f32; 300];
        let (mut codes, mut absmax) = (vec![9u8; 300], vec![9.0f32; 2]);
        for (c, a) in [(299usize, 2usize), (301, 2), (300, 1), (300, 3)] {
            let (mut cc, mut aa) = (vec![9u8; c], vec![9.0f32; a]);
            let err = quantize_blockwise(&x, StateMap::Signed, &mut cc, &mut aa).unwrap_err().to_string();
            assert!(err.contains("8-bit state codes") || err.contains("absmax"), "{err}");
            assert!(cc.iter().all(|&v| v == 9) && aa.iter().all(|&v| v == 9.0), "nothing written on error");
        }
        quantize_blockwise(&x, StateMap::Signed, &mut codes, &mut absmax).unwrap();
        assert_eq!(absmax, [0.5, 0.5]);
        assert!(codes.iter().all(|&c| c == 255));
        let mut out = vec![0.0f32; 299];
        assert!(dequantize_blockwise(&codes, &absmax, StateMap::Signed, &mut out).is_err());
        let mut out = vec![0.0f32; 300];
        assert!(dequantize_blockwise(&codes, &absmax[..1], StateMap::Signed, &mut out).is_err());
        assert!(out.iter().all(|&v| v == 0.0));
        // Empty input: no blocks, nothing to do.
        quantize_blockwise(&[], StateMap::Unsigned, &mut [], &mut []).unwrap();
        // Non-finite values are not refused and do not panic: NaN is skipped by the absmax.
        let mut y = vec![1.0f32; 4];
        y[1] = f32::NAN;
        y[2] = f32::INFINITY;
        let (mut c, mut a) = (vec![0u8; 4], vec![0.0f32; 1]);
        quantize_blockwise(&y, StateMap::Signed, &mut c, &mut a).unwrap();
        assert_eq!(a[0], f32::INFINITY);
    }

    /// AdamW8bit against an f64 Adam on the same (dequantized) states: the 8-bit states are the f64 moments
    /// quantized, within the map's spacing, and the parameters move like Adam's.
    #[test]
    fn adamw8bit_follows_adam_through_its_quantized_states() {
        let mut c = OptimizerConfig::new(OptimizerKind::AdamW8bit, 1e-3);
        c.weight_decay = 0.01;
        c.lora_plus_ratio = 4.0;
        let lens = [MIN_8BIT_SIZE + 100, 33];
        let mut opt = Optimizer::new(c, &specs(&lens, &[true, false])).unwrap();
        let mut params: Vec<Vec<f32>> = lens.iter().enumerate().map(|(i, &n)| values(n, 40 + i as u64, 1.0)).collect();
        // f64 moments of the small tensor, and `Σ`-magnitudes of `m` (its rounding errors scale with them).
        let (mut m_ref, mut v_ref, mut m_mag) = (vec![0.0f64; lens[1]], vec![0.0f64; lens[1]], vec![0.0f64; lens[1]]);
        for t in 1..=5u64 {
            let mut grads: Vec<Vec<f32>> =
                lens.iter().enumerate().map(|(i, &n)| values(n, 100 * t + i as u64, 0.1)).collect();
            let before = params.clone();
            // f64 Adam from lowbit's dequantized states (so that each step's check is one step deep).
            let mut m_prev = vec![0.0f32; lens[0]];
            let mut v_prev = vec![0.0f32; lens[0]];
            let st = opt.adam8bit_state(0).unwrap();
            dequantize_blockwise(st.m_codes, st.m_absmax, StateMap::Signed, &mut m_prev).unwrap();
            dequantize_blockwise(st.v_codes, st.v_absmax, StateMap::Unsigned, &mut v_prev).unwrap();
            let mut pr: Vec<&mut [f32]> = params.iter_mut().map(|p| &mut p[..]).collect();
            let mut gr: Vec<&mut [f32]> = grads.iter_mut().map(|g| &mut g[..]).collect();
            opt.step(&mut pr, &mut gr).unwrap();
            let (bc1, bc2) = (1.0 - c.beta1.powi(t as i32), 1.0 - c.beta2.powi(t as i32));
            let st = opt.adam8bit_state(0).unwrap();
            let mut m_now = vec![0.0f32; lens[0]];
            let mut v_now = vec![0.0f32; lens[0]];
            dequantize_blockwise(st.m_codes, st.m_absmax, StateMap::Signed, &mut m_now).unwrap();
            dequantize_blockwise(st.v_codes, st.v_absmax, StateMap::Unsigned, &mut v_now).unwrap();
            for k in 0..lens[0] {
                let g = f64::from(grads[0][k]);
                let m = c.beta1 * f64::from(m_prev[k]) + (1.0 - c.beta1) * g;
                let v = c.beta2 * f64::from(v_prev[k]) + (1.0 - c.beta2) * g * g;
                let b = k / STATE_BLOCKSIZE;
                // The requantized states: within the map's widest relevant gap (0.0141 of absmax for the signed
                // map's top decade, 0.0070 for the unsigned) plus the grid spacing.
                let tol_m = f64::from(st.m_absmax[b]) * (0.0141 + 2.0 / 65535.0) + 1e-12;
                let tol_v = f64::from(st.v_absmax[b]) * (0.0071 + 2.0 / 65535.0) + 1e-15;
                assert!((f64::from(m_now[k]) - m).abs() <= tol_m, "t{t} m[{k}] {} vs {m}", m_now[k]);
                assert!((f64::from(v_now[k]) - v).abs() <= tol_v, "t{t} v[{k}] {} vs {v}", v_now[k]);
                // The parameter: exact f64 Adam from the unquantized m, v of this step, relative 1e-5.
                let lr = c.lr * c.lora_plus_ratio;
                let upd = lr / bc1 * m / (v.sqrt() / bc2.sqrt() + c.eps);
                let want = f64::from(before[0][k]) * (1.0 - lr * c.weight_decay) - upd;
                let got = f64::from(params[0][k]);
                assert!((got - want).abs() <= 1e-5 * upd.abs() + 1e-6 * want.abs(), "t{t} θ[{k}] {got} vs {want}");
            }
            // The small tensor: bitsandbytes' 32-bit rule, f32 moments against f64 ones.
            let (m32, v32) = adam_state(&opt, 1);
            for k in 0..lens[1] {
                let g = f64::from(grads[1][k]);
                m_ref[k] = c.beta1 * m_ref[k] + (1.0 - c.beta1) * g;
                m_mag[k] = c.beta1 * m_mag[k] + (1.0 - c.beta1) * g.abs();
                v_ref[k] = c.beta2 * v_ref[k] + (1.0 - c.beta2) * g * g;
                assert!((f64::from(m32[k]) - m_ref[k]).abs() <= 1e-6 * m_mag[k], "t{t} small m[{k}]");
                assert!((f64::from(v32[k]) - v_ref[k]).abs() <= 1e-6 * v_ref[k], "t{t} small v[{k}]");
                let upd = c.lr / bc1 * f64::from(m32[k]) / (f64::from(v32[k]).sqrt() / bc2.sqrt() + c.eps);
                let want = f64::from(before[1][k]) * (1.0 - c.lr * c.weight_decay) - upd;
                let got = f64::from(params[1][k]);
                assert!(
                    (got - want).abs() <= 1e-6 * upd.abs() + 1e-6 * want.abs(),
                    "t{t} small θ[{k}] {got} vs {want}"
                );
            }
        }
    }

    /// One exact (f64) AdamW step from the given f32 state: returns (θ', m', v') and the update magnitude
    /// `|lr_p/bc1 · m'/(√v'/√bc2 + eps)|` computed from the *f32* moments the optimizer produced, so that the
    /// parameter check isolates the parameter update's own rounding.
    fn adamw_exact(
        c: &OptimizerConfig,
        lr: f64,
        t: u64,
        (p, g, m, v): (f32, f32, f32, f32),
        (m32, v32): (f32, f32),
    ) -> (f64, f64, f64, f64) {
        let (p, g, m, v) = (f64::from(p), f64::from(g), f64::from(m), f64::from(v));
        let m_new = c.beta1 * m + (1.0 - c.beta1) * g;
        let v_new = c.beta2 * v + (1.0 - c.beta2) * g * g;
        let bc1 = 1.0 - c.beta1.powi(t as i32);
        let bc2 = 1.0 - c.beta2.powi(t as i32);
        let upd = lr / bc1 * f64::from(m32) / (f64::from(v32).sqrt() / bc2.sqrt() + c.eps);
        let p_new = p * (1.0 - lr * c.weight_decay) - upd;
        (p_new, m_new, v_new, upd.abs())
    }

    /// Runs `steps` steps of AdamW or SGD on random data and checks every step against the exact f64 rule
    /// applied to the f32 state before that step. Bounds (`u = 2⁻²⁴`; every f32 operation rounds with relative
    /// error ≤ u, scalars converted from f64 to f32 too):
    /// * `m' = m + w(g − m)` via one fma: roundings of the weight (`≤ u·|w|`, and `w − 1` is exact), of
    ///   `g − m` and of the fma: `|Δm| ≤ u·|m'| + 2u·(|g| + |m|)` (first order; checked with factor 2 slack);
    /// * `v' = β2·v + (1 − β2)·g²`, all terms ≥ 0: 2 roundings per term plus the fma's: `|Δv| ≤ 3u·v'` (slack 2);
    /// * θ: the decay factor and product (2u·|θ|), the update's 8 roundings (√, `f32(√bc2)`, ÷, `f32(eps)`,
    ///   +, `f32(step)`, ×, ÷: ≤ 8u relative) and the final add (u·|θ'|): `|Δθ| ≤ 2u|θ| + 8u·|upd| + u|θ'|`
    ///   (slack 2);
    /// * SGD `θ' = θ − lr·g`: `f32(lr)` and the fma: `|Δθ| ≤ u·|lr·g| + u·|θ'|` (slack 2).
    fn check_against_exact(kind: OptimizerKind, c: OptimizerConfig, lens: &[usize], lora: &[bool], seed: u64) {
        let s = specs(lens, lora);
        let mut opt = Optimizer::new(OptimizerConfig { kind, ..c }, &s).unwrap();
        let mut params: Vec<Vec<f32>> =
            lens.iter().enumerate().map(|(i, &n)| values(n, seed + i as u64, 1.0)).collect();
        for t in 1..=4u64 {
            let mut grads: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| values(n, seed * 31 + t * 7 + i as u64, [0.01, 1.0, 0.1, 3.0][t as usize - 1]))
                .collect();
            let before: Vec<Vec<f32>> = params.clone();
            let states: Vec<(Vec<f32>, Vec<f32>)> = (0..lens.len())
                .map(|i| if kind == OptimizerKind::Sgd { (vec![], vec![]) } else { adam_state(&opt, i) })
                .collect();
            let exact_norm = grads.iter().flatten().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            let mut pr: Vec<&mut [f32]> = params.iter_mut().map(|p| &mut p[..]).collect();
            let mut gr: Vec<&mut [f32]> = grads.iter_mut().map(|g| &mut g[..]).collect();
            let stats = opt.step(&mut pr, &mut gr).unwrap();
            assert_eq!(stats.step, t);
            assert!((stats.grad_norm - exact_norm).abs() <= 1e-12 * exact_norm);
            // The clip coefficient: exact `max/(norm + 1e-6)` vs f32 (norm, 1e-6, +, ÷, f32(max), ×: ≤ 6u).
            let coef = c.max_grad_norm.map_or(1.0, |mx| (mx / (exact_norm + 1e-6)).min(1.0));
            assert!((f64::from(stats.clip_coef) - coef).abs() <= 2.0 * 6.0 * U * coef, "{} vs {coef}", stats.clip_coef);
            for i in 0..lens.len() {
                let lr = c.lr * if lora[i] { c.lora_plus_ratio } else { 1.0 };
                for k in 0..lens[i] {
                    let g = grads[i][k]; // clipped in place by the step
                    let (p_new, p_old) = (f64::from(params[i][k]), f64::from(before[i][k]));
                    if kind == OptimizerKind::Sgd {
                        let exact = p_old - lr * f64::from(g);
                        let bound = 2.0 * U * ((lr * f64::from(g)).abs() + exact.abs());
                        assert!((p_new - exact).abs() <= bound, "sgd t{t} p{i}[{k}]: {p_new} vs {exact}");
                        continue;
                    }
                    let (m32, v32) = match opt.state(i) {
                        State::Adam { m, v } => (m[k], v[k]),
                        _ => unreachable!(),
                    };
                    let (m_old, v_old) = (states[i].0[k], states[i].1[k]);
                    let (pe, me, ve, upd) = adamw_exact(&c, lr, t, (before[i][k], g, m_old, v_old), (m32, v32));
                    let mb = 2.0 * (U * me.abs() + 2.0 * U * (f64::from(g).abs() + f64::from(m_old).abs()));
                    assert!((f64::from(m32) - me).abs() <= mb, "m t{t} p{i}[{k}]: {m32} vs {me}");
                    assert!((f64::from(v32) - ve).abs() <= 2.0 * 3.0 * U * ve, "v t{t} p{i}[{k}]: {v32} vs {ve}");
                    let pb = 2.0 * (2.0 * U * p_old.abs() + 8.0 * U * upd + U * pe.abs());
                    assert!((p_new - pe).abs() <= pb, "θ t{t} p{i}[{k}]: {p_new} vs {pe} (bound {pb})");
                }
            }
        }
    }

    #[test]
    fn adamw_matches_the_exact_rule() {
        let mut c = OptimizerConfig::new(OptimizerKind::AdamW, 1e-2);
        c.weight_decay = 0.01;
        c.lora_plus_ratio = 16.0;
        check_against_exact(OptimizerKind::AdamW, c, &[33, 7, 300], &[false, true, false], 1);
        c.max_grad_norm = Some(1.0);
        c.beta1 = 0.2; // w = 0.8: torch's other lerp branch
        check_against_exact(OptimizerKind::AdamW, c, &[33, 7, 300], &[false, true, false], 2);
    }

    #[test]
    fn sgd_matches_the_exact_rule() {
        let mut c = OptimizerConfig::new(OptimizerKind::Sgd, 0.1);
        c.lora_plus_ratio = 4.0;
        check_against_exact(OptimizerKind::Sgd, c, &[17, 64], &[true, false], 3);
        c.max_grad_norm = Some(0.5);
        check_against_exact(OptimizerKind::Sgd, c, &[17, 64], &[true, false], 4);
    }

    #[test]
    fn lora_plus_scales_the_b_learning_rate() {
        // SGD makes the rate visible: the same gradient moves B `ratio` times as far as A.
        let mut c = OptimizerConfig::new(OptimizerKind::Sgd, 0.125);
        c.lora_plus_ratio = 8.0;
        let mut opt = Optimizer::new(c, &specs(&[1, 1], &[false, true])).unwrap();
        let (mut a, mut b) = ([0.0f32], [0.0f32]);
        opt.step(&mut [&mut a, &mut b], &mut [&mut [1.0], &mut [1.0]]).unwrap();
        assert_eq!((a[0], b[0]), (-0.125, -1.0));
        // Adam's first step moves every element by ≈ lr_p·sign(g) whatever the gradient's size.
        c.kind = OptimizerKind::AdamW;
        c.lr = 1e-3;
        let mut opt = Optimizer::new(c, &specs(&[2, 2], &[false, true])).unwrap();
        let (mut a, mut b) = ([0.0f32; 2], [0.0f32; 2]);
        opt.step(&mut [&mut a, &mut b], &mut [&mut [3.0, -1e-3], &mut [5.0, -0.5]]).unwrap();
        for (x, want) in a.iter().chain(&b).zip([-1e-3, 1e-3, -8e-3, 8e-3]) {
            assert!((f64::from(*x) - want).abs() < 1e-5 * want.abs().max(1e-3) + 1e-8, "{x} vs {want}");
        }
    }

    #[test]
    fn clipping_scales_to_max_norm_only_above_it() {
        let mut c = OptimizerConfig::new(OptimizerKind::Sgd, 1.0);
        c.max_grad_norm = Some(1.0);
        let mut opt = Optimizer::new(c, &specs(&[2, 1], &[false, false])).unwrap();
        let (mut p, mut q) = ([0.0f32; 2], [0.0f32]);
        let (mut g, mut h) = ([3.0f32, 0.0], [4.0f32]); // norm 5
        let s = opt.step(&mut [&mut p, &mut q], &mut [&mut g, &mut h]).unwrap();
        assert_eq!(s.grad_norm, 5.0);
        assert!((s.clip_coef - 0.2).abs() < 1e-6, "{s:?}");
        let clipped = (f64::from(g[0]).powi(2) + f64::from(h[0]).powi(2)).sqrt();
        assert!((clipped - 1.0).abs() < 1e-6, "{clipped}");
        assert_eq!((p[0], q[0]), (-g[0], -h[0]));
        let (mut g, mut h) = ([0.3f32, 0.0], [0.4f32]); // norm 0.5: untouched
        let s = opt.step(&mut [&mut p, &mut q], &mut [&mut g, &mut h]).unwrap();
        assert_eq!((s.clip_coef, g, h), (1.0, [0.3, 0.0], [0.4]));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn random_configs_match_the_exact_rule(
            lens in proptest::collection::vec(1usize..70, 1..4),
            lr_exp in -5i32..-1,
            wd in prop_oneof![Just(0.0), 0.0f64..0.1],
            beta1 in 0.0f64..0.99,
            beta2 in 0.9f64..0.9999,
            ratio in 1.0f64..20.0,
            clip in prop_oneof![Just(None), (0.05f64..5.0).prop_map(Some)],
            sgd in any::<bool>(),
            seed in 0u64..1000,
        ) {
            let lora: Vec<bool> = (0..lens.len()).map(|i| i % 2 == 1).collect();
            let kind = if sgd { OptimizerKind::Sgd } else { OptimizerKind::AdamW };
            let c = OptimizerConfig {
                kind,
                lr: 10f64.powi(lr_exp),
                beta1,
                beta2,
                eps: 1e-8,
                weight_decay: if sgd { 0.0 } else { wd },
                lora_plus_ratio: ratio,
                max_grad_norm: clip,
            };
            check_against_exact(kind, c, &lens, &lora, seed);
        }
    }
}

//! Fused dequantize-matmul-plus-LoRA on the CPU: the kernel bodies (generic over the vector type and the 4-bit
//! decoder) and the portable table. `linear.rs` drives them.
//!
//! The driver splits the work by output features into fixed blocks of 64 rows of `W` (one rayon task each),
//! so results never depend on the thread count. Inside a block the loop runs over chunks of [`KC`] input
//! features: each `[TILE_ROWS × KC]` tile of `W` is decoded once into L1-resident scratch (values bit-identical
//! to the reference dequantization) and multiplied against every row of `x` by a register-blocked micro-kernel
//! (`MR` rows of `x` × `NR` rows of `W`, one SIMD accumulator each). At M = 1 this streams the packed weight once (a GEMV);
//! at larger M the same decoded tile is reused by all M rows (a GEMM). The LoRA shrink `t = x·Aᵀ` is computed
//! once per row before the pass; bias and the expand `s·t·Bᵀ` are added in the same output pass.
//!
//! The micro-kernels are generic over a small vector trait [`Vf`] and instantiated three times: portable
//! (`wide::f32x8`, multiply then add), and inside `#[target_feature]` wrappers with `__m256` (AVX2 + FMA) and
//! `__m512` (AVX-512), fused multiply-add. The 4-bit decode uses table lookups in registers on x86
//! (`linear_x86.rs`) and a 256-entry byte→pair table elsewhere.

use super::table::{Job, LinearKernels};
use crate::format::affine::Granularity;
use crate::format::layer::QuantWeight;

/// Input features per chunk (the K-blocking of the GEMM).
pub(crate) const KC: usize = 1024;
/// Rows of `W` decoded per tile (`TILE_ROWS × KC` f32 = 16 KiB: fits L1 next to the `x` chunk). Chosen by
/// timing 4×1024 against 16×256 at M = 8 and 64 (4096×14336): 4×1024 was 1.7× faster.
const TILE_ROWS: usize = 4;
/// Up to this many rows of `x`, the weight is swept tile by tile along K (GEMV order).
pub(crate) const GEMV_MAX_M: usize = 8;
/// Micro-kernel: rows of `x` × rows of `W`, each a 16-lane accumulator.
const MR: usize = 4;
const NR: usize = 4;

/// Decodes 4-bit weights: `out[i] = table[code(flat + i)] * scales[(flat + i) >> shift]`, bit-identical to
/// the reference dequantization. `shift = log2(blocksize)`; the range may cross block boundaries.
pub(crate) trait Decoder {
    fn four_bit(
        packed: &[u8],
        flat: usize,
        table: &[f32; 16],
        pairs: &[[f32; 2]; 256],
        scales: &[f32],
        shift: u32,
        out: &mut [f32],
    );
}

/// `N` consecutive rows of `len` values of a row-major `data`, starting at row `first` (the rows of `x`, of
/// packed codes or of block scales a register GEMV walks side by side).
#[inline(always)]
pub(crate) fn row_slices<T, const N: usize>(data: &[T], len: usize, first: usize) -> [&[T]; N] {
    std::array::from_fn(|i| &data[(first + i) * len..(first + i + 1) * len])
}

/// Portable 4-bit decoding through a 256-entry table of (high nibble, low nibble) values.
pub(crate) struct PortableDecoder;

impl Decoder for PortableDecoder {
    #[inline(always)]
    fn four_bit(
        packed: &[u8],
        flat: usize,
        table: &[f32; 16],
        pairs: &[[f32; 2]; 256],
        scales: &[f32],
        shift: u32,
        out: &mut [f32],
    ) {
        four_bit_segments(packed, flat, table, pairs, scales, shift, out)
    }
}

/// Splits a range at block boundaries and decodes each piece with [`four_bit_pairs`].
#[inline(always)]
pub(crate) fn four_bit_segments(
    packed: &[u8],
    flat: usize,
    table: &[f32; 16],
    pairs: &[[f32; 2]; 256],
    scales: &[f32],
    shift: u32,
    out: &mut [f32],
) {
    let (mut f, end) = (flat, flat + out.len());
    while f < end {
        let seg_end = (((f >> shift) + 1) << shift).min(end);
        four_bit_pairs(packed, f, table, pairs, scales[f >> shift], &mut out[f - flat..seg_end - flat]);
        f = seg_end;
    }
}

/// Scalar-friendly decode shared by every decoder for heads and tails.
#[inline(always)]
pub(crate) fn four_bit_pairs(
    packed: &[u8],
    flat: usize,
    table: &[f32; 16],
    pairs: &[[f32; 2]; 256],
    scale: f32,
    out: &mut [f32],
) {
    let mut i = 0;
    let n = out.len();
    if flat & 1 == 1 && n > 0 {
        out[0] = table[(packed[flat >> 1] & 15) as usize] * scale;
        i = 1;
    }
    let start = (flat + i) >> 1;
    let pairs_n = (n - i) / 2;
    for (j, &byte) in packed[start..start + pairs_n].iter().enumerate() {
        let [h, l] = pairs[byte as usize];
        out[i + 2 * j] = h * scale;
        out[i + 2 * j + 1] = l * scale;
    }
    i += 2 * pairs_n;
    if i < n {
        out[i] = table[(packed[(flat + i) >> 1] >> 4) as usize] * scale;
    }
}

/// Decodes a tile: rows `o0..o0+rows` of `W`, columns `k0..k0+kc`, into `tile[j * KC ..]`.
#[inline(always)]
pub(crate) fn decode_tile<D: Decoder>(job: &Job<'_>, o0: usize, rows: usize, k0: usize, kc: usize, tile: &mut [f32]) {
    let n_in = job.layer.in_features;
    for j in 0..rows {
        let o = o0 + j;
        let out = &mut tile[j * KC..j * KC + kc];
        match job.layer.weight {
            QuantWeight::Int8(t) => {
                let codes = &t.codes()[o * n_in + k0..o * n_in + k0 + kc];
                // Runs of one scale and zero point (the whole row per tensor and per channel: one pass).
                let runs = Int8Runs::of(t.granularity(), n_in);
                let mut k = k0;
                while k < k0 + kc {
                    let end = ((k / runs.run + 1) * runs.run).min(k0 + kc);
                    let e = runs.entry(o, k / runs.run);
                    let (c, d) = (&codes[k - k0..end - k0], &mut out[k - k0..end - k0]);
                    int8_run(c, t.scales()[e], t.zero_points()[e], d);
                    k = end;
                }
            }
            QuantWeight::FourBit(t) => {
                let shift = t.blocksize().trailing_zeros();
                D::four_bit(t.packed(), o * n_in + k0, t.table(), job.pairs, job.layer.block_scales(), shift, out);
            }
        }
    }
}

/// `out[i] = (codes[i] - zero_point) * scale`: the exact integer difference times the scale, one rounding.
#[inline(always)]
fn int8_run(codes: &[u8], scale: f32, zero_point: u8, out: &mut [f32]) {
    let zp = zero_point as f32;
    for (d, &c) in out.iter_mut().zip(codes) {
        *d = (c as f32 - zp) * scale;
    }
}

/// A vector of f32 lanes, as the micro-kernels need it. Implemented by `wide::f32x8` (portable, separate
/// multiply and add) and by `__m256` / `__m512` in `linear_x86.rs` (fused multiply-add).
// Some methods are used only by the x86 kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) trait Vf: Copy {
    /// Lanes per vector.
    const LANES: usize;
    fn zero() -> Self;
    /// Every lane set to `v`.
    fn splat(v: f32) -> Self;
    /// `a * b` lane by lane.
    fn mul(a: Self, b: Self) -> Self;
    /// Stores the lanes to `dst[0..LANES]` (caller guarantees the length).
    fn store(self, dst: &mut [f32]);
    /// Loads `LANES` floats from `s[0..LANES]` (caller guarantees the length).
    fn load(s: &[f32]) -> Self;
    /// `a * b + c`.
    fn fmadd(a: Self, b: Self, c: Self) -> Self;
    /// Sum of the lanes in a fixed order.
    fn hsum(self) -> f32;
    /// The LoRA expand of one row over a block: `y[j] += s · Σ_k t[k]·b[j·rank + k]` for every `j`
    /// (`t.len() == rank`, `b.len() == y.len() · rank`). One [`dot`] per output unless a vector type has a
    /// faster form.
    #[inline(always)]
    fn expand(t: &[f32], b: &[f32], s: f32, y: &mut [f32]) {
        let rank = t.len();
        for (j, y) in y.iter_mut().enumerate() {
            *y += s * dot::<Self>(t, &b[j * rank..(j + 1) * rank]);
        }
    }
}

impl Vf for wide::f32x8 {
    const LANES: usize = 8;
    #[inline(always)]
    fn zero() -> Self {
        wide::f32x8::ZERO
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        wide::f32x8::splat(v)
    }
    #[inline(always)]
    fn mul(a: Self, b: Self) -> Self {
        a * b
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        dst[..8].copy_from_slice(&self.to_array());
    }
    #[inline(always)]
    fn load(s: &[f32]) -> Self {
        wide::f32x8::new(s[..8].try_into().expect("8 lanes"))
    }
    #[inline(always)]
    fn fmadd(a: Self, b: Self, c: Self) -> Self {
        a * b + c
    }
    #[inline(always)]
    fn hsum(self) -> f32 {
        self.reduce_add()
    }
}

/// `acc[i][j] += Σ_k x_i[k] · w_j[k]` over one chunk for `R` rows of `x` and `NR` rows of `W`, one vector
/// accumulator per pair, lanes summed once per chunk; a scalar tail finishes `kc % LANES`.
#[inline(always)]
fn micro_kernel<V: Vf, const R: usize>(xs: [&[f32]; MR], ws: [&[f32]; NR], kc: usize, acc: &mut [[f32; NR]; MR]) {
    // Every slice holds at least `kc` floats: checked once here, so the loads below need no checks.
    assert!(xs.iter().take(R).chain(ws.iter()).all(|s| s.len() >= kc));
    let mut v = [[V::zero(); NR]; R];
    let full = kc / V::LANES * V::LANES;
    let mut k = 0;
    while k < full {
        let mut w = [V::zero(); NR];
        for j in 0..NR {
            // SAFETY: k + LANES <= full <= kc <= ws[j].len() (asserted above).
            w[j] = V::load(unsafe { ws[j].get_unchecked(k..k + V::LANES) });
        }
        for i in 0..R {
            // SAFETY: k + LANES <= kc <= xs[i].len() (asserted above).
            let xv = V::load(unsafe { xs[i].get_unchecked(k..k + V::LANES) });
            for j in 0..NR {
                v[i][j] = V::fmadd(xv, w[j], v[i][j]);
            }
        }
        k += V::LANES;
    }
    for i in 0..R {
        for j in 0..NR {
            let mut tail = 0.0f32;
            for kk in full..kc {
                tail += xs[i][kk] * ws[j][kk];
            }
            acc[i][j] += v[i][j].hsum() + tail;
        }
    }
}

/// `out[k] = dot(x, rows[k·n..(k + 1)·n])` for every `k < out.len()`, `n = x.len()` (the LoRA shrink of
/// one row of `x` against consecutive rows of `A`).
#[inline(always)]
pub(crate) fn dots<V: Vf>(x: &[f32], rows: &[f32], out: &mut [f32]) {
    let n = x.len();
    assert!(rows.len() >= out.len() * n);
    for (k, o) in out.iter_mut().enumerate() {
        *o = dot::<V>(x, &rows[k * n..(k + 1) * n]);
    }
}

/// Dot product with one vector accumulator (used for the LoRA shrink and expand).
#[inline(always)]
pub(crate) fn dot<V: Vf>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n / V::LANES * V::LANES;
    let mut acc = V::zero();
    let mut k = 0;
    while k < full {
        acc = V::fmadd(V::load(&a[k..]), V::load(&b[k..]), acc);
        k += V::LANES;
    }
    let mut tail = 0.0f32;
    for kk in full..n {
        tail += a[kk] * b[kk];
    }
    acc.hsum() + tail
}

/// One tile of `W` (rows `t0..t0+TILE_ROWS` of the block, K-chunk at `k0`) decoded and multiplied into `out`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_pass<V: Vf, D: Decoder>(
    job: &Job<'_>,
    o0: usize,
    ob: usize,
    t0: usize,
    k0: usize,
    tile: &mut [f32],
    zeros: &[f32; KC],
    out: &mut [f32],
) {
    let (n_in, m) = (job.layer.in_features, job.m);
    let kc = KC.min(n_in - k0);
    let rows = TILE_ROWS.min(ob - t0);
    decode_tile::<D>(job, o0 + t0, rows, k0, kc, tile);
    let mut i0 = 0;
    while i0 < m {
        let xs: [&[f32]; MR] = std::array::from_fn(|i| {
            let r = i0 + i;
            if r < m {
                &job.x[r * n_in + k0..r * n_in + k0 + kc]
            } else {
                &zeros[..kc]
            }
        });
        let mut j0 = 0;
        while j0 < rows {
            let ws: [&[f32]; NR] = std::array::from_fn(|j| {
                if j0 + j < rows {
                    &tile[(j0 + j) * KC..(j0 + j) * KC + kc]
                } else {
                    &zeros[..kc]
                }
            });
            let mut acc = [[0.0f32; NR]; MR];
            match m - i0 {
                1 => micro_kernel::<V, 1>(xs, ws, kc, &mut acc),
                2 => micro_kernel::<V, 2>(xs, ws, kc, &mut acc),
                3 => micro_kernel::<V, 3>(xs, ws, kc, &mut acc),
                _ => micro_kernel::<V, MR>(xs, ws, kc, &mut acc),
            }
            for (i, acc_row) in acc.iter().enumerate().take((m - i0).min(MR)) {
                let y_row = &mut out[(i0 + i) * ob..(i0 + i + 1) * ob];
                for (j, a) in acc_row.iter().enumerate().take((rows - j0).min(NR)) {
                    y_row[t0 + j0 + j] += a;
                }
            }
            j0 += NR;
        }
        i0 += MR;
    }
}

/// Computes `y[:, o0..o0+ob]` into `out` (`[m, ob]` row-major): the base product through decoded tiles, then
/// the output pass.
#[inline(always)]
pub(crate) fn block_job<V: Vf, D: Decoder>(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    tiled_product::<V, D>(job, o0, ob, out);
    output_pass::<V>(job, o0, ob, out);
}

/// `out += x · W[o0..o0+ob]ᵀ` through decoded tiles (any format, any alignment).
#[inline(always)]
pub(crate) fn tiled_product<V: Vf, D: Decoder>(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    let (n_in, m) = (job.layer.in_features, job.m);
    let zeros = [0.0f32; KC];
    // 16 KiB on the stack: no allocation per block.
    let mut tile = [0.0f32; TILE_ROWS * KC];
    // Both orders add the chunks of each output in the same order (k ascending), so they give the same bits.
    if m <= GEMV_MAX_M {
        // Few rows of x (all in cache): sweep each tile of W across all of K, so the packed weight is read as a
        // few long contiguous streams.
        for t0 in (0..ob).step_by(TILE_ROWS) {
            for k0 in (0..n_in).step_by(KC) {
                tile_pass::<V, D>(job, o0, ob, t0, k0, &mut tile, &zeros, out);
            }
        }
    } else {
        // Many rows: keep one K-chunk of x (m × KC) hot in L2 while every tile of W passes over it.
        for k0 in (0..n_in).step_by(KC) {
            for t0 in (0..ob).step_by(TILE_ROWS) {
                tile_pass::<V, D>(job, o0, ob, t0, k0, &mut tile, &zeros, out);
            }
        }
    }
}

/// Adds the bias and each applicable adapter's expand term `s·t·Bᵀ` to `out` (`[m, ob]`).
#[inline(always)]
pub(crate) fn output_pass<V: Vf>(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    let layer = job.layer;
    if let Some(d) = &job.deferred {
        d.finish();
    }
    for r in 0..job.m {
        let y_row = &mut out[r * ob..(r + 1) * ob];
        if let Some(b) = layer.bias {
            for (y, b) in y_row.iter_mut().zip(&b[o0..o0 + ob]) {
                *y += b;
            }
        }
        for a in layer.adapters_for_row(job.sel, r) {
            let ad = &layer.adapters[a];
            if !job.used[a] {
                continue;
            }
            let rank = ad.rank();
            let t_row = match &job.deferred {
                Some(d) => d.row(a, r, rank),
                None => &job.shrink[a][r * rank..(r + 1) * rank],
            };
            V::expand(t_row, &ad.b()[o0 * rank..(o0 + ob) * rank], ad.scaling(), y_row);
        }
    }
}

/// How the rows of an int8 weight split into runs of one scale and zero point: `run` inputs each (the whole
/// row per tensor and per channel, a group otherwise), `per_row` runs per row (the last group may be short).
#[derive(Clone, Copy)]
pub(crate) struct Int8Runs {
    granularity: Granularity,
    pub run: usize,
    per_row: usize,
}

impl Int8Runs {
    pub(crate) fn of(granularity: Granularity, n_in: usize) -> Int8Runs {
        let (run, per_row) = match granularity {
            Granularity::PerTensor | Granularity::PerChannel => (n_in, 1),
            Granularity::PerGroup(g) => (g, n_in.div_ceil(g.max(1))),
        };
        Int8Runs { granularity, run, per_row }
    }

    /// The parameter entry of run `gi` of output row `o`.
    #[inline(always)]
    pub(crate) fn entry(&self, o: usize, gi: usize) -> usize {
        match self.granularity {
            Granularity::PerTensor => 0,
            Granularity::PerChannel => o,
            Granularity::PerGroup(_) => o * self.per_row + gi,
        }
    }

    /// Whether `job` suits the register int8 GEMVs that share `x` across weight rows: an int8 weight, M ≤ 4,
    /// and rows made of whole runs that are multiples of 16 inputs.
    #[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
    pub(crate) fn whole_sixteens(job: &Job<'_>) -> bool {
        let QuantWeight::Int8(t) = job.layer.weight else { return false };
        let (n_in, m) = (job.layer.in_features, job.m);
        let run = Int8Runs::of(t.granularity(), n_in).run;
        (1..=4).contains(&m) && run > 0 && run.is_multiple_of(16) && n_in.is_multiple_of(run)
    }
}

/// The portable (`wide`) linear kernels.
pub(crate) const PORTABLE: LinearKernels = LinearKernels {
    block: block_job::<wide::f32x8, PortableDecoder>,
    dots: super::linear_kernels::dots::<wide::f32x8>,
    // One dot product per row: a row's bits never depend on the rows beside it.
    dots_half: |x, rows, out, _| super::linear_kernels::dots::<wide::f32x8>(x, rows, out),
    act8_block: super::linear_act8::block_portable,
    pack_x: None,
    act8_quantize: super::linear_act8::quantize_portable,
    act8_interleaved: false,
    act8_layout: super::linear_act8::Act8Layout::Natural,
    backward_cols: super::linear_backward_kernels::backward_cols::<wide::f32x8, PortableDecoder>,
};

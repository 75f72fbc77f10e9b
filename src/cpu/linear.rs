//! Fused dequantize-matmul-plus-LoRA on the CPU.
//!
//! Work is split by output features into fixed blocks of [`OUT_BLOCK`] rows of `W` (one rayon task each), so
//! results never depend on the thread count. Inside a block the loop runs over chunks of [`KC`] input
//! features: each `[TILE_ROWS × KC]` tile of `W` is decoded once into L1-resident scratch (values bit-identical
//! to the reference dequantization) and multiplied against every row of `x` by a register-blocked micro-kernel
//! (`MR` rows of `x` × `NR` rows of `W`, 16 lanes each). At M = 1 this streams the packed weight once (a GEMV);
//! at larger M the same decoded tile is reused by all M rows (a GEMM). The LoRA shrink `t = x·Aᵀ` is computed
//! once per row before the pass; bias and the expand `s·t·Bᵀ` are added in the same output pass.
//!
//! The micro-kernels are written as plain fixed-size loops and compiled three times: portable (mul + add), and
//! inside `#[target_feature]` wrappers for AVX2+FMA and AVX-512 (fused multiply-add), where LLVM vectorizes
//! them to the full register width. The 4-bit decode uses table lookups in registers on x86
//! (`linear_x86.rs`) and a 256-entry byte→pair table elsewhere.

use crate::affine::Granularity;
use crate::cpu::{Isa, Path};
use crate::linear::{AdapterSelection, QuantLinear, QuantWeight};

/// Input features per chunk (the K-blocking of the GEMM).
pub(crate) const KC: usize = 256;
/// Rows of `W` decoded per tile (`TILE_ROWS × KC` f32 = 16 KiB: fits L1 next to the `x` chunk).
const TILE_ROWS: usize = 16;
/// Output features per task.
const OUT_BLOCK: usize = 64;
/// Micro-kernel: rows of `x` × rows of `W`, each a 16-lane accumulator.
const MR: usize = 4;
const NR: usize = 4;
const LANES: usize = 16;

/// Decodes `W[o, k0..k0 + out.len()]` into `out`, bit-identical to the reference dequantization.
pub(crate) trait Decoder {
    fn four_bit(packed: &[u8], flat: usize, table: &[f32; 16], pairs: &[[f32; 2]; 256], scale: f32, out: &mut [f32]);
}

/// Portable 4-bit decoding through a 256-entry table of (high nibble, low nibble) values.
pub(crate) struct PortableDecoder;

impl Decoder for PortableDecoder {
    #[inline(always)]
    fn four_bit(packed: &[u8], flat: usize, table: &[f32; 16], pairs: &[[f32; 2]; 256], scale: f32, out: &mut [f32]) {
        four_bit_pairs(packed, flat, table, pairs, scale, out)
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

/// Everything a block job needs, borrowed from the layer.
pub(crate) struct Job<'a> {
    pub layer: &'a QuantLinear,
    pub x: &'a [f32],
    pub m: usize,
    pub pairs: &'a [[f32; 2]; 256],
    /// Per adapter: `Some(t)` with `t[row * rank + r]` for rows that use it (zeros elsewhere).
    pub shrink: &'a [Option<Vec<f32>>],
    pub sel: AdapterSelection<'a>,
}

/// Decodes a tile: rows `o0..o0+rows` of `W`, columns `k0..k0+kc`, into `tile[j * KC ..]`.
#[inline(always)]
fn decode_tile<D: Decoder>(job: &Job<'_>, o0: usize, rows: usize, k0: usize, kc: usize, tile: &mut [f32]) {
    let n_in = job.layer.in_features();
    for j in 0..rows {
        let o = o0 + j;
        let out = &mut tile[j * KC..j * KC + kc];
        match job.layer.weight() {
            QuantWeight::Int8(t) => {
                let codes = &t.codes()[o * n_in + k0..o * n_in + k0 + kc];
                let run = |entry: usize, codes: &[u8], out: &mut [f32]| {
                    let scale = t.scales()[entry];
                    let zp = t.zero_points()[entry] as f32;
                    for (d, &c) in out.iter_mut().zip(codes) {
                        // (c - zp) is an exact small integer: one rounding, as the reference.
                        *d = (c as f32 - zp) * scale;
                    }
                };
                match t.granularity() {
                    Granularity::PerTensor => run(0, codes, out),
                    Granularity::PerChannel => run(o, codes, out),
                    Granularity::PerGroup(g) => {
                        let per_row = n_in.div_ceil(g);
                        let mut k = k0;
                        while k < k0 + kc {
                            let end = ((k / g + 1) * g).min(k0 + kc);
                            run(o * per_row + k / g, &codes[k - k0..end - k0], &mut out[k - k0..end - k0]);
                            k = end;
                        }
                    }
                }
            }
            QuantWeight::FourBit(t) => {
                let bs = t.blocksize();
                let scales = &job.layer.block_scales;
                let mut f = o * n_in + k0;
                let end = f + kc;
                while f < end {
                    let seg_end = ((f / bs + 1) * bs).min(end);
                    let off = f - (o * n_in + k0);
                    D::four_bit(t.packed(), f, t.table(), job.pairs, scales[f / bs], &mut out[off..off + seg_end - f]);
                    f = seg_end;
                }
            }
        }
    }
}

/// `acc[i][j] += Σ_k x_i[k] · w_j[k]` over one chunk, 16 lanes per pair, lanes summed in a fixed tree.
#[inline(always)]
fn micro_kernel<const FMA: bool>(xs: [&[f32]; MR], ws: [&[f32]; NR], kc: usize, acc: &mut [[f32; NR]; MR]) {
    let mut lanes = [[[0.0f32; LANES]; NR]; MR];
    let full = kc / LANES * LANES;
    let mut k = 0;
    while k < full {
        for i in 0..MR {
            let xv: &[f32; LANES] = xs[i][k..k + LANES].try_into().expect("16 lanes");
            for j in 0..NR {
                let wv: &[f32; LANES] = ws[j][k..k + LANES].try_into().expect("16 lanes");
                for l in 0..LANES {
                    lanes[i][j][l] = fmadd::<FMA>(xv[l], wv[l], lanes[i][j][l]);
                }
            }
        }
        k += LANES;
    }
    for i in 0..MR {
        for j in 0..NR {
            for (l, kk) in (full..kc).enumerate() {
                lanes[i][j][l] = fmadd::<FMA>(xs[i][kk], ws[j][kk], lanes[i][j][l]);
            }
            acc[i][j] += sum_lanes(&lanes[i][j]);
        }
    }
}

#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn sum_lanes(v: &[f32; LANES]) -> f32 {
    let mut h = *v;
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            h[l] += h[l + w];
        }
        w /= 2;
    }
    h[0]
}

/// Dot product with 16 lane accumulators (used for the LoRA shrink).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let full = a.len() / LANES * LANES;
    for (ca, cb) in a[..full].chunks_exact(LANES).zip(b[..full].chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] = fmadd::<FMA>(ca[l], cb[l], lanes[l]);
        }
    }
    for (l, k) in (full..a.len()).enumerate() {
        lanes[l] = fmadd::<FMA>(a[k], b[k], lanes[l]);
    }
    sum_lanes(&lanes)
}

/// Computes `y[:, o0..o0+ob]` into `out` (`[m, ob]` row-major).
#[inline(always)]
pub(crate) fn block_job<const FMA: bool, D: Decoder>(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    let layer = job.layer;
    let (n_in, m) = (layer.in_features(), job.m);
    let zeros = [0.0f32; KC];
    let mut tile = vec![0.0f32; TILE_ROWS * KC];
    let mut k0 = 0;
    while k0 < n_in {
        let kc = KC.min(n_in - k0);
        let mut t0 = 0;
        while t0 < ob {
            let rows = TILE_ROWS.min(ob - t0);
            decode_tile::<D>(job, o0 + t0, rows, k0, kc, &mut tile);
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
                    micro_kernel::<FMA>(xs, ws, kc, &mut acc);
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
            t0 += TILE_ROWS;
        }
        k0 += kc;
    }
    // Output pass: bias, then each applicable adapter's expand term.
    for r in 0..m {
        let y_row = &mut out[r * ob..(r + 1) * ob];
        if let Some(b) = layer.bias() {
            for (y, b) in y_row.iter_mut().zip(&b[o0..o0 + ob]) {
                *y += b;
            }
        }
        for a in layer.adapters_for_row(job.sel, r) {
            let ad = &layer.adapters()[a];
            let Some(t) = &job.shrink[a] else { continue };
            let rank = ad.rank();
            let t_row = &t[r * rank..(r + 1) * rank];
            let s = ad.scaling();
            for (j, y) in y_row.iter_mut().enumerate() {
                let o = o0 + j;
                *y += s * dot::<FMA>(t_row, &ad.b()[o * rank..(o + 1) * rank]);
            }
        }
    }
}

/// The LoRA shrink `t = x·Aᵀ` for every adapter used by some row (rows that do not use it stay zero).
#[inline(always)]
pub(crate) fn shrink_all<const FMA: bool>(
    layer: &QuantLinear,
    x: &[f32],
    m: usize,
    sel: AdapterSelection<'_>,
) -> Vec<Option<Vec<f32>>> {
    let n_in = layer.in_features();
    layer
        .adapters()
        .iter()
        .enumerate()
        .map(|(a, ad)| {
            let rows: Vec<usize> = (0..m).filter(|&r| layer.adapters_for_row(sel, r).any(|b| b == a)).collect();
            if rows.is_empty() {
                return None;
            }
            let mut t = vec![0.0f32; m * ad.rank()];
            for r in rows {
                let xr = &x[r * n_in..(r + 1) * n_in];
                for k in 0..ad.rank() {
                    t[r * ad.rank() + k] = dot::<FMA>(xr, &ad.a()[k * n_in..(k + 1) * n_in]);
                }
            }
            Some(t)
        })
        .collect()
}

/// Byte → (value of the high nibble, value of the low nibble).
fn pair_table(table: &[f32; 16]) -> [[f32; 2]; 256] {
    std::array::from_fn(|b| [table[b >> 4], table[b & 15]])
}

/// The fused forward. `x` is `[m, in]` f32, already validated.
pub(crate) fn forward(layer: &QuantLinear, x: &[f32], m: usize, sel: AdapterSelection<'_>, path: Path) -> Vec<f32> {
    let n_out = layer.out_features();
    let pairs = match layer.weight() {
        QuantWeight::FourBit(t) => pair_table(t.table()),
        QuantWeight::Int8(_) => [[0.0; 2]; 256],
    };
    let isa = path.isa;
    let shrink = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => super::linear_x86::shrink_all(isa, layer, x, m, sel),
        _ => shrink_all::<false>(layer, x, m, sel),
    };
    let job = Job { layer, x, m, pairs: &pairs, shrink: &shrink, sel };
    let blocks: Vec<(usize, usize)> = (0..n_out).step_by(OUT_BLOCK).map(|o0| (o0, OUT_BLOCK.min(n_out - o0))).collect();
    let run = |&(o0, ob): &(usize, usize)| {
        let mut out = vec![0.0f32; m * ob];
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => super::linear_x86::block_job(isa, &job, o0, ob, &mut out),
            _ => block_job::<false, PortableDecoder>(&job, o0, ob, &mut out),
        }
        out
    };
    let parts: Vec<Vec<f32>> = if cfg!(feature = "rayon") && path.parallel && blocks.len() > 1 {
        par_map(&blocks, run)
    } else {
        blocks.iter().map(run).collect()
    };
    let mut y = vec![0.0f32; m * n_out];
    for ((o0, ob), part) in blocks.iter().zip(parts) {
        for r in 0..m {
            y[r * n_out + o0..r * n_out + o0 + ob].copy_from_slice(&part[r * ob..(r + 1) * ob]);
        }
    }
    y
}

fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync + Send) -> Vec<R> {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        items.par_iter().map(f).collect()
    }
    #[cfg(not(feature = "rayon"))]
    items.iter().map(f).collect()
}

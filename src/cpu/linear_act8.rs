//! Int8 activations (`Activations::Int8`): `x` quantized once per forward (in blocks of 32, bit-identical to
//! [`crate::reference::act8::quantize_row`]; AVX-512 / AVX2 copies in `linear_act8_quantize_x86.rs`), then
//! integer dot products against the weight's integer codes (4-bit: the int8 table `round(127·T)`; int8:
//! `code − zero_point`), one f32 scale multiply per block. This file holds the quantized `x` (and the layout
//! the SIMD kernels read) and the portable kernel; `linear_act8_x86.rs` has the AVX-512 VNNI one,
//! `linear_act8_avx2.rs` the AVX2 one (and the 256-bit kernels over the interleaved layout, AVX-VNNI or AVX2,
//! in `linear_act8_interleaved_256.rs`),
//! `linear_act8_neon.rs` the NEON one, `linear_act8_wasm.rs` the simd128 one. Every path computes the same
//! exact integer sums; only the f32 accumulation of the block terms differs (bound:
//! `reference::act8::kernel_bound`).

use super::linear_kernels::output_pass;
use super::table::{Job, LinearKernels};
use crate::format::affine::Granularity;
use crate::format::layer::QuantWeight;
use crate::reference::act8::{int8_table, quantize_row, BLOCK};
use crate::reference::nf4::code_at;

/// Which layout of the quantized `x` a kernel table reads besides the natural one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Act8Layout {
    /// Codes in `x`'s order only (the portable kernel).
    Natural,
    /// Also the layout of the SIMD integer kernels (AVX2, NEON, simd128): for 4-bit weights each block of 32
    /// codes reordered as its 16 even then its 16 odd elements (the order the packed nibbles decode to).
    EvenOdd,
    /// [`EvenOdd`](Self::EvenOdd) plus, per 4 codes, their sum (`lanes`: the AVX-512 VNNI kernel removes its
    /// weight offset with it).
    Vnni,
}

/// `x` quantized row by row (the scratch of an int8-activation forward; reused across calls).
#[derive(Debug, Default)]
pub(crate) struct Act8X {
    /// Codes `[m, in]` in `x`'s order.
    pub q: Vec<i8>,
    /// Scales `[m, in.div_ceil(32)]`.
    pub d: Vec<f32>,
    /// Even/odd layout codes `[m, in]` (empty unless prepared).
    pub vq: Vec<i8>,
    /// Sum of each 4 consecutive `vq` codes, `[m, in / 4]` (`Vnni` only).
    pub lanes: Vec<i32>,
    /// Sum of each 32-block's codes, `[m, in / 32]` (only for the interleaved kernel: its offset term).
    pub sums: Vec<i32>,
}

impl Act8X {
    /// Quantizes `x` (`[m, n_in]`, finite) with `table`'s quantizer and, for its layout `EvenOdd` or `Vnni` when
    /// [`vnni_eligible`], that layout; with `interleaved` (a table that reads the interleaved layout and a layer
    /// that has it) only the block sums that kernel reads besides the codes.
    pub fn prepare(
        &mut self,
        x: &[f32],
        m: usize,
        n_in: usize,
        weight: &QuantWeight,
        table: &LinearKernels,
        interleaved: bool,
    ) {
        let layout = table.act8_layout;
        let nb = n_in.div_ceil(BLOCK);
        let sums = interleaved && n_in.is_multiple_of(BLOCK);
        self.q.clear();
        self.q.resize(m * n_in, 0);
        self.d.clear();
        self.d.resize(m * nb, 0.0);
        self.sums.clear();
        if sums {
            self.sums.resize(m * nb, 0);
        }
        for r in 0..m {
            let s = if sums { &mut self.sums[r * nb..(r + 1) * nb] } else { &mut [] };
            (table.act8_quantize)(
                &x[r * n_in..(r + 1) * n_in],
                &mut self.q[r * n_in..(r + 1) * n_in],
                &mut self.d[r * nb..(r + 1) * nb],
                s,
            );
        }
        self.vq.clear();
        self.lanes.clear();
        if sums {
            return;
        }
        if layout == Act8Layout::Natural || !vnni_eligible(weight, n_in) {
            return;
        }
        match weight {
            QuantWeight::FourBit(_) => {
                self.vq.resize(m * n_in, 0);
                for (src, dst) in self.q.chunks_exact(BLOCK).zip(self.vq.chunks_exact_mut(BLOCK)) {
                    for i in 0..BLOCK / 2 {
                        dst[i] = src[2 * i];
                        dst[BLOCK / 2 + i] = src[2 * i + 1];
                    }
                }
            }
            QuantWeight::Int8(_) => self.vq.extend_from_slice(&self.q),
        }
        if layout == Act8Layout::Vnni {
            self.lanes.extend(self.vq.chunks_exact(4).map(|c| c.iter().map(|&v| v as i32).sum::<i32>()));
        }
    }

    /// The borrowed view a kernel reads.
    pub fn view(&self) -> Act8View<'_> {
        Act8View { q: &self.q, d: &self.d, vq: &self.vq, lanes: &self.lanes, sums: &self.sums }
    }
}

/// The portable quantizer ([`crate::cpu::table::Act8Quantize`]): the reference row, then the block sums.
pub(crate) fn quantize_portable(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    quantize_row(x, q, d);
    for (s, c) in sums.iter_mut().zip(q.chunks(BLOCK)) {
        *s = c.iter().map(|&v| v as i32).sum();
    }
}

/// Borrowed [`Act8X`].
#[derive(Clone, Copy)]
pub(crate) struct Act8View<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    #[cfg_attr(
        not(any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            all(target_arch = "wasm32", target_feature = "simd128")
        )),
        allow(dead_code)
    )]
    pub vq: &'a [i8],
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub lanes: &'a [i32],
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub sums: &'a [i32],
}

/// Whether the VNNI kernel takes this layer: rows of whole 64-code chunks, and int8 parameters constant over
/// each chunk (per tensor, per channel, or groups of 64·2ⁿ that divide the row).
pub(crate) fn vnni_eligible(weight: &QuantWeight, n_in: usize) -> bool {
    n_in.is_multiple_of(64)
        && match weight {
            QuantWeight::FourBit(_) => true,
            QuantWeight::Int8(t) => match t.granularity() {
                Granularity::PerGroup(g) => g >= 64 && g.is_power_of_two() && n_in.is_multiple_of(g),
                _ => true,
            },
        }
}

/// Where the SIMD int8-activation kernels find an int8 weight's scale and zero point: piece `c` (of `chunk`
/// codes) of row `o` uses entry `o·row_stride + ((c >> shift) & mask)`, with no division or branch per piece
/// (groups are powers of two of at least 64 that divide the row, see [`vnni_eligible`]).
#[derive(Clone, Copy)]
#[cfg_attr(
    not(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        all(target_arch = "wasm32", target_feature = "simd128")
    )),
    allow(dead_code)
)]
pub(crate) struct Int8ParamIndex {
    row_stride: usize,
    shift: u32,
    mask: usize,
}

#[cfg_attr(
    not(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        all(target_arch = "wasm32", target_feature = "simd128")
    )),
    allow(dead_code)
)]
impl Int8ParamIndex {
    /// The index for rows of `n_in` codes read `chunk` (a power of two ≤ 64) at a time.
    pub fn new(granularity: Granularity, n_in: usize, chunk: usize) -> Int8ParamIndex {
        let (row_stride, shift, mask) = match granularity {
            Granularity::PerTensor => (0, 0, 0),
            Granularity::PerChannel => (1, 0, 0),
            Granularity::PerGroup(g) => (n_in / g, (g / chunk).trailing_zeros(), usize::MAX),
        };
        Int8ParamIndex { row_stride, shift, mask }
    }

    /// The parameter entry of piece `c` of row `o`.
    #[inline(always)]
    pub fn get(&self, o: usize, c: usize) -> usize {
        o * self.row_stride + ((c >> self.shift) & self.mask)
    }
}

/// One register tile of a SIMD int8-activation kernel (VNNI, AVX2, NEON, simd128).
pub(crate) trait Act8Tile<const J: usize, const R: usize> {
    /// `acc[i][j] = Σ_k x[r0 + i, k]·W[rows[j], k]` (block-scaled) for `i < rr ≤ R`.
    ///
    /// # Safety
    /// The kernel's instruction set is available, and the slices it reads hold `rows` and `r0 + rr` rows (each
    /// kernel's `base` asserts their lengths before calling [`add_tiles`]).
    unsafe fn tile(&self, rows: [usize; J], r0: usize, rr: usize, acc: &mut [[f32; J]; R]);
}

/// `out[r, j] += ` the tiles' sums for rows `o0..o0+ob` of `W` and the `m` rows of `x`: `J` weight rows × up to
/// `R` rows of `x` per tile. Rows past the block repeat its last row; their sums are dropped.
///
/// # Safety
/// As [`Act8Tile::tile`].
#[inline(always)]
#[cfg_attr(
    not(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        all(target_arch = "wasm32", target_feature = "simd128")
    )),
    allow(dead_code)
)]
pub(crate) unsafe fn add_tiles<const J: usize, const R: usize>(
    tiles: &impl Act8Tile<J, R>,
    m: usize,
    o0: usize,
    ob: usize,
    out: &mut [f32],
) {
    for j0 in (0..ob).step_by(J) {
        let rows: [usize; J] = std::array::from_fn(|j| o0 + (j0 + j).min(ob - 1));
        let mut r0 = 0;
        while r0 < m {
            let rr = (m - r0).min(R);
            let mut acc = [[0f32; J]; R];
            // SAFETY: forwarded from the caller.
            unsafe { tiles.tile(rows, r0, rr, &mut acc) };
            for (i, acc_row) in acc.iter().enumerate().take(rr) {
                for (j, a) in acc_row.iter().enumerate().take((ob - j0).min(J)) {
                    out[(r0 + i) * ob + j0 + j] += a;
                }
            }
            r0 += R;
        }
    }
}

/// `1/127` as f32: the 4-bit scale is `d · absmax · INV127` (two roundings after the exact integer sum).
pub(crate) const INV127: f32 = 1.0 / 127.0;

/// The portable int8-activation block: base product through exact integer sums per block, then the f32
/// output pass (bias, LoRA).
pub(crate) fn block_portable(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    base_portable(job, o0, ob, out);
    output_pass::<wide::f32x8>(job, o0, ob, out);
}

/// `out[r, j] += Σ_segments scale · Σ q·c` for rows `o0..o0+ob` of `W`: segments are the 32-blocks of `x` cut
/// further where the weight's scale changes (4-bit blocks are ≥ 32 and aligned in the flat index; int8 groups
/// may be any size).
pub(crate) fn base_portable(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    let act = job.act8.expect("int8 activations prepared");
    let (n_in, m) = (job.layer.in_features, job.m);
    let nb = n_in.div_ceil(BLOCK);
    let mut codes = vec![0i16; n_in];
    let table8 = match job.layer.weight {
        QuantWeight::FourBit(t) => int8_table(t.table()),
        QuantWeight::Int8(_) => [0; 16],
    };
    // The current row's weight scale runs, (end, scale); one buffer for the block, not one per row.
    let mut runs: Vec<(usize, f32)> = Vec::new();
    for j in 0..ob {
        let o = o0 + j;
        // The row's integer weights and where each weight scale run ends.
        runs.clear();
        match job.layer.weight {
            QuantWeight::FourBit(t) => {
                let packed = t.packed();
                for (k, c) in codes.iter_mut().enumerate() {
                    *c = table8[code_at(packed, o * n_in + k) as usize] as i16;
                }
                let (bs, scales) = (t.blocksize(), job.layer.block_scales());
                let mut k = 0;
                while k < n_in {
                    let e = o * n_in + k;
                    let end = ((e / bs + 1) * bs - o * n_in).min(n_in);
                    runs.push((end, scales[e / bs]));
                    k = end;
                }
            }
            QuantWeight::Int8(t) => {
                let row = &t.codes()[o * n_in..(o + 1) * n_in];
                let param = |p: usize| (t.scales()[p], t.zero_points()[p] as i16);
                let mut put = |from: usize, to: usize, p: usize| {
                    let (s, zp) = param(p);
                    for k in from..to {
                        codes[k] = row[k] as i16 - zp;
                    }
                    runs.push((to, s));
                };
                match t.granularity() {
                    Granularity::PerTensor => put(0, n_in, 0),
                    Granularity::PerChannel => put(0, n_in, o),
                    Granularity::PerGroup(g) => {
                        let per_row = n_in.div_ceil(g);
                        for (i, k) in (0..n_in).step_by(g).enumerate() {
                            put(k, (k + g).min(n_in), o * per_row + i);
                        }
                    }
                }
            }
        }
        let four_bit = matches!(job.layer.weight, QuantWeight::FourBit(_));
        for r in 0..m {
            let q = &act.q[r * n_in..(r + 1) * n_in];
            let d = &act.d[r * nb..(r + 1) * nb];
            let mut acc = 0f32;
            let (mut k, mut run) = (0, 0);
            while k < n_in {
                while runs[run].0 <= k {
                    run += 1;
                }
                let (run_end, s) = runs[run];
                let end = ((k / BLOCK + 1) * BLOCK).min(run_end);
                let sum: i32 = q[k..end].iter().zip(&codes[k..end]).map(|(&a, &b)| a as i32 * b as i32).sum();
                let scale = if four_bit { d[k / BLOCK] * s * INV127 } else { d[k / BLOCK] * s };
                acc += scale * sum as f32;
                k = end;
            }
            out[r * ob + j] += acc;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every int8-activation path against the exact int8 value (`reference::act8::forward`) within the kernels'
    //! rounding bound (`reference::act8::kernel_bound`: `(K + 8)·ε·Σ|x̂ŵ|` on top of the f32 bound of the bias
    //! and LoRA terms). The integer sums are exact on every path, so a wrong lane, scale or zero point is far
    //! outside it.
    use crate::api::linear::{Activations, ForwardOptions, QuantLinear, QuantWeight};
    use crate::cpu::KernelPath;
    use crate::format::affine::Granularity;
    use crate::format::layer::AdapterSelection;
    use crate::format::lora::LoraAdapter;
    use crate::format::scheme::Scheme;

    fn rng(seed: &mut u64, scale: f32) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }

    fn layer(scheme: Scheme, out: usize, inp: usize, ranks: &[usize], seed: &mut u64) -> QuantLinear {
        let w: Vec<f32> = (0..out * inp).map(|_| rng(seed, 0.5)).collect();
        let bias: Vec<f32> = (0..out).map(|_| rng(seed, 1.0)).collect();
        let mut l = QuantLinear::new(QuantWeight::quantize(&w, &[out, inp], scheme).unwrap(), Some(bias)).unwrap();
        for (i, &r) in ranks.iter().enumerate() {
            let a: Vec<f32> = (0..r * inp).map(|_| rng(seed, 0.3)).collect();
            let b: Vec<f32> = (0..out * r).map(|_| rng(seed, 0.3)).collect();
            l.add_adapter(LoraAdapter::new(format!("a{i}"), r, a, b, 2.0 * r as f32, false).unwrap()).unwrap();
        }
        l
    }

    /// Every ISA's quantizer of `x` gives the reference's codes, scales and block sums bit for bit: random rows of
    /// every length 1..=100 and 4096 (short last blocks, whole rows), zero blocks, blocks whose `127 / amax`
    /// overflows (amax below ~3.7e-37), exact ties `v·inv = k + 0.5`, ±0 and the f32 extremes, alone and inside
    /// long rows at every position of a 16-block batch.
    #[test]
    fn every_quantizer_of_x_equals_the_reference_bit_for_bit() {
        let mut seed = 7u64;
        let mut rows: Vec<Vec<f32>> =
            (1..=100).chain([4096]).map(|n| (0..n).map(|_| rng(&mut seed, 3.0)).collect()).collect();
        let mut special = vec![0f32; 32];
        special.extend((0..32).map(|i| if i % 3 == 0 { -0.0 } else { 1e-38 * (i as f32 - 16.0) }));
        special.extend((0..32).map(|i| f32::from_bits(1 + i as u32) * if i % 2 == 0 { 1.0 } else { -1.0 }));
        // amax 127 makes inv 1: codes are the values, so k + 0.5 is an exact tie.
        special.extend((0..32).map(|i| if i == 0 { -127.0 } else { (i as f32 - 16.0) * 2.5 + 0.5 }));
        special.extend((0..32).map(|i| if i == 5 { f32::MAX } else { f32::MIN_POSITIVE * i as f32 }));
        special.extend((0..32).map(|i| if i == 7 { f32::MIN } else { rng(&mut seed, 1e30) }));
        // The special blocks again inside long rows, at every offset of a 16-block batch (AVX-512 quantizes 16
        // whole blocks at once) and across a batch's end.
        for start in [0, 5, 11, 15] {
            let mut long: Vec<f32> = (0..start * 32).map(|_| rng(&mut seed, 3.0)).collect();
            long.extend_from_slice(&special);
            long.extend((0..1024).map(|_| rng(&mut seed, 3.0)));
            rows.push(long);
        }
        special.extend([3.0, -1.5, 0.0, 2.25, 1e-40]);
        rows.push(special);
        for isa in crate::cpu::Isa::available() {
            let quantize = crate::cpu::dispatch::kernels(isa).linear.act8_quantize;
            for x in &rows {
                let nb = x.len().div_ceil(super::BLOCK);
                let (mut wq, mut wd) = (vec![0i8; x.len()], vec![0f32; nb]);
                super::quantize_row(x, &mut wq, &mut wd);
                let ws: Vec<i32> = wq.chunks(super::BLOCK).map(|c| c.iter().map(|&v| v as i32).sum()).collect();
                for with_sums in [false, true] {
                    let (mut q, mut d) = (vec![99i8; x.len()], vec![f32::NAN; nb]);
                    let mut sums = vec![i32::MIN; if with_sums { nb } else { 0 }];
                    quantize(x, &mut q, &mut d, &mut sums);
                    let n = x.len();
                    assert_eq!(q, wq, "{isa:?} codes, len {n}");
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&d), bits(&wd), "{isa:?} scales, len {n}");
                    if with_sums {
                        assert_eq!(sums, ws, "{isa:?} block sums, len {n}");
                    }
                }
            }
        }
    }

    /// Asserts that the int8-activation forward of `l` on every available path is within the kernels' rounding
    /// bound of the exact int8 value; returns the number of paths checked.
    fn every_path_within_the_kernel_bound(l: &QuantLinear, x: &[f32], label: &str) -> usize {
        let want = l.forward_with(x, ForwardOptions::reference().activations(Activations::Int8)).unwrap();
        let bound = crate::reference::act8::kernel_bound(l.view(), x, AdapterSelection::Enabled);
        let paths = KernelPath::all_available();
        for &path in &paths {
            let got = l.forward_with(x, ForwardOptions::default().path(path).activations(Activations::Int8)).unwrap();
            for (i, ((&g, &w), &b)) in got.iter().zip(&want).zip(&bound).enumerate() {
                let err = (g as f64 - w as f64).abs();
                let allowed = b + w.abs() as f64 * f32::EPSILON as f64 * 0.5;
                assert!(
                    err <= allowed,
                    "{label} {path}: y[{i}] = {g}, exact int8 value {w}, |err| {err:e} > {allowed:e}"
                );
            }
        }
        paths.len()
    }

    #[test]
    fn int8_activation_paths_match_the_exact_int8_value() {
        let schemes = [
            Scheme::nf4(64, true),
            Scheme::nf4(32, false),
            Scheme::fp4(128, false),
            Scheme::Int8(Granularity::PerTensor),
            Scheme::Int8(Granularity::PerChannel),
            Scheme::Int8(Granularity::PerGroup(64)),
            Scheme::Int8(Granularity::PerGroup(128)),
            Scheme::Int8(Granularity::PerGroup(7)),
            Scheme::Int8(Granularity::PerGroup(48)),
        ];
        let mut seed = 7u64;
        let mut checked = 0;
        for scheme in schemes {
            for (out, inp) in [(9, 64), (70, 128), (5, 256), (3, 96), (4, 37), (67, 512)] {
                let l = layer(scheme, out, inp, &[3], &mut seed);
                for m in [1, 2, 3, 4, 5, 9] {
                    // Blocks of x with very different magnitudes, and one all-zero block.
                    let mut x: Vec<f32> =
                        (0..m * inp).map(|i| rng(&mut seed, if (i / 32) % 3 == 0 { 4.0 } else { 0.05 })).collect();
                    x[..inp.min(32)].fill(0.0);
                    checked += every_path_within_the_kernel_bound(&l, &x, &format!("{scheme:?} {out}x{inp} M={m}"));
                }
            }
        }
        assert!(checked >= 9 * 6 * 6);
    }

    /// The interleaved layout (`QuantLinear::build_act8_layout`, 4-bit and int8 weights) on every path: within the
    /// same bound of the exact int8 value, partial groups of 16 rows included; every kernel over it that this CPU
    /// runs (512-bit VNNI, 256-bit AVX-VNNI, 256-bit maddubs) gives the same bits; and each on any row range
    /// `o0..o0 + ob` (how the threaded driver splits rows) gives the whole call's bits for those rows.
    #[test]
    fn interleaved_layout_matches_the_exact_int8_value_and_any_row_split() {
        use crate::cpu::linear_act8_interleaved::Act8Interleaved;
        if !Act8Interleaved::used_here() {
            eprintln!("skipped: no AVX2 on this CPU (the interleaved layout is not built)");
            let mut seed = 1u64;
            assert!(!layer(Scheme::nf4(64, true), 16, 64, &[], &mut seed).build_act8_layout());
            return;
        }
        let schemes = [
            Scheme::nf4(64, true),
            Scheme::nf4(32, false),
            Scheme::fp4(128, false),
            Scheme::nf4(256, true),
            Scheme::Int8(Granularity::PerTensor),
            Scheme::Int8(Granularity::PerChannel),
            Scheme::Int8(Granularity::PerGroup(32)),
            Scheme::Int8(Granularity::PerGroup(128)),
        ];
        let mut seed = 11u64;
        for scheme in schemes {
            for (out, inp) in [(1, 256), (15, 256), (16, 512), (17, 256), (63, 256), (64, 512), (70, 256), (133, 768)] {
                let mut l = layer(scheme, out, inp, &[2], &mut seed);
                assert!(l.build_act8_layout(), "{scheme:?} {out}x{inp} fits the layout");
                assert!(l.act8_layout_bytes() >= out * inp / 2);
                for m in [1, 2, 3, 4, 5, 9] {
                    let mut x: Vec<f32> =
                        (0..m * inp).map(|i| rng(&mut seed, if (i / 32) % 3 == 0 { 4.0 } else { 0.05 })).collect();
                    x[..32].fill(0.0);
                    every_path_within_the_kernel_bound(&l, &x, &format!("{scheme:?} {out}x{inp} M={m}"));
                    #[cfg(target_arch = "x86_64")]
                    {
                        let mut act = super::Act8X::default();
                        act.prepare(
                            &x,
                            m,
                            inp,
                            l.weight(),
                            &crate::cpu::dispatch::kernels(crate::cpu::Isa::best()).linear,
                            true,
                        );
                        let il = l.view().act8_interleaved.unwrap();
                        // Double-quantized scales stay codes in the layout; the same layout with f32 scales must
                        // give the same bits on every kernel (direct decode at m ≤ 2 / 4, decoded ahead above).
                        let f32_scales = matches!(scheme, Scheme::FourBit { double_quant: true, .. }).then(|| {
                            Act8Interleaved::build_with(l.weight(), out, inp, l.view().block_scales(), false).unwrap()
                        });
                        assert_eq!(il.scales_are_codes(), f32_scales.is_some(), "{scheme:?}: coded scales");
                        type Kernel = unsafe fn(super::Act8View<'_>, &Act8Interleaved, usize, usize, usize, &mut [f32]);
                        use crate::cpu::linear_act8_interleaved_256 as k256;
                        use crate::cpu::x86_features as f;
                        let kernels: [(&str, Kernel, bool); 3] = [
                            (
                                "512-bit VNNI",
                                crate::cpu::linear_act8_interleaved_x86::base_interleaved,
                                f::Avx512Vnni::detect().is_some(),
                            ),
                            ("256-bit AVX-VNNI", k256::base_interleaved_256, f::AvxVnni::detect().is_some()),
                            ("256-bit maddubs", k256::base_interleaved_256_maddubs, f::Avx2::detect().is_some()),
                        ];
                        // The kernel alone on rows o0..o0 + ob, into a zeroed `[m, ob]`.
                        let rows_of = |il: &Act8Interleaved, kernel: Kernel, o0: usize, ob: usize| {
                            let mut y = vec![0f32; m * ob];
                            // SAFETY: each kernel runs only where its features were detected (the filter below).
                            unsafe { kernel(act.view(), il, m, o0, ob, &mut y) };
                            y
                        };
                        let rows = |kernel: Kernel, o0: usize, ob: usize| rows_of(il, kernel, o0, ob);
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        let mut first: Option<Vec<f32>> = None;
                        for (name, kernel, _) in kernels.into_iter().filter(|k| k.2) {
                            let whole = rows(kernel, 0, out);
                            if let Some(plain) = &f32_scales {
                                let want = rows_of(plain, kernel, 0, out);
                                assert_eq!(
                                    bits(&want),
                                    bits(&whole),
                                    "{scheme:?} {out}x{inp} M={m}: {name} coded scales"
                                );
                            }
                            // Every kernel makes the same integers and the same f32 operations per lane: the same
                            // bits.
                            if let Some(f) = &first {
                                assert_eq!(bits(f), bits(&whole), "{scheme:?} {out}x{inp} M={m}: {name} bits");
                            }
                            for (o0, ob) in [(0, 1), (3, 17), (16, 16), (5, 60), (out - 1, 1), (1, out - 1)] {
                                if o0 + ob > out || ob == 0 {
                                    continue;
                                }
                                let part = rows(kernel, o0, ob);
                                for r in 0..m {
                                    let want = &whole[r * out + o0..r * out + o0 + ob];
                                    assert!(
                                        part[r * ob..(r + 1) * ob]
                                            .iter()
                                            .zip(want)
                                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                                        "{scheme:?} {out}x{inp} M={m} rows {o0}+{ob} ({name})"
                                    );
                                }
                            }
                            first.get_or_insert(whole);
                        }
                    }
                }
            }
        }
    }
}

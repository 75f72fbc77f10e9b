//! AVX2 int8-activation kernel (for CPUs without AVX-512 VNNI): exact integer products per 32-block of `x`
//! in 256-bit registers, then one f32 multiply-add per lane with that block's `d` times the weight scale.
//!
//! - 4-bit weights: the int8 table `round(127·T)` (values in −127..=127) looked up from the nibbles with one
//!   `vpshufb`; products through `vpmaddubsw(|w|, sign(x, w))` (ggml's trick: both factors ≤ 127 in magnitude,
//!   so a pair sum ≤ 32258 never saturates the i16), then `vpmaddwd` by ones into 8 i32 lanes of 4 products.
//!   A 32-block is 16 packed bytes `b0..b15` (element 2i in the high nibble of `b_i`); it decodes to
//!   `[hi(b0..15), lo(b0..15)]`, elements `0,2,…,30, 1,3,…,31`: the order of `Act8X::vq`.
//! - int8 weights: codes widened to i16 minus the zero point (−255..=255) and `x` widened to i16, multiplied
//!   by `vpmaddwd` (pair sums ≤ 64770 in i32): exact, no offset correction.
//!
//! Every lane holds an exact integer sum; only the f32 accumulation differs from the portable kernel, within
//! `reference::act8::kernel_bound` (at most 8 lane partial sums per block, as the VNNI kernel's 16 per chunk).

use super::linear_act8::{
    add_tiles, base_portable, vnni_eligible, Act8Layout, Act8Tile, Act8View, Int8ParamIndex, INV127,
};
use super::linear_act8_interleaved::Act8Interleaved;
use super::linear_act8_interleaved_256::{base_interleaved_256, base_interleaved_256_maddubs};
use super::linear_x86::{output_pass_avx2, GEMV_PREFETCH};
use super::table::{Job, LinearKernels};
use super::x86_features::{avx2_fn, avxvnni_fn, Avx2, AvxVnni};
use crate::format::layer::QuantWeight;
use crate::reference::act8::{int8_table, BLOCK};
use std::arch::x86_64::*;

/// `base` with the AVX2 int8-activation blocks (the token proves detection): layers with the interleaved layout
/// take the 256-bit kernel over it (its AVX-VNNI form with an AVX-VNNI token, else its `vpmaddubsw` form),
/// others the AVX2 kernel below.
pub(crate) fn avx2(_: Avx2, vnni: Option<AvxVnni>, base: LinearKernels) -> LinearKernels {
    LinearKernels {
        act8_block: match vnni {
            // SAFETY: built only from an `AvxVnni` token (its features were detected); the kernels check the
            // lengths of every slice they read through raw pointers before their loops.
            Some(_) => |job, o0, ob, out| unsafe { block_avxvnni(job, o0, ob, out) },
            // SAFETY: built only from an `Avx2` token (its features were detected); as above.
            None => |job, o0, ob, out| unsafe { block_avx2_interleaved(job, o0, ob, out) },
        },
        act8_layout: Act8Layout::EvenOdd,
        act8_interleaved: true,
        ..base
    }
}

avxvnni_fn! {
unsafe fn block_avxvnni(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    block_interleaved(job, o0, ob, out, base_interleaved_256)
}
}

avx2_fn! {
unsafe fn block_avx2_interleaved(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    block_interleaved(job, o0, ob, out, base_interleaved_256_maddubs)
}
}

/// The 256-bit interleaved `kernel` where the layer has the layout (and `x` its block sums), else the AVX2
/// block; inlined into each form's `#[target_feature]` wrapper.
///
/// # Safety
/// `kernel`'s instruction set and AVX2 are available.
#[inline(always)]
unsafe fn block_interleaved(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32], kernel: InterleavedKernel) {
    let act = job.act8.expect("int8 activations prepared");
    let n_in = job.layer.in_features;
    match job.layer.act8_interleaved.filter(|_| act.sums.len() == job.m * (n_in / BLOCK)) {
        Some(il) => {
            // SAFETY: the caller's contract.
            unsafe { kernel(act, il, job.m, o0, ob, out) };
            // SAFETY: AVX2 and FMA are available (the caller's contract).
            unsafe { output_pass_avx2(job, o0, ob, out) };
        }
        // SAFETY: AVX2 is available (the caller's contract).
        None => unsafe { block_avx2(job, o0, ob, out) },
    }
}

/// The signature of the 256-bit interleaved kernels.
type InterleavedKernel = unsafe fn(Act8View<'_>, &Act8Interleaved, usize, usize, usize, &mut [f32]);

/// Weight rows handled together (their decoded blocks stay in registers for every row of `x`).
const J: usize = 4;
/// Rows of `x` per pass over the weight rows (`J × R` f32 accumulators of 16 registers).
const R: usize = 2;

/// One 32-code block of a weight row as the kernel multiplies it.
trait Blocks {
    /// The decoded weights of one block.
    type W: Copy;
    /// One block of `x` codes in the form `dot` takes.
    type X: Copy;
    /// A placeholder value of `W` (all zero bits).
    unsafe fn zero_w() -> Self::W;
    /// (decoded weights, weight scale in every lane) of block `c` of row `o`.
    unsafe fn block(&self, o: usize, c: usize) -> (Self::W, __m256);
    /// The 32 `x` codes at `p`.
    unsafe fn load_x(p: *const i8) -> Self::X;
    /// 8 i32 lanes whose sum is the exact `Σ q·c` of the block.
    unsafe fn dot(w: Self::W, x: Self::X) -> __m256i;
}

struct FourBit<'a> {
    packed: *const u8,
    scales: &'a [f32],
    n_in: usize,
    shift: u32,
    table: __m256i,
}

impl Blocks for FourBit<'_> {
    /// (w, |w|): the signed table values and their magnitudes.
    type W = (__m256i, __m256i);
    type X = __m256i;

    #[inline(always)]
    unsafe fn zero_w() -> Self::W {
        (_mm256_setzero_si256(), _mm256_setzero_si256())
    }

    #[inline(always)]
    unsafe fn block(&self, o: usize, c: usize) -> (Self::W, __m256) {
        let flat = o * self.n_in + BLOCK * c;
        // SAFETY: the caller checked `packed` holds `out × in / 2` bytes and `in % 64 == 0`, so the 16 bytes of
        // this block are inside.
        let v = _mm_loadu_si128(self.packed.add(flat / 2) as *const __m128i);
        // Four row streams restart every row group: ask for the bytes ahead (a hint, never faults).
        _mm_prefetch::<_MM_HINT_T0>(self.packed.wrapping_add(flat / 2 + GEMV_PREFETCH) as *const i8);
        let low4 = _mm_set1_epi8(15);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low4);
        let lo = _mm_and_si128(v, low4);
        let w = _mm256_shuffle_epi8(self.table, _mm256_set_m128i(lo, hi));
        let s = _mm256_set1_ps(self.scales[flat >> self.shift] * INV127);
        ((w, _mm256_sign_epi8(w, w)), s)
    }

    #[inline(always)]
    unsafe fn load_x(p: *const i8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    #[inline(always)]
    unsafe fn dot((w, abs_w): Self::W, x: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(x, w));
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }
}

struct Int8<'a> {
    codes: *const u8,
    scales: &'a [f32],
    zero_points: &'a [u8],
    n_in: usize,
    /// The scale and zero point entry of each block.
    params: Int8ParamIndex,
}

impl<'a> Int8<'a> {
    fn new(t: &'a crate::format::affine::AffineTensor, n_in: usize) -> Int8<'a> {
        Int8 {
            codes: t.codes().as_ptr(),
            scales: t.scales(),
            zero_points: t.zero_points(),
            n_in,
            params: Int8ParamIndex::new(t.granularity(), n_in, BLOCK),
        }
    }
}

impl Blocks for Int8<'_> {
    /// The block's codes minus the zero point as i16, elements 0–15 and 16–31.
    type W = [__m256i; 2];
    /// The block's `x` codes as i16, elements 0–15 and 16–31.
    type X = [__m256i; 2];

    #[inline(always)]
    unsafe fn zero_w() -> Self::W {
        [_mm256_setzero_si256(); 2]
    }

    #[inline(always)]
    unsafe fn block(&self, o: usize, c: usize) -> (Self::W, __m256) {
        let at = o * self.n_in + BLOCK * c;
        // SAFETY: the caller checked `codes` holds `out × in` bytes and `in % 64 == 0`.
        let v = _mm256_loadu_si256(self.codes.add(at) as *const __m256i);
        _mm_prefetch::<_MM_HINT_T0>(self.codes.wrapping_add(at + GEMV_PREFETCH) as *const i8);
        let p = self.params.get(o, c);
        let zp = _mm256_set1_epi16(self.zero_points[p] as i16);
        let w0 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(v)), zp);
        let w1 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(v)), zp);
        ([w0, w1], _mm256_set1_ps(self.scales[p]))
    }

    #[inline(always)]
    unsafe fn load_x(p: *const i8) -> [__m256i; 2] {
        let v = _mm256_loadu_si256(p as *const __m256i);
        [_mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(v))]
    }

    #[inline(always)]
    unsafe fn dot(w: Self::W, x: Self::X) -> __m256i {
        _mm256_add_epi32(_mm256_madd_epi16(w[0], x[0]), _mm256_madd_epi16(w[1], x[1]))
    }
}

avx2_fn! {
/// The int8-activation block: the AVX2 base product where the layer is eligible (else the portable one), then
/// the f32 output pass.
unsafe fn block_avx2(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    let act = job.act8.expect("int8 activations prepared");
    let n_in = job.layer.in_features;
    if !vnni_eligible(job.layer.weight, n_in) || act.vq.len() != job.m * n_in {
        base_portable(job, o0, ob, out);
    } else {
        match job.layer.weight {
            QuantWeight::FourBit(t) => {
                assert!(t.packed().len() * 2 >= job.layer.out_features * n_in);
                let c: [i8; 16] = int8_table(t.table());
                // SAFETY: 16 readable bytes.
                let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(c.as_ptr() as *const __m128i));
                let w = FourBit {
                    packed: t.packed().as_ptr(),
                    scales: job.layer.block_scales(),
                    n_in,
                    shift: t.blocksize().trailing_zeros(),
                    table,
                };
                base(job, act, &w, o0, ob, out);
            }
            QuantWeight::Int8(t) => {
                assert!(t.codes().len() >= job.layer.out_features * n_in);
                let w = Int8::new(t, n_in);
                base(job, act, &w, o0, ob, out);
            }
        }
    }
    // SAFETY: AVX2 and FMA are available (the caller's contract).
    unsafe { output_pass_avx2(job, o0, ob, out) };
}

/// `out[r, j] += Σ_c Σ_lanes scale · (exact lane sum)` for rows `o0..o0+ob` of `W`, `J` weight rows × up to
/// `R` rows of `x` at a time.
#[inline]
unsafe fn base<W: Blocks>(job: &Job<'_>, act: Act8View<'_>, w: &W, o0: usize, ob: usize, out: &mut [f32]) {
    let (n_in, m) = (job.layer.in_features, job.m);
    assert!(act.vq.len() == m * n_in && act.d.len() == m * (n_in / BLOCK));
    add_tiles(&Tiles { act, w, n_in }, m, o0, ob, out);
}
}

/// The kernel's tiles over one layer (see [`add_tiles`]).
struct Tiles<'a, W> {
    act: Act8View<'a>,
    w: &'a W,
    n_in: usize,
}

impl<W: Blocks> Act8Tile<J, R> for Tiles<'_, W> {
    #[inline(always)]
    unsafe fn tile(&self, rows: [usize; J], r0: usize, rr: usize, acc: &mut [[f32; J]; R]) {
        if rr == 1 {
            tile::<W, 1>(self.act, self.w, rows, r0, self.n_in, acc);
        } else {
            tile::<W, R>(self.act, self.w, rows, r0, self.n_in, acc);
        }
    }
}

/// `acc[i][j] = Σ over the row of x row `r0 + i` · weight row `rows[j]` (`RR` ≤ `R` rows of `x`).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // i and j index several arrays in step
unsafe fn tile<W: Blocks, const RR: usize>(
    act: Act8View<'_>,
    w: &W,
    rows: [usize; J],
    r0: usize,
    n_in: usize,
    acc: &mut [[f32; J]; R],
) {
    let nb = n_in / BLOCK;
    let mut v = [[_mm256_setzero_ps(); J]; RR];
    for c in 0..nb {
        let mut wv = [W::zero_w(); J];
        let mut sv = [_mm256_setzero_ps(); J];
        for j in 0..J {
            (wv[j], sv[j]) = w.block(rows[j], c);
        }
        for i in 0..RR {
            let r = r0 + i;
            // SAFETY: r < m and c < in / 32; `base` asserted the lengths of `vq` and `d`.
            let x = W::load_x(act.vq.as_ptr().add(r * n_in + BLOCK * c));
            let d = _mm256_set1_ps(*act.d.get_unchecked(r * nb + c));
            for j in 0..J {
                let sum = W::dot(wv[j], x);
                v[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d, sv[j]), v[i][j]);
            }
        }
    }
    for i in 0..RR {
        for j in 0..J {
            acc[i][j] = sum8(v[i][j]);
        }
    }
}

/// The sum of the 8 lanes.
#[inline(always)]
unsafe fn sum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

//! WebAssembly SIMD (simd128) int8-activation kernel: exact integer products per 32-block of `x` with
//! `i32x4.dot_i16x8_s` (two i16 products per i32 lane), then one f32 multiply-add per lane with that block's
//! `d` times the weight scale.
//!
//! - 4-bit weights: the int8 table `round(127·T)` looked up from the nibbles with `i8x16.swizzle`; a 32-block
//!   is 16 packed bytes (element 2i in the high nibble of byte i), so the high nibbles give the block's 16 even
//!   elements and the low nibbles its 16 odd ones: the order of `Act8X::vq`.
//! - int8 weights: codes widened to i16 minus the zero point (−255..=255) times `x` widened to i16.
//!
//! Every lane holds an exact integer sum (at most 8 products of ≤ 255·127); only the f32 accumulation differs
//! from the portable kernel, within `reference::act8::kernel_bound` (4 lane partial sums per block).

use super::linear_act8::{add_tiles, base_portable, vnni_eligible, Act8Tile, Act8View, Int8ParamIndex, INV127};
use super::linear_kernels::output_pass;
use super::table::Job;
use crate::format::layer::QuantWeight;
use crate::reference::act8::{int8_table, BLOCK};
use core::arch::wasm32::*;

/// Weight rows handled together (their decoded blocks stay in registers for every row of `x`).
const J: usize = 4;
/// Rows of `x` per pass over the weight rows.
const R: usize = 2;

/// One 32-code block of a weight row as the kernel multiplies it.
trait Blocks {
    /// The decoded weights of one block.
    type W: Copy;
    /// A placeholder value of `W`.
    const ZERO: Self::W;
    /// (decoded weights, weight scale) of block `c` of row `o`.
    fn block(&self, o: usize, c: usize) -> (Self::W, f32);
    /// 4 i32 lanes whose sum is the exact `Σ q·c` of the block, against the block's 32 `x` codes (`vq` order).
    fn dot(w: Self::W, x: &[i8; 32]) -> v128;
}

/// 16 bytes at the start of `b` as a v128.
#[inline(always)]
fn load16<T: Copy>(b: &[T]) -> v128 {
    assert!(std::mem::size_of_val(b) >= 16);
    // SAFETY: at least 16 readable bytes (asserted); wasm's v128.load has no alignment requirement.
    unsafe { v128_load(b.as_ptr() as *const v128) }
}

/// Widened halves (low, high) of 16 signed bytes.
#[inline(always)]
fn widen_i8(v: v128) -> [v128; 2] {
    [i16x8_extend_low_i8x16(v), i16x8_extend_high_i8x16(v)]
}

/// Lanes of `Σ a·b` over two pairs of 16 i16 halves.
#[inline(always)]
fn dot32(a: [v128; 4], b: [v128; 4]) -> v128 {
    let s01 = i32x4_add(i32x4_dot_i16x8(a[0], b[0]), i32x4_dot_i16x8(a[1], b[1]));
    let s23 = i32x4_add(i32x4_dot_i16x8(a[2], b[2]), i32x4_dot_i16x8(a[3], b[3]));
    i32x4_add(s01, s23)
}

/// The 32 `x` codes as four i16x8 (elements 0–7, 8–15, 16–23, 24–31 of the `vq` block).
#[inline(always)]
fn widen_x(x: &[i8; 32]) -> [v128; 4] {
    let [a, b] = widen_i8(load16(&x[..16]));
    let [c, d] = widen_i8(load16(&x[16..]));
    [a, b, c, d]
}

struct FourBit<'a> {
    packed: &'a [u8],
    scales: &'a [f32],
    n_in: usize,
    shift: u32,
    table: v128,
}

impl Blocks for FourBit<'_> {
    /// The block's even and odd elements' table values (i8x16 each).
    type W = [v128; 2];
    const ZERO: Self::W = [u64x2(0, 0); 2];

    #[inline(always)]
    fn block(&self, o: usize, c: usize) -> (Self::W, f32) {
        let flat = o * self.n_in + BLOCK * c;
        let v = load16(&self.packed[flat / 2..flat / 2 + 16]);
        let even = i8x16_swizzle(self.table, u8x16_shr(v, 4));
        let odd = i8x16_swizzle(self.table, v128_and(v, u8x16_splat(15)));
        ([even, odd], self.scales[flat >> self.shift] * INV127)
    }

    #[inline(always)]
    fn dot(w: Self::W, x: &[i8; 32]) -> v128 {
        let [e0, e1] = widen_i8(w[0]);
        let [o0, o1] = widen_i8(w[1]);
        dot32([e0, e1, o0, o1], widen_x(x))
    }
}

struct Int8<'a> {
    codes: &'a [u8],
    scales: &'a [f32],
    zero_points: &'a [u8],
    n_in: usize,
    /// The scale and zero point entry of each block.
    params: Int8ParamIndex,
}

impl<'a> Int8<'a> {
    fn new(t: &'a crate::format::affine::AffineTensor, n_in: usize) -> Int8<'a> {
        Int8 {
            codes: t.codes(),
            scales: t.scales(),
            zero_points: t.zero_points(),
            n_in,
            params: Int8ParamIndex::new(t.granularity(), n_in, BLOCK),
        }
    }
}

impl Blocks for Int8<'_> {
    /// The block's codes minus the zero point as four i16x8.
    type W = [v128; 4];
    const ZERO: Self::W = [u64x2(0, 0); 4];

    #[inline(always)]
    fn block(&self, o: usize, c: usize) -> (Self::W, f32) {
        let at = o * self.n_in + BLOCK * c;
        let (a, b) = (load16(&self.codes[at..at + 16]), load16(&self.codes[at + 16..at + 32]));
        let p = self.params.get(o, c);
        let zp = i16x8_splat(self.zero_points[p] as i16);
        let w = [
            i16x8_sub(u16x8_extend_low_u8x16(a), zp),
            i16x8_sub(u16x8_extend_high_u8x16(a), zp),
            i16x8_sub(u16x8_extend_low_u8x16(b), zp),
            i16x8_sub(u16x8_extend_high_u8x16(b), zp),
        ];
        (w, self.scales[p])
    }

    #[inline(always)]
    fn dot(w: Self::W, x: &[i8; 32]) -> v128 {
        dot32(w, widen_x(x))
    }
}

/// The int8-activation block: the simd128 base product where the layer is eligible (else the portable one),
/// then the f32 output pass.
pub(crate) fn block_simd128(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    let act = job.act8.expect("int8 activations prepared");
    let n_in = job.layer.in_features;
    if !vnni_eligible(job.layer.weight, n_in) || act.vq.len() != job.m * n_in {
        base_portable(job, o0, ob, out);
    } else {
        match job.layer.weight {
            QuantWeight::FourBit(t) => {
                let c: [i8; 16] = int8_table(t.table());
                let w = FourBit {
                    packed: t.packed(),
                    scales: job.layer.block_scales(),
                    n_in,
                    shift: t.blocksize().trailing_zeros(),
                    table: load16(&c),
                };
                base(job, act, &w, o0, ob, out);
            }
            QuantWeight::Int8(t) => base(job, act, &Int8::new(t, n_in), o0, ob, out),
        }
    }
    output_pass::<wide::f32x8>(job, o0, ob, out);
}

/// `out[r, j] += Σ_c Σ_lanes scale · (exact lane sum)` for rows `o0..o0+ob` of `W`, `J` weight rows × up to
/// `R` rows of `x` at a time.
#[inline(always)]
fn base<W: Blocks>(job: &Job<'_>, act: Act8View<'_>, w: &W, o0: usize, ob: usize, out: &mut [f32]) {
    let (n_in, m) = (job.layer.in_features, job.m);
    // SAFETY: simd128 is compiled in (this module exists only then); the tiles read through bounds-checked
    // slices.
    unsafe { add_tiles(&Tiles { act, w, n_in }, m, o0, ob, out) };
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
fn tile<W: Blocks, const RR: usize>(
    act: Act8View<'_>,
    w: &W,
    rows: [usize; J],
    r0: usize,
    n_in: usize,
    acc: &mut [[f32; J]; R],
) {
    let nb = n_in / BLOCK;
    let mut v = [[f32x4_splat(0.0); J]; RR];
    for c in 0..nb {
        let mut wv = [W::ZERO; J];
        let mut sv = [0f32; J];
        for j in 0..J {
            (wv[j], sv[j]) = w.block(rows[j], c);
        }
        for i in 0..RR {
            let r = r0 + i;
            let at = r * n_in + BLOCK * c;
            let x: &[i8; 32] = act.vq[at..at + BLOCK].try_into().expect("32 codes");
            let d = act.d[r * nb + c];
            for j in 0..J {
                let sum = f32x4_convert_i32x4(W::dot(wv[j], x));
                v[i][j] = f32x4_add(v[i][j], f32x4_mul(sum, f32x4_splat(d * sv[j])));
            }
        }
    }
    for i in 0..RR {
        for j in 0..J {
            let s = v[i][j];
            acc[i][j] = (f32x4_extract_lane::<0>(s) + f32x4_extract_lane::<1>(s))
                + (f32x4_extract_lane::<2>(s) + f32x4_extract_lane::<3>(s));
        }
    }
}

//! aarch64 NEON int8-activation kernel (baseline NEON, no `dotprod` needed): exact integer products per
//! 32-block of `x` with widening multiplies, then one f32 multiply-add per lane with that block's `d` times the
//! weight scale.
//!
//! - 4-bit weights: the int8 table `round(127·T)` (values in −127..=127) looked up from the nibbles with `tbl`;
//!   a 32-block is 16 packed bytes (element 2i in the high nibble of byte i), so the high nibbles give the
//!   block's 16 even elements and the low nibbles its 16 odd ones: the order of `Act8X::vq`. Products through
//!   `smull`/`smlal2` (two products per i16 lane, ≤ 32258: no overflow), then `sadalp` into 4 i32 lanes.
//! - int8 weights: codes widened to i16 minus the zero point (−255..=255) times `x` widened to i16, through
//!   `smull`/`smlal2` on i16 into 4 i32 lanes (each ≤ 8·255·127).
//!
//! Every lane holds an exact integer sum; only the f32 accumulation differs from the portable kernel, within
//! `reference::act8::kernel_bound` (4 lane partial sums per block).

use super::linear_act8::{add_tiles, base_portable, vnni_eligible, Act8Tile, Act8View, Int8ParamIndex, INV127};
use super::linear_kernels::output_pass;
use super::table::Job;
use crate::format::layer::QuantWeight;
use crate::reference::act8::{int8_table, BLOCK};
use core::arch::aarch64::*;

/// Weight rows handled together (their decoded blocks stay in registers for every row of `x`).
const J: usize = 4;
/// Rows of `x` per pass over the weight rows.
const R: usize = 2;

/// One 32-code block of a weight row as the kernel multiplies it.
trait Blocks {
    /// The decoded weights of one block.
    type W: Copy;
    /// One block of `x` codes in the form `dot` takes.
    type X: Copy;
    /// A placeholder value of `W`.
    unsafe fn zero_w() -> Self::W;
    /// (decoded weights, weight scale) of block `c` of row `o`.
    unsafe fn block(&self, o: usize, c: usize) -> (Self::W, f32);
    /// The 32 `x` codes at `p` (the `vq` layout).
    unsafe fn load_x(p: *const i8) -> Self::X;
    /// 4 i32 lanes whose sum is the exact `Σ q·c` of the block.
    unsafe fn dot(w: Self::W, x: Self::X) -> int32x4_t;
}

struct FourBit<'a> {
    packed: *const u8,
    scales: &'a [f32],
    n_in: usize,
    shift: u32,
    table: int8x16_t,
}

impl Blocks for FourBit<'_> {
    /// The block's even and odd elements' table values.
    type W = [int8x16_t; 2];
    /// The block's even and odd `x` codes.
    type X = [int8x16_t; 2];

    #[inline(always)]
    unsafe fn zero_w() -> Self::W {
        [vdupq_n_s8(0); 2]
    }

    #[inline(always)]
    unsafe fn block(&self, o: usize, c: usize) -> (Self::W, f32) {
        let flat = o * self.n_in + BLOCK * c;
        // SAFETY: the caller checked `packed` holds `out × in / 2` bytes and `in % 64 == 0`, so the 16 bytes of
        // this block are inside.
        let v = vld1q_u8(self.packed.add(flat / 2));
        let even = vqtbl1q_s8(self.table, vshrq_n_u8::<4>(v));
        let odd = vqtbl1q_s8(self.table, vandq_u8(v, vdupq_n_u8(15)));
        ([even, odd], self.scales[flat >> self.shift] * INV127)
    }

    #[inline(always)]
    unsafe fn load_x(p: *const i8) -> Self::X {
        [vld1q_s8(p), vld1q_s8(p.add(16))]
    }

    #[inline(always)]
    unsafe fn dot(w: Self::W, x: Self::X) -> int32x4_t {
        let e = vmlal_high_s8(vmull_s8(vget_low_s8(w[0]), vget_low_s8(x[0])), w[0], x[0]);
        let o = vmlal_high_s8(vmull_s8(vget_low_s8(w[1]), vget_low_s8(x[1])), w[1], x[1]);
        vpadalq_s16(vpaddlq_s16(e), o)
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
    /// The block's codes minus the zero point as i16, 8 elements per register.
    type W = [int16x8_t; 4];
    /// The block's `x` codes as i16.
    type X = [int16x8_t; 4];

    #[inline(always)]
    unsafe fn zero_w() -> Self::W {
        [vdupq_n_s16(0); 4]
    }

    #[inline(always)]
    unsafe fn block(&self, o: usize, c: usize) -> (Self::W, f32) {
        let at = o * self.n_in + BLOCK * c;
        // SAFETY: the caller checked `codes` holds `out × in` bytes and `in % 64 == 0`.
        let (a, b) = (vld1q_u8(self.codes.add(at)), vld1q_u8(self.codes.add(at + 16)));
        let p = self.params.get(o, c);
        let zp = vdupq_n_s16(self.zero_points[p] as i16);
        let widen = |h: uint16x8_t| vsubq_s16(vreinterpretq_s16_u16(h), zp);
        let w = [
            widen(vmovl_u8(vget_low_u8(a))),
            widen(vmovl_high_u8(a)),
            widen(vmovl_u8(vget_low_u8(b))),
            widen(vmovl_high_u8(b)),
        ];
        (w, self.scales[p])
    }

    #[inline(always)]
    unsafe fn load_x(p: *const i8) -> Self::X {
        let (a, b) = (vld1q_s8(p), vld1q_s8(p.add(16)));
        [vmovl_s8(vget_low_s8(a)), vmovl_high_s8(a), vmovl_s8(vget_low_s8(b)), vmovl_high_s8(b)]
    }

    #[inline(always)]
    unsafe fn dot(w: Self::W, x: Self::X) -> int32x4_t {
        let mut acc = vmull_s16(vget_low_s16(w[0]), vget_low_s16(x[0]));
        acc = vmlal_high_s16(acc, w[0], x[0]);
        for k in 1..4 {
            acc = vmlal_s16(acc, vget_low_s16(w[k]), vget_low_s16(x[k]));
            acc = vmlal_high_s16(acc, w[k], x[k]);
        }
        acc
    }
}

/// The int8-activation block: the NEON base product where the layer is eligible (else the portable one), then
/// the f32 output pass.
pub(crate) fn block_neon(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    let act = job.act8.expect("int8 activations prepared");
    let n_in = job.layer.in_features;
    if !vnni_eligible(job.layer.weight, n_in) || act.vq.len() != job.m * n_in {
        base_portable(job, o0, ob, out);
    } else {
        match job.layer.weight {
            QuantWeight::FourBit(t) => {
                assert!(t.packed().len() * 2 >= job.layer.out_features * n_in);
                let c: [i8; 16] = int8_table(t.table());
                // SAFETY: 16 readable bytes; NEON is in the aarch64 baseline. `base` reads the packed codes
                // inside the length asserted above.
                unsafe {
                    let w = FourBit {
                        packed: t.packed().as_ptr(),
                        scales: job.layer.block_scales(),
                        n_in,
                        shift: t.blocksize().trailing_zeros(),
                        table: vld1q_s8(c.as_ptr()),
                    };
                    base(job, act, &w, o0, ob, out);
                }
            }
            QuantWeight::Int8(t) => {
                assert!(t.codes().len() >= job.layer.out_features * n_in);
                let w = Int8::new(t, n_in);
                // SAFETY: `base` reads the codes inside the length asserted above.
                unsafe { base(job, act, &w, o0, ob, out) };
            }
        }
    }
    output_pass::<wide::f32x8>(job, o0, ob, out);
}

/// `out[r, j] += Σ_c Σ_lanes scale · (exact lane sum)` for rows `o0..o0+ob` of `W`, `J` weight rows × up to
/// `R` rows of `x` at a time.
#[inline]
unsafe fn base<W: Blocks>(job: &Job<'_>, act: Act8View<'_>, w: &W, o0: usize, ob: usize, out: &mut [f32]) {
    let (n_in, m) = (job.layer.in_features, job.m);
    assert!(act.vq.len() == m * n_in && act.d.len() == m * (n_in / BLOCK));
    add_tiles(&Tiles { act, w, n_in }, m, o0, ob, out);
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
    let mut v = [[vdupq_n_f32(0.0); J]; RR];
    for c in 0..nb {
        let mut wv = [W::zero_w(); J];
        let mut sv = [0f32; J];
        for j in 0..J {
            (wv[j], sv[j]) = w.block(rows[j], c);
        }
        for i in 0..RR {
            let r = r0 + i;
            // SAFETY: r < m and c < in / 32; `base` asserted the lengths of `vq` and `d`.
            let x = W::load_x(act.vq.as_ptr().add(r * n_in + BLOCK * c));
            let d = *act.d.get_unchecked(r * nb + c);
            for j in 0..J {
                let sum = W::dot(wv[j], x);
                v[i][j] = vfmaq_n_f32(v[i][j], vcvtq_f32_s32(sum), d * sv[j]);
            }
        }
    }
    for i in 0..RR {
        for j in 0..J {
            acc[i][j] = vaddvq_f32(v[i][j]);
        }
    }
}

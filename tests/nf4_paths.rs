//! Every CPU path (scalar, portable, AVX2, AVX-512, threaded) gives the reference's bytes and bits: packed codes,
//! block absmax, double-quantized scales, and dequantized f32 / f16 / bf16 outputs.

use lowbit::cpu::KernelPath;
use lowbit::double_quant::{double_quantize, DYNAMIC_MAP, NESTED_BLOCKSIZE};
use lowbit::nf4::{quantize_4bit_with, BlockScales, FourBitFormat, BLOCK_SIZES};
use lowbit::reference::{double_quant as ref_dq, nf4 as reference};
use lowbit::{bf16, f16, Element};
use proptest::prelude::*;

/// A tiny deterministic generator (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Test data of `n` elements in blocks of `bs`; `kind` picks the special block patterns.
fn data(seed: u64, n: usize, bs: usize, kind: u8, exp: i32) -> Vec<f32> {
    let mut r = Rng(seed | 1);
    let scale = 2f32.powi(exp);
    let mids: Vec<f32> = {
        let t = reference::codebook(FourBitFormat::Nf4.table());
        let f = reference::codebook(FourBitFormat::Fp4.table());
        t.mids.iter().chain(f.mids.iter()).copied().collect()
    };
    let mut x: Vec<f32> = (0..n).map(|_| r.unit() * scale).collect();
    for (b, blk) in x.chunks_mut(bs).enumerate() {
        match (kind as usize + b) % 7 {
            0 => blk.fill(0.0), // all-zero block
            1 => blk.iter_mut().for_each(|v| {
                *v = f32::from_bits((r.next() % 0x7f_ffff) as u32) * if r.next().is_multiple_of(2) { 1.0 } else { -1.0 }
            }), // subnormals
            2 => {
                // values exactly on midpoints times a power-of-two absmax (ties must take the lower code)
                let p = 2f32.powi((r.next() % 40) as i32 - 20);
                for (i, v) in blk.iter_mut().enumerate() {
                    let m = mids[(r.next() % mids.len() as u64) as usize];
                    *v = if i == 0 { p } else { m * p * if r.next().is_multiple_of(3) { -1.0 } else { 1.0 } };
                }
            }
            3 => {
                let i = (r.next() % blk.len() as u64) as usize; // one huge outlier
                blk[i] = 3.0e38 * if r.next().is_multiple_of(2) { 1.0 } else { -1.0 };
            }
            _ => {}
        }
    }
    x
}

fn check_all_paths<T: Element>(x: &[T], bs: usize, format: FourBitFormat) {
    let (packed_ref, absmax_ref) = reference::quantize(x, bs, format.table());
    let n = x.len();
    let shape = [n];
    let (codes_ref, nested_ref, offset_ref) = ref_dq::quantize(&absmax_ref, NESTED_BLOCKSIZE, &DYNAMIC_MAP);
    let dq_ref = ref_dq::decode(&codes_ref, &nested_ref, offset_ref, NESTED_BLOCKSIZE, &DYNAMIC_MAP);
    let out_ref32 = reference::dequantize(&packed_ref, &absmax_ref, bs, n, format.table());
    let out_dq32 = reference::dequantize(&packed_ref, &dq_ref, bs, n, format.table());
    for path in KernelPath::all_available() {
        let q = quantize_4bit_with(format, x, &shape, bs, false, path).unwrap();
        assert_eq!(q.packed(), &packed_ref[..], "packed, {path}, bs {bs}, {format}");
        assert_eq!(bits(&q.absmax()), bits(&absmax_ref), "absmax, {path}");
        assert_eq!(q.dtype(), T::DTYPE);
        let qd = quantize_4bit_with(format, x, &shape, bs, true, path).unwrap();
        assert_eq!(qd.packed(), &packed_ref[..]);
        match qd.scales() {
            BlockScales::Double(d) => {
                assert_eq!(d.codes(), &codes_ref[..], "dq codes, {path}");
                assert_eq!(bits(d.nested_absmax()), bits(&nested_ref));
                assert_eq!(d.offset().to_bits(), offset_ref.to_bits());
            }
            BlockScales::Plain(_) => panic!("expected double-quantized scales"),
        }
        assert_eq!(bits(&qd.absmax()), bits(&dq_ref));
        for (t, expect) in [(&q, &out_ref32), (&qd, &out_dq32)] {
            let y32: Vec<f32> = t.dequantize_with(path).unwrap();
            assert_eq!(bits(&y32), bits(expect), "f32 out, {path}");
            let y16: Vec<f16> = t.dequantize_with(path).unwrap();
            let e16: Vec<f16> = expect.iter().map(|&v| f16::from_f32(v)).collect();
            assert_eq!(y16, e16, "f16 out, {path}");
            let yb: Vec<bf16> = t.dequantize_with(path).unwrap();
            let eb: Vec<u16> = expect.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
            assert_eq!(yb.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), eb, "bf16 out, {path}");
        }
    }
    // The public double quantization equals the reference too.
    let d = double_quantize(&absmax_ref).unwrap();
    assert_eq!(d.codes(), &codes_ref[..]);
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn all_paths_match_reference_f32(seed in any::<u64>(), n in 0usize..2500, bsi in 0usize..4, kind in 0u8..7,
                                     exp in -30i32..30, fp4 in any::<bool>()) {
        let bs = BLOCK_SIZES[bsi];
        let format = if fp4 { FourBitFormat::Fp4 } else { FourBitFormat::Nf4 };
        check_all_paths(&data(seed, n, bs, kind, exp), bs, format);
    }

    #[test]
    fn all_paths_match_reference_half(seed in any::<u64>(), n in 0usize..1500, bsi in 0usize..3, kind in 0u8..7,
                                      exp in -10i32..10, bf in any::<bool>()) {
        let bs = BLOCK_SIZES[bsi];
        let x = data(seed, n, bs, kind, exp);
        if bf {
            let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            check_all_paths(&h, bs, FourBitFormat::Nf4);
        } else {
            let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v.clamp(-65504.0, 65504.0))).collect();
            check_all_paths(&h, bs, FourBitFormat::Nf4);
        }
    }
}

/// Large enough for the threaded paths (work split over whole blocks), odd length, every block size.
#[test]
fn threaded_paths_match_reference_on_large_inputs() {
    for (i, &bs) in BLOCK_SIZES.iter().enumerate() {
        let n = 70_001 + 2 * bs;
        check_all_paths(&data(i as u64 + 7, n, bs, i as u8, 0), bs, FourBitFormat::Nf4);
    }
}

/// Outputs big enough for non-temporal stores, written through misaligned slices (odd and even heads).
#[test]
fn streaming_stores_with_misaligned_outputs() {
    let n = (33 << 20) / 4 + 77;
    let x = data(99, n, 64, 4, 0);
    let q = lowbit::nf4::quantize_nf4(&x, &[n], 64, false).unwrap();
    let expect = reference::dequantize(q.packed(), &q.absmax(), 64, n, q.table());
    let mut buf = vec![0.0f32; n + 3];
    for path in KernelPath::all_available().into_iter().filter(|p| p.isa != lowbit::cpu::Isa::Scalar) {
        for head in 0..3 {
            buf.fill(f32::NAN);
            q.dequantize_into_with(&mut buf[head..head + n], path).unwrap();
            assert!(buf[head..head + n].iter().zip(&expect).all(|(a, b)| a.to_bits() == b.to_bits()), "{path} +{head}");
        }
    }
}

//! Public API of the 4-bit types: constructors, validation, getters, bad inputs.

use lowbit::double_quant::{double_quantize, DoubleQuantScales, DYNAMIC_MAP, NESTED_BLOCKSIZE};
use lowbit::nf4::{quantize_4bit, quantize_nf4, BlockScales, FourBitFormat, FourBitTensor, FP4_TABLE, NF4_TABLE};
use lowbit::{DType, Error};

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect()
}

#[test]
fn from_parts_roundtrip_and_getters() {
    let t = FourBitTensor::from_parts(
        vec![3, 5],
        FourBitFormat::Nf4,
        32,
        NF4_TABLE,
        vec![0x0f; 8],
        BlockScales::Plain(vec![2.0]),
        DType::BF16,
    )
    .unwrap();
    assert_eq!(t.shape(), &[3, 5]);
    assert_eq!((t.numel(), t.num_blocks(), t.blocksize()), (15, 1, 32));
    assert_eq!(t.dtype(), DType::BF16);
    assert_eq!(t.absmax(), vec![2.0]);
    let y: Vec<f32> = t.dequantize().unwrap();
    assert_eq!(y[0], -2.0);
    assert_eq!(y[1], 2.0);
    assert_eq!(FourBitFormat::Nf4.name(), "nf4");
    assert_eq!(FourBitFormat::Fp4.table(), &FP4_TABLE);
    assert_eq!("fp4".parse::<FourBitFormat>().unwrap(), FourBitFormat::Fp4);
}

#[test]
fn from_parts_rejects_bad_parts() {
    let mk = |shape: Vec<usize>, bs: usize, packed: usize, scales: BlockScales, table: [f32; 16]| {
        FourBitTensor::from_parts(shape, FourBitFormat::Nf4, bs, table, vec![0; packed], scales, DType::F32)
    };
    let plain = |n: usize| BlockScales::Plain(vec![1.0; n]);
    assert!(matches!(mk(vec![64], 48, 32, plain(2), NF4_TABLE), Err(Error::InvalidArgument { .. })));
    assert!(matches!(mk(vec![65], 64, 32, plain(2), NF4_TABLE), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(mk(vec![65], 64, 33, plain(1), NF4_TABLE), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(mk(vec![65], 64, 33, plain(3), NF4_TABLE), Err(Error::ShapeMismatch { .. })));
    assert!(mk(vec![65], 64, 33, BlockScales::Plain(vec![1.0, -1.0]), NF4_TABLE).is_err());
    assert!(mk(vec![65], 64, 33, BlockScales::Plain(vec![1.0, f32::NAN]), NF4_TABLE).is_err());
    let mut bad = NF4_TABLE;
    bad[3] = f32::INFINITY;
    assert!(mk(vec![65], 64, 33, plain(2), bad).is_err());
    assert!(mk(vec![usize::MAX, 3], 64, 0, plain(0), NF4_TABLE).is_err());
    assert!(mk(vec![0, 3], 64, 0, plain(0), NF4_TABLE).is_ok());
    // Double-quantized scales with the wrong count, and a scale that decodes to infinity.
    let dq = DoubleQuantScales::from_parts(vec![255; 3], vec![f32::MAX], f32::MAX, 256, Box::new(DYNAMIC_MAP)).unwrap();
    assert!(matches!(
        mk(vec![64], 64, 32, BlockScales::Double(dq.clone()), NF4_TABLE),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(mk(vec![3 * 64], 64, 96, BlockScales::Double(dq), NF4_TABLE), Err(Error::Format { .. })));
}

#[test]
fn double_quant_from_parts_validates() {
    let map = || Box::new(DYNAMIC_MAP);
    assert!(DoubleQuantScales::from_parts(vec![0; 300], vec![1.0, 1.0], 0.5, 256, map()).is_ok());
    assert!(DoubleQuantScales::from_parts(vec![0; 300], vec![1.0], 0.5, 256, map()).is_err());
    assert!(DoubleQuantScales::from_parts(vec![0; 300], vec![1.0, 1.0], 0.5, 0, map()).is_err());
    assert!(DoubleQuantScales::from_parts(vec![0; 300], vec![1.0, 1.0], 0.5, 100, map()).is_err());
    assert!(DoubleQuantScales::from_parts(vec![0; 300], vec![1.0, -1.0], 0.5, 256, map()).is_err());
    assert!(DoubleQuantScales::from_parts(vec![0; 300], vec![1.0, 1.0], f32::NAN, 256, map()).is_err());
    let mut m = DYNAMIC_MAP;
    m[9] = f32::NAN;
    assert!(DoubleQuantScales::from_parts(vec![0; 300], vec![1.0, 1.0], 0.5, 256, Box::new(m)).is_err());
    let d = double_quantize(&[1.0, 2.0, 3.0]).unwrap();
    assert_eq!(d.nested_blocksize(), NESTED_BLOCKSIZE);
    assert_eq!(d.offset(), 2.0);
    assert_eq!(d.codes(), &[0, 127, 255]);
    assert_eq!(d.nested_absmax(), &[1.0]);
    assert_eq!(d.decode(), vec![DYNAMIC_MAP[0] + 2.0, 2.0, 3.0]); // the map has no -1.0: its end is -0.99296874
    assert!(double_quantize(&[1.0, f32::NAN]).is_err());
    assert!(double_quantize(&[1.0, -1.0]).is_err());
}

#[test]
fn bad_inputs_give_typed_errors() {
    let x = ramp(128);
    for bs in [0, 1, 48, 100, 8192] {
        assert!(matches!(quantize_nf4(&x, &[128], bs, false), Err(Error::InvalidArgument { .. })), "{bs}");
    }
    assert!(matches!(quantize_nf4(&x, &[127], 64, false), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(quantize_nf4(&x, &[2, 65], 64, true), Err(Error::ShapeMismatch { .. })));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut y = x.clone();
        y[77] = bad;
        match quantize_nf4(&y, &[128], 64, true) {
            Err(Error::NonFinite { index, .. }) => assert_eq!(index, 77),
            other => panic!("{other:?}"),
        }
    }
    let h: Vec<half::f16> = vec![half::f16::INFINITY; 3];
    assert!(matches!(quantize_nf4(&h, &[3], 32, false), Err(Error::NonFinite { .. })));
    let q = quantize_nf4(&x, &[128], 64, false).unwrap();
    let mut out = vec![0.0f32; 127];
    assert!(matches!(q.dequantize_into(&mut out), Err(Error::ShapeMismatch { .. })));
}

#[test]
fn packing_layout_and_padding() {
    // First element in the high nibble; an odd count pads with the code of zero (7 for NF4, 0 for FP4).
    let q = quantize_nf4(&[-1.0f32, 1.0, 0.0], &[3], 32, false).unwrap();
    assert_eq!(q.packed(), &[0x0f, 0x77]);
    assert_eq!(q.absmax(), vec![1.0]);
    let q = quantize_4bit(FourBitFormat::Fp4, &[-1.0f32, 1.0, 0.5], &[3], 32, false).unwrap();
    assert_eq!(q.packed(), &[0xb3, 0x50]);
    // All-zero block: absmax 0, bytes 0x77, zeros back.
    let q = quantize_nf4(&[0.0f32; 64], &[64], 64, true).unwrap();
    assert_eq!(q.packed(), &[0x77; 32][..]);
    assert_eq!(q.dequantize::<f32>().unwrap(), vec![0.0; 64]);
}

#[test]
fn bits_per_weight() {
    let x = ramp(64 * 256 * 4);
    let plain = quantize_nf4(&x, &[x.len()], 64, false).unwrap();
    assert_eq!(plain.bits_per_weight(), 4.5);
    let dq = quantize_nf4(&x, &[x.len()], 64, true).unwrap();
    // 4 + 8/64 + 32/(64*256) = 4.12695..., plus the one f32 offset spread over the tensor.
    let expected = 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0) + 32.0 / x.len() as f64;
    assert!((dq.bits_per_weight() - expected).abs() < 1e-12, "{}", dq.bits_per_weight());
    assert!((dq.bits_per_weight() - 4.127).abs() < 1e-3);
}

//! ggml / GGUF dequantization (`lowbit::ggml`): every decodable type on every CPU path equals gguf-py's
//! `gguf.quants.dequantize` bit for bit (fixtures from `tests/data/gguf/gen_fixtures.py`), whole tensors, row
//! by row and block by block, and tiled large enough to be split over threads; random bytes give the
//! reference's bits on every path; bad lengths and undecodable types are errors.
//!
//! NaN comparison: a NaN must be a NaN (its payload bits are the hardware's, `docs/formats.md` §9); every other
//! value, infinities and signed zeros included, must have the same bits.

use lowbit::cpu::KernelPath;
use lowbit::ggml::{dequantize, dequantize_into_with, GgmlType};
use lowbit::reference::ggml as reference;
use lowbit::Error;
use proptest::prelude::*;
use std::path::PathBuf;

/// The fixture tensors: `(type, rows, cols)` as `gen_fixtures.py` writes them (its `manifest.json` lists the
/// same shapes; file sizes are checked against these below).
const FIXTURES: &[(GgmlType, usize, usize)] = &[
    (GgmlType::F32, 3, 37),
    (GgmlType::F16, 3, 37),
    (GgmlType::BF16, 3, 37),
    (GgmlType::Q8_0, 7, 96),
    (GgmlType::Q4_0, 7, 96),
    (GgmlType::Q4_1, 7, 96),
    (GgmlType::Q5_0, 7, 96),
    (GgmlType::Q5_1, 7, 96),
    (GgmlType::Q2_K, 7, 512),
    (GgmlType::Q3_K, 7, 512),
    (GgmlType::Q4_K, 7, 512),
    (GgmlType::Q5_K, 7, 512),
    (GgmlType::Q6_K, 7, 512),
];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf")
}

/// `(raw blocks, gguf-py's f32 values)` of one type, sizes checked against the shape.
fn fixture(ty: GgmlType, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let dir = fixture_dir();
    let raw = std::fs::read(dir.join(format!("{ty}.bin"))).expect("fixture .bin (run gen_fixtures.py)");
    let f = std::fs::read(dir.join(format!("{ty}.f32"))).expect("fixture .f32 (run gen_fixtures.py)");
    assert_eq!(raw.len(), ty.bytes_for(rows * cols).unwrap(), "{ty}.bin size");
    assert_eq!(f.len(), rows * cols * 4, "{ty}.f32 size");
    let expected = f.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    (raw, expected)
}

/// Index of the first element whose bits differ (any NaN matches any NaN).
fn first_mismatch(got: &[f32], want: &[f32]) -> Option<usize> {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).position(|(g, w)| !(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())))
}

fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    if let Some(i) = first_mismatch(got, want) {
        panic!(
            "{what}: element {i}: got {} ({:#010x}), want {} ({:#010x})",
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

#[test]
fn every_type_on_every_path_equals_gguf_py() {
    let paths = KernelPath::all_available();
    eprintln!("paths: {}", paths.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "));
    for &(ty, rows, cols) in FIXTURES {
        let (raw, want) = fixture(ty, rows, cols);
        for &path in &paths {
            // Whole tensor.
            let mut out = vec![f32::from_bits(0x7fc0_dead); rows * cols];
            dequantize_into_with(ty, &raw, &mut out, path).unwrap();
            assert_same_bits(&out, &want, &format!("{ty} on {path}"));
            // Row by row (each row a separate call), and block by block (1 row x 1 block).
            let row_bytes = ty.bytes_for(cols).unwrap();
            for r in 0..rows {
                let mut row = vec![0f32; cols];
                dequantize_into_with(ty, &raw[r * row_bytes..][..row_bytes], &mut row, path).unwrap();
                assert_same_bits(&row, &want[r * cols..][..cols], &format!("{ty} row {r} on {path}"));
            }
            let (be, bb) = (ty.block_elements(), ty.block_bytes());
            for (b, (blk, w)) in raw.chunks_exact(bb).zip(want.chunks_exact(be)).enumerate() {
                let mut one = vec![0f32; be];
                dequantize_into_with(ty, blk, &mut one, path).unwrap();
                assert_same_bits(&one, w, &format!("{ty} block {b} on {path}"));
            }
        }
        // The fixture exercises what it claims: finite realistic values, and (quantized types and the plain
        // types' special values) infinities and NaNs.
        assert!(
            want.iter().filter(|v| v.is_finite() && **v != 0.0).count() > want.len() / 4,
            "{ty}: too few normal values"
        );
        assert!(want.iter().any(|v| v.is_nan()) && want.iter().any(|v| v.is_infinite()), "{ty}: no non-finite values");
    }
}

#[test]
fn signalling_nans_of_plain_types_keep_their_bits_as_numpy_does() {
    // F16 0x7c01 (signalling NaN) widens to 0x7f802000 in numpy, not to the quiet 0x7fc02000.
    for &path in &KernelPath::all_available() {
        let mut out = [0f32; 2];
        dequantize_into_with(GgmlType::F16, &[0x01, 0x7c, 0x55, 0xfd], &mut out, path).unwrap();
        assert_eq!(out.map(f32::to_bits), [0x7f80_2000, 0xffaa_a000], "{path}");
        dequantize_into_with(GgmlType::BF16, &[0x81, 0x7f, 0xaa, 0xff], &mut out, path).unwrap();
        assert_eq!(out.map(f32::to_bits), [0x7f81_0000, 0xffaa_0000], "{path}");
    }
    let (raw, want) = fixture(GgmlType::F16, 3, 37);
    let got = dequantize(GgmlType::F16, &raw, 3 * 37).unwrap();
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn tiled_fixtures_split_over_threads_give_the_same_bits() {
    // Repeat each fixture's blocks until the tensor is large enough for several thread tasks (and an odd tail).
    for &(ty, rows, cols) in FIXTURES {
        let (raw, want) = fixture(ty, rows, cols);
        let reps = (3 << 16) / want.len() + 1;
        let big_raw: Vec<u8> = raw.iter().copied().cycle().take(raw.len() * reps).collect();
        let big_want: Vec<f32> = want.iter().copied().cycle().take(want.len() * reps).collect();
        for &path in &KernelPath::all_available() {
            let mut out = vec![0f32; big_want.len()];
            dequantize_into_with(ty, &big_raw, &mut out, path).unwrap();
            assert_same_bits(&out, &big_want, &format!("{ty} x{reps} on {path}"));
        }
    }
}

#[test]
fn non_finite_scales_decode_faithfully() {
    // Q8_0 with d = +inf: q * inf is +-inf, and 0 * inf is NaN, as in gguf-py (no error; callers check).
    let mut block = vec![0x00, 0x7c];
    block.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let out = dequantize(GgmlType::Q8_0, &block, 32).unwrap();
    assert!(out[16].is_nan());
    assert_eq!(out[0], f32::NEG_INFINITY);
    assert_eq!(out[31], f32::INFINITY);
}

#[test]
fn wrong_lengths_are_errors_naming_the_sizes() {
    let data = vec![0u8; GgmlType::Q4_K.block_bytes() * 2];
    // Not whole blocks.
    let mut out = vec![0f32; 300];
    let e = dequantize_into_with(GgmlType::Q4_K, &data, &mut out, KernelPath::REFERENCE).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains("256"), "{e}");
    // Whole blocks, wrong byte count (too few and too many).
    for n in [256 * 3, 256] {
        let mut out = vec![0f32; n];
        let e = dequantize_into_with(GgmlType::Q4_K, &data, &mut out, KernelPath::best()).unwrap_err();
        assert!(e.to_string().contains("288 bytes") && e.to_string().contains(&format!("{}", n / 256 * 144)), "{e}");
    }
    // A corrupt element count is rejected before anything is allocated.
    let e = dequantize(GgmlType::Q8_0, &data[..34], usize::MAX / 32 * 32).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    let e = dequantize(GgmlType::F32, &[0u8; 7], 2).unwrap_err();
    assert!(e.to_string().contains("7 bytes") && e.to_string().contains("8 bytes"), "{e}");
    // Empty is fine.
    assert!(dequantize(GgmlType::Q6_K, &[], 0).unwrap().is_empty());
}

#[test]
fn undecodable_types_are_unsupported_by_name() {
    let mut n = 0;
    for ty in GgmlType::all().filter(|t| !t.can_dequantize()) {
        let numel = ty.block_elements();
        let data = vec![0u8; ty.block_bytes()];
        let e = dequantize(ty, &data, numel).unwrap_err();
        assert!(matches!(&e, Error::Unsupported { what } if what.contains(ty.name())), "{ty}: {e}");
        n += 1;
    }
    assert!(n >= 15, "only {n} undecodable types listed");
}

/// Random blocks of a random decodable type.
fn random_blocks() -> impl Strategy<Value = (GgmlType, Vec<u8>)> {
    let types: Vec<GgmlType> = GgmlType::all().filter(|t| t.can_dequantize()).collect();
    (prop::sample::select(types), 1usize..24).prop_flat_map(|(ty, blocks)| {
        // Plain types: blocks of 16 elements and a tail, so both the vector body and the tail run.
        let n = if ty.block_elements() == 1 { blocks * 7 } else { blocks };
        prop::collection::vec(any::<u8>(), n * ty.block_bytes()).prop_map(move |v| (ty, v))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_give_the_reference_bits_on_every_path((ty, data) in random_blocks()) {
        let numel = data.len() / ty.block_bytes() * ty.block_elements();
        let mut want = vec![0f32; numel];
        reference::dequantize(ty, &data, &mut want);
        for &path in &KernelPath::all_available() {
            let mut out = vec![0f32; numel];
            dequantize_into_with(ty, &data, &mut out, path).unwrap();
            prop_assert_eq!(first_mismatch(&out, &want), None, "{} on {}", ty, path);
        }
    }
}

/// `all_types.gguf` (written by gguf-py's `GGUFWriter`, one tensor per type named after it in lowercase) read
/// through `GgufFile`: shapes as numpy sees them, and every tensor decodes to gguf-py's values bit for bit.
#[test]
fn all_types_gguf_through_the_reader_equals_gguf_py() {
    let file = lowbit::io::gguf::GgufFile::open(fixture_dir().join("all_types.gguf")).expect("all_types.gguf");
    for &(ty, rows, cols) in FIXTURES {
        let name = ty.name().to_lowercase();
        let info = file.tensor_info(&name).unwrap_or_else(|| panic!("tensor {name} in all_types.gguf"));
        assert_eq!(info.ggml_type, ty, "{name}");
        assert_eq!(info.shape, vec![rows, cols], "{name}");
        let (_, want) = fixture(ty, rows, cols);
        assert_same_bits(&file.tensor_f32(&name).unwrap(), &want, &format!("{name} via GgufFile"));
    }
}

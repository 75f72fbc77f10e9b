//! Reading and dequantizing a range of rows without the rest of the tensor: `Checkpoint::tensor_rows_f32`
//! (GGUF block types and safetensors F16) and `AffineTensor::dequantize_rows_into` (every granularity) equal
//! the same rows of the whole-tensor calls, bit for bit; bad ranges are errors.

use lowbit::affine::{quantize, Granularity};
use lowbit::io::Checkpoint;
use lowbit::io::{serialize_safetensors, TensorData};
use lowbit::Error;
use lowbit_testkit::Rng;
use safetensors::Dtype;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn gguf_row_ranges_equal_the_whole_tensor() {
    // tiny_llama: Q8_0 / Q4_1 / F32 tensors, Q and K stored permuted.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/tiny_llama.gguf");
    let ck = Checkpoint::open(&path).unwrap();
    let mut checked = 0;
    for name in ck.tensor_names() {
        let info = ck.tensor_info(name).unwrap();
        let [rows, cols] = info.shape[..] else { continue };
        let whole = ck.tensor_f32(name).unwrap();
        let permuted = name.contains("q_proj") || name.contains("k_proj");
        for range in [0..rows, 1..rows.min(3), rows - 1..rows, 2..2] {
            match ck.tensor_rows_f32(name, range.clone()) {
                Ok(got) => {
                    assert!(!permuted, "{name}: permuted rows must be refused");
                    assert_eq!(bits(&got), bits(&whole[range.start * cols..range.end * cols]), "{name} {range:?}");
                    checked += 1;
                }
                Err(e) => {
                    assert!(permuted && matches!(e, Error::Unsupported { .. }), "{name}: {e}");
                }
            }
        }
        let e = ck.tensor_rows_f32(name, rows - 1..rows + 1).unwrap_err();
        assert!(e.to_string().contains(&format!("within 0..{rows}")) || permuted, "{name}: {e}");
    }
    assert!(checked >= 12, "only {checked} ranges checked");
}

#[test]
fn safetensors_row_ranges_equal_the_whole_tensor() {
    let mut rng = Rng::new(5);
    let (rows, cols) = (9, 13);
    let v: Vec<half::f16> = (0..rows * cols).map(|_| half::f16::from_f64(rng.normal())).collect();
    let tensors = [("w".to_string(), TensorData::from_slice(Dtype::F16, vec![rows, cols], &v))];
    let ck = Checkpoint::from_bytes(serialize_safetensors(&tensors, None).unwrap()).unwrap();
    let whole = ck.tensor_f32("w").unwrap();
    for r in [0..9, 3..7, 8..9] {
        assert_eq!(bits(&ck.tensor_rows_f32("w", r.clone()).unwrap()), bits(&whole[r.start * cols..r.end * cols]));
    }
    assert!(ck.tensor_rows_f32("w", 5..10).is_err());
    assert!(ck.tensor_rows_f32("missing", 0..1).is_err());
}

#[test]
fn affine_row_dequantization_equals_the_whole_tensor_for_every_granularity() {
    let mut rng = Rng::new(9);
    let (rows, cols) = (11, 37);
    let x: Vec<f32> = (0..rows * cols).map(|_| (rng.normal() * 3.0) as f32).collect();
    for g in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(8), Granularity::PerGroup(64)] {
        let t = quantize(&x, &[rows, cols], g).unwrap();
        let whole: Vec<f32> = t.dequantize().unwrap();
        for r in [0..rows, 4..5, 10..11, 3..3] {
            let mut out = vec![f32::NAN; r.len() * cols];
            t.dequantize_rows_into(r.clone(), &mut out).unwrap();
            assert_eq!(bits(&out), bits(&whole[r.start * cols..r.end * cols]), "{g} rows {r:?}");
        }
        let mut out = vec![0.0; cols];
        assert!(t.dequantize_rows_into(rows..rows + 1, &mut out).is_err(), "past the last row");
        assert!(t.dequantize_rows_into(0..2, &mut out).is_err(), "out too short");
    }
}

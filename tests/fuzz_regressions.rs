//! Regression tests for what the fuzz targets in `fuzz/` found (one test per finding, named after it), and
//! for the resource limits of `lowbit::io::Limits`. Each test rebuilds the failing input with the public API.

use lowbit::affine::{self, AffineTensor, Granularity};
use lowbit::cpu::KernelPath;
use lowbit::io::{self, bnb, Limits};
use lowbit::Error;

/// The header of a safetensors buffer: an 8-byte little-endian length, then `json`, then `data`.
fn safetensors_bytes(json: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(data);
    out
}

fn format_error_containing(r: lowbit::Result<impl std::fmt::Debug>, needle: &str) {
    match r {
        Err(e @ Error::Format { .. }) => assert!(e.to_string().contains(needle), "{e} does not mention {needle:?}"),
        other => panic!("expected a format error mentioning {needle:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------- limits

#[test]
fn limits_header_length_beyond_the_bytes_present_is_refused_before_parsing() {
    // Declares 1000 bytes of header, 2 present.
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    format_error_containing(io::parse_safetensors(&bytes), "only 2 follow");
    // Declares u64::MAX bytes.
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    format_error_containing(io::parse_safetensors(&bytes), "Limits::max_json_bytes");
    format_error_containing(io::parse_safetensors(&bytes[..5]), "shorter than the 8-byte");
}

#[test]
fn limits_header_json_size_and_depth() {
    let deep = format!("{{\"__metadata__\": {{\"a\": \"b\"}}, \"x\": {}1{}}}", "[".repeat(40), "]".repeat(40));
    format_error_containing(io::parse_safetensors(&safetensors_bytes(&deep, &[])), "Limits::max_json_depth");
    // Brackets inside strings do not count.
    let ok = format!("{{\"__metadata__\": {{\"a\": \"{}\"}}}}", "[".repeat(100));
    io::parse_safetensors(&safetensors_bytes(&ok, &[])).unwrap();
    let small = Limits { max_json_bytes: 16, ..Limits::DEFAULT };
    format_error_containing(io::parse_safetensors_with_limits(&safetensors_bytes(&ok, &[]), &small), "max_json_bytes");
}

#[test]
fn limits_max_tensor_bytes_applies_to_files_and_to_decoded_4bit_weights() {
    let w: Vec<f32> = (0..64 * 64).map(|i| (i % 17) as f32 - 8.0).collect();
    let q = lowbit::nf4::quantize_nf4(&w, &[64, 64], 64, true).unwrap();
    let bytes = io::serialize_safetensors(&bnb::to_tensors("w", &q).unwrap(), None).unwrap();
    // 2048 packed bytes are present; decoded to f32 the weight is 16384 bytes.
    let tight = Limits { max_tensor_bytes: 4096, ..Limits::DEFAULT };
    let st = io::parse_safetensors_with_limits(&bytes, &tight).unwrap();
    format_error_containing(bnb::load_checkpoint_with_limits(&st, &tight), "max_tensor_bytes");
    let tighter = Limits { max_tensor_bytes: 1024, ..Limits::DEFAULT };
    format_error_containing(io::parse_safetensors_with_limits(&bytes, &tighter), "max_tensor_bytes");
    assert_eq!(bnb::load_checkpoint(&io::parse_safetensors(&bytes).unwrap()).unwrap()[0].1, q);
}

#[test]
fn limits_quant_state_json_depth() {
    let w: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let q = lowbit::nf4::quantize_nf4(&w, &[64], 64, false).unwrap();
    let mut tensors = bnb::to_tensors("w", &q).unwrap();
    let deep = format!("{{\"shape\": {}64{}}}", "[".repeat(100), "]".repeat(100));
    let last = tensors.last_mut().unwrap();
    *last = (last.0.clone(), io::TensorData::from_slice(safetensors::Dtype::U8, vec![deep.len()], deep.as_bytes()));
    let bytes = io::serialize_safetensors(&tensors, None).unwrap();
    format_error_containing(bnb::load_checkpoint(&io::parse_safetensors(&bytes).unwrap()), "max_json_depth");
}

#[test]
fn limits_shape_products_that_overflow_are_errors() {
    // A safetensors header whose shape product overflows (the data is empty).
    let json = r#"{"w": {"dtype": "U8", "shape": [4294967296, 4294967296, 2], "data_offsets": [0, 0]}}"#;
    assert!(io::parse_safetensors(&safetensors_bytes(json, &[])).is_err());
    let json = r#"{"w": {"dtype": "U8", "shape": [18446744073709551615, 2, 0], "data_offsets": [0, 0]}}"#;
    assert!(io::parse_safetensors(&safetensors_bytes(json, &[])).is_err());
    assert!(lowbit::shape::numel(&[usize::MAX, 2, 0]).is_err());
    assert_eq!(lowbit::shape::numel(&[0, usize::MAX, 2]).unwrap(), 0);
}

// ---------------------------------------------------------------- findings

/// fuzz `quantize`: a finite input whose range `max - min` overflows f32 (e.g. ±3e38) calibrated to an
/// infinite scale, so every element dequantized to NaN (`0 * inf`) and `AffineTensor::from_parts` rejected
/// the tensor `quantize` had returned. Such input is now an error.
#[test]
fn affine_range_overflow_is_an_error_not_an_infinite_scale() {
    let x = [3e38f32, -3e38, 1.0, 0.0];
    for g in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(2)] {
        for path in KernelPath::all_available() {
            match affine::quantize_with(&x, &[1, 4], g, path) {
                Err(Error::InvalidArgument { arg: "x", .. }) => {}
                other => panic!("{g} {path}: expected an error for an overflowing range, got {other:?}"),
            }
        }
    }
    // Each group on its own is fine: the range of [3e38, -3e38] overflows only within one group.
    let t = affine::quantize(&x, &[2, 2], Granularity::PerChannel);
    assert!(t.is_err());
    let t = affine::quantize(&[3e38f32, 1.0, -3e38, 0.0], &[2, 2], Granularity::PerChannel).unwrap();
    assert!(t.dequantize::<f32>().unwrap().iter().all(|v| v.is_finite()));
    AffineTensor::from_parts(
        t.shape().to_vec(),
        t.granularity(),
        t.codes().to_vec(),
        t.scales().to_vec(),
        t.zero_points().to_vec(),
    )
    .unwrap();
}

//! Chunked conversion is exact: `quantize` and `dequantize` with a small `--memory-budget` (1 MiB chunks, so
//! every tensor here is converted in 2–4 pieces, some pieces ending inside a row) write byte for byte the
//! files a budget large enough for whole tensors writes, and those equal the library's whole-tensor
//! quantization. The inputs cover F32 / F16 / BF16, a tensor whose bytes are not aligned for its type (decoded
//! a chunk at a time), an odd number of 4-bit codes, blocks that straddle rows, and every int8 granularity
//! (per-tensor from an unaligned source exercises the min/max pre-pass).

mod common;
use common::*;
use lowbit::io::Checkpoint;
use lowbit::linear::QuantWeight;
use std::path::Path;

/// Deterministic values in about [-2, 2).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        })
        .collect()
}

/// (name, dtype, shape): written in this order, so `a.weight` starts 6 bytes into the data (unaligned f32).
const TENSORS: [(&str, &str, [usize; 2]); 5] = [
    ("pad", "F16", [1, 3]),
    ("a.weight", "F32", [700, 1000]),
    ("b.weight", "F16", [513, 2048]),
    ("c.weight", "BF16", [257, 4100]),
    ("d.weight", "F32", [3, 333_333]),
];

/// A safetensors file with `TENSORS` in order (the `safetensors` crate would reorder them by alignment).
fn write_input(path: &Path) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (i, (name, dtype, shape)) in TENSORS.iter().enumerate() {
        let v = values(shape[0] * shape[1], 7 + i as u64);
        let start = data.len();
        for x in v {
            match *dtype {
                "F32" => data.extend_from_slice(&x.to_le_bytes()),
                "F16" => data.extend_from_slice(&lowbit::f16::from_f32(x).to_le_bytes()),
                _ => data.extend_from_slice(&lowbit::bf16::from_f32(x).to_le_bytes()),
            }
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes).unwrap();
}

/// The input tensor `name` as f32 values and its stored element type.
fn input_f32(ck: &Checkpoint, name: &str) -> Vec<f32> {
    ck.tensor_f32(name).unwrap()
}

#[test]
fn chunked_conversion_writes_the_whole_tensor_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.safetensors");
    write_input(&input);
    let ck = Checkpoint::open(&input).unwrap();
    assert!(!(ck.tensor("a.weight").unwrap().data().as_ptr() as usize).is_multiple_of(4), "a.weight must be unaligned");
    let include = ["--include", "*"];
    for scheme in ["nf4:64+dq", "fp4:128", "nf4:4096", "int8:tensor", "int8:channel", "int8:group:128"] {
        let mut files = Vec::new();
        for budget in ["4MiB", "4GiB"] {
            let q = tmp.path().join(format!("q-{}-{budget}.safetensors", scheme.replace(':', "_")));
            let mut args = vec!["quantize", s(&input), "--scheme", scheme, "--memory-budget", budget, "-o", s(&q)];
            args.extend(include);
            assert_ok(&lowbit(&args));
            let back = tmp.path().join(format!("d-{}-{budget}.safetensors", scheme.replace(':', "_")));
            assert_ok(&lowbit(&["dequantize", s(&q), "--memory-budget", budget, "-o", s(&back)]));
            files.push((std::fs::read(&q).unwrap(), std::fs::read(&back).unwrap(), q, back));
        }
        assert!(files[0].0 == files[1].0, "{scheme}: quantized files differ between 1 MiB chunks and whole tensors");
        assert!(files[0].1 == files[1].1, "{scheme}: dequantized files differ between 1 MiB chunks and whole tensors");

        // Against the library's whole-tensor functions.
        let (_, _, q_path, back_path) = &files[0];
        let qck = Checkpoint::open(q_path).unwrap();
        let back = Checkpoint::open(back_path).unwrap();
        let parsed: lowbit::Scheme = scheme.parse().unwrap();
        for (name, _, shape) in TENSORS.iter().skip(1) {
            let x = input_f32(&ck, name);
            let stored = qck.quantized_weight(name).unwrap();
            let expected = quantize_like_stored(&ck, name, shape, parsed);
            match (&stored, &expected) {
                (QuantWeight::FourBit(a), QuantWeight::FourBit(b)) => {
                    assert!(a.packed() == b.packed(), "{scheme} {name}: codes");
                    assert_eq!(bits(a.decoded_scales()), bits(b.decoded_scales()), "{scheme} {name}: scales");
                }
                (QuantWeight::Int8(a), QuantWeight::Int8(b)) => {
                    assert!(a.codes() == b.codes(), "{scheme} {name}: codes");
                    assert_eq!(bits(a.scales()), bits(b.scales()), "{scheme} {name}: scales");
                    assert!(a.zero_points() == b.zero_points(), "{scheme} {name}: zero points");
                }
                _ => panic!("{scheme} {name}: stored as another scheme"),
            }
            let want: Vec<f32> = match &expected {
                QuantWeight::FourBit(t) => t.dequantize::<f32>().unwrap(),
                QuantWeight::Int8(q) => q.dequantize::<f32>().unwrap(),
            };
            // 4-bit weights dequantize to the dtype they came from; int8 to f32.
            let got = back.tensor_f32(name).unwrap();
            let want: Vec<f32> = match (&expected, back.tensor(name).unwrap().dtype()) {
                (QuantWeight::FourBit(_), safetensors::Dtype::F16) => {
                    want.iter().map(|&v| lowbit::f16::from_f32(v).to_f32()).collect()
                }
                (QuantWeight::FourBit(_), safetensors::Dtype::BF16) => {
                    want.iter().map(|&v| lowbit::bf16::from_f32(v).to_f32()).collect()
                }
                _ => want,
            };
            assert_eq!(bits(&got), bits(&want), "{scheme} {name}: dequantized");
            assert_eq!(x.len(), got.len());
        }
    }
}

/// What the library's whole-tensor quantizer makes of input tensor `name` in its stored element type.
fn quantize_like_stored(ck: &Checkpoint, name: &str, shape: &[usize; 2], scheme: lowbit::Scheme) -> QuantWeight {
    let x = ck.tensor_f32(name).unwrap();
    match ck.tensor(name).unwrap().dtype() {
        safetensors::Dtype::F16 => {
            quantize_whole(&x.iter().map(|&v| lowbit::f16::from_f32(v)).collect::<Vec<_>>(), shape, scheme)
        }
        safetensors::Dtype::BF16 => {
            quantize_whole(&x.iter().map(|&v| lowbit::bf16::from_f32(v)).collect::<Vec<_>>(), shape, scheme)
        }
        _ => quantize_whole(&x, shape, scheme),
    }
}

fn quantize_whole<T: lowbit::Element>(x: &[T], shape: &[usize; 2], scheme: lowbit::Scheme) -> QuantWeight {
    match scheme {
        lowbit::Scheme::Int8(g) => QuantWeight::Int8(lowbit::affine::quantize(x, shape, g).unwrap()),
        lowbit::Scheme::FourBit { format, blocksize, double_quant } => {
            QuantWeight::FourBit(lowbit::nf4::quantize_4bit(format, x, shape, blocksize, double_quant).unwrap())
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A non-finite element is reported at its index in the whole tensor, not in the chunk that holds it.
#[test]
fn a_non_finite_element_is_named_by_its_tensor_index() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("nan.safetensors");
    let (rows, cols) = (600usize, 1000usize);
    let mut x = values(rows * cols, 3);
    let bad = 2 * rows * cols / 3 + 5; // in the third 1 MiB chunk
    x[bad] = f32::NAN;
    let mut data = Vec::new();
    x.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes()));
    let t = lowbit::io::TensorData { dtype: safetensors::Dtype::F32, shape: vec![rows, cols], data };
    lowbit::io::write_safetensors(&input, &[("w.weight".to_string(), t)], None, false).unwrap();
    for scheme in ["nf4:64+dq", "int8:channel", "int8:tensor"] {
        let out = tmp.path().join("out.safetensors");
        let o = lowbit(&[
            "quantize",
            s(&input),
            "--scheme",
            scheme,
            "--include",
            "*",
            "--memory-budget",
            "4MiB",
            "-o",
            s(&out),
        ]);
        assert_clean_failure(&o, &format!("index {bad}"));
        assert!(!out.exists(), "{scheme}: no output after a failure");
    }
}

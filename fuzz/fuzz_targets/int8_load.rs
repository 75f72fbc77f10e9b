//! Arbitrary bytes as a safetensors file → the lowbit int8 layout (`io::int8`) and `io::peft::quant_linears_from`
//! (which builds `QuantLinear`s from int8 or bitsandbytes files). Must return Ok or Err; an int8 weight that
//! loads dequantizes to the reference bits on every path and round-trips through `int8::to_tensors`; a
//! layer that loads runs a forward pass of the right size, and `io::Checkpoint::from_shared` (views of the
//! buffer instead of copies) builds the same layers, or fails where the copying loader fails.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use lowbit::cpu::KernelPath;
use lowbit::io::{int8, parse_safetensors, parse_safetensors_with_limits, peft, serialize_safetensors, Checkpoint};

fuzz_target!(|data: &[u8]| {
    let limits = common::limits();
    let Ok(st) = parse_safetensors_with_limits(data, &limits) else { return };
    let Ok(meta) = int8::read_metadata(data) else { return };
    if let Ok(Some(layout)) = int8::Int8Layout::from_metadata(&meta) {
        for name in layout.weights.keys() {
            let Ok(t) = layout.load(&st, name) else { continue };
            let want: Vec<f32> = t.dequantize_with(KernelPath::REFERENCE).unwrap();
            for path in KernelPath::all_available() {
                assert!(common::bits_eq(&t.dequantize_with::<f32>(path).unwrap(), &want), "path {path}");
            }
            let m = int8::metadata(layout.granularity, [(name.as_str(), lowbit::DType::F32)]);
            let bytes = serialize_safetensors(&int8::to_tensors(name, &t), Some(m)).expect("serialize");
            let back_st = parse_safetensors(&bytes).expect("our own output parses");
            let back_meta = int8::read_metadata(&bytes).unwrap();
            let back_layout = int8::Int8Layout::from_metadata(&back_meta).unwrap().unwrap();
            assert_eq!(back_layout.load(&back_st, name).expect("our own output loads"), t);
        }
    }
    let copied = peft::quant_linears_from_with_limits(&st, &meta, &limits);
    let shared = Checkpoint::from_shared(std::sync::Arc::new(data.to_vec()), limits).and_then(|c| c.layers());
    match (&copied, &shared) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.len(), b.len(), "same layers from a copy and from views");
            for ((na, la), (nb, lb)) in a.iter().zip(b) {
                assert_eq!((na, la.weight(), la.bias()), (nb, lb.weight(), lb.bias()));
            }
        }
        // The copying loader refuses a dense file (Unsupported); the checkpoint opens it with no layers.
        (Err(_), Ok(b)) => assert!(b.is_empty(), "a file the copying loader refuses has no checkpoint layers"),
        (Ok(a), Err(e)) => panic!("copying loader built {} layers, the checkpoint failed: {e}", a.len()),
        (Err(_), Err(_)) => {}
    }
    if let Ok(layers) = peft::quant_linears_from(&st, &meta) {
        for (_, layer) in &layers {
            let (out, inp) = (layer.out_features(), layer.in_features());
            if out.saturating_mul(inp) > 1 << 20 {
                continue;
            }
            let x = vec![0.5f32; inp];
            let y = layer.forward(&x).expect("a loaded layer runs");
            assert_eq!(y.len(), out);
        }
    }
});

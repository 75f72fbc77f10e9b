//! Arbitrary bytes as a safetensors file → the bitsandbytes 4-bit loader. Must return Ok or Err (never panic,
//! abort or allocate beyond the limits); whatever loads must dequantize identically on every path and
//! survive a write/read round trip.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use lowbit::io::{bnb, parse_safetensors_with_limits};

fuzz_target!(|data: &[u8]| {
    let limits = common::limits();
    let Ok(st) = parse_safetensors_with_limits(data, &limits) else { return };
    let names = bnb::quantized_weight_names(&st);
    if let Ok(all) = bnb::load_checkpoint_with_limits(&st, &limits) {
        assert_eq!(all.len(), names.len());
        for (name, t) in &all {
            common::check_four_bit(name, t);
        }
    }
    for name in &names {
        let prefix = name.strip_suffix("weight").unwrap_or(name);
        if let Ok(layer) = bnb::load_layer_with_limits(&st, prefix, &limits) {
            let bias = layer.bias_f32().expect("a loaded bias decodes");
            if let Some(b) = bias {
                assert_eq!(b.len(), layer.weight.shape().first().copied().unwrap_or(1));
            }
            let back = bnb::layer_to_tensors(prefix, &layer).expect("a loaded layer can be written back");
            assert!(!back.is_empty());
        }
    }
});

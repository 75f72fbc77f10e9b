//! PEFT adapters: input = 4-byte little-endian config length, `adapter_config.json` text, then the bytes of
//! `adapter_model.safetensors`. `PeftAdapter::from_parts` must return Ok or Err; an adapter that loads gives
//! a `LoraAdapter` for every module, attaches to layers of its modules' shapes, runs forward, and merges
//! (`merge::merge_into_layer`, Ok or Err).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use lowbit::affine::{quantize, Granularity};
use lowbit::io::{parse_safetensors_with_limits, peft};
use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::Error;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let n = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let rest = &data[4..];
    let (cfg, weights) = rest.split_at(n.min(rest.len()));
    let Ok(cfg) = std::str::from_utf8(cfg) else { return };
    let limits = common::limits();
    let _ = peft::PeftConfig::parse(cfg);
    let Ok(st) = parse_safetensors_with_limits(weights, &limits) else { return };
    let Ok(adapter) = peft::PeftAdapter::from_parts(cfg, &st) else { return };
    let mut layers = Vec::new();
    for m in adapter.modules() {
        let ad = adapter.lora_adapter(&m.path, "fuzz").expect("a loaded module makes a LoraAdapter");
        assert_eq!((ad.in_features(), ad.out_features()), (m.in_features, m.out_features));
        let (o, i) = (m.out_features, m.in_features);
        if o.saturating_mul(i) > 1 << 16 || layers.iter().any(|(p, _)| p == &m.path) {
            continue;
        }
        let w: Vec<f32> = (0..o * i).map(|k| (k % 7) as f32 - 3.0).collect();
        let q = quantize(&w, &[o, i], Granularity::PerChannel).unwrap();
        layers.push((m.path.clone(), QuantLinear::new(QuantWeight::Int8(q), None).unwrap()));
    }
    let report = adapter.attach(&mut layers, "default").expect("layers of the modules' shapes accept the adapter");
    assert!(report.layers_without_adapter.is_empty());
    for (_, layer) in &layers {
        let x = vec![0.25f32; 2 * layer.in_features()];
        match layer.forward(&x) {
            Ok(y) => assert_eq!(y.len(), 2 * layer.out_features()),
            // Finite adapter weights from the file may still overflow f32 in the product: a typed error.
            Err(Error::NonFinite { arg, .. }) if arg.starts_with('y') => {}
            Err(e) => panic!("forward: {e}"),
        }
        if let Ok((merged, _report)) = lowbit::merge::merge_into_layer(layer, "default") {
            assert_eq!(merged.out_features(), layer.out_features());
            assert!(merged.adapters().is_empty());
        }
    }
});

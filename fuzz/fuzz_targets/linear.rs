//! `QuantLinear` with arbitrary weight shapes and formats, biases, adapters (ranks, shapes that do or do not
//! fit, duplicate names, disabled ones, removals) and inputs (arbitrary lengths, raw f32 bit patterns,
//! f16/bf16), through `forward` and `forward_batch` with arbitrary adapter ids, with f32 or int8 activations
//! (and the interleaved int8-activation layout built or not), and
//! `merge::merge_into_layer`. Must return Ok or Err; an Ok output has `M × out` values.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lowbit::bf16;
use lowbit::cpu::KernelPath;
use lowbit::linear::{Activations, ForwardOptions, QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;

#[derive(Arbitrary, Debug)]
struct Adapter {
    name: u8,
    rank: u8,
    /// Added to the layer's in / out features (0 fits).
    in_delta: i8,
    out_delta: i8,
    alpha_bits: u32,
    rslora: bool,
    enabled: bool,
    fill: common::Fill,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Forward {
        bf16_input: bool,
        /// Int8 activations (`Activations::Int8`).
        act8: bool,
    },
    /// `QuantLinear::build_act8_layout` (later int8-activation forwards read the interleaved layout).
    BuildAct8Layout,
    Batch {
        ids: Vec<Option<u8>>,
    },
    Remove(u8),
    /// `merge::merge_into_layer` of adapter `a{i % 3}`.
    Merge(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    dims: Vec<u16>,
    format: common::FuzzScheme,
    weight_fill: common::Fill,
    bias: Option<common::Fill>,
    adapters: Vec<Adapter>,
    m: u8,
    x_len_delta: i8,
    x_fill: common::Fill,
    raw: Vec<u32>,
    seed: u64,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let shape = common::make_shape(&input.dims, 1 << 14);
    let numel: usize = shape.iter().product();
    let w = common::make_values(numel, &input.raw, input.weight_fill, input.seed);
    let Some(scheme) = input.format.scheme() else { return };
    let Ok(weight) = QuantWeight::quantize(&w, &shape, scheme) else { return };
    let out = shape.first().copied().unwrap_or(0);
    let bias = input.bias.map(|f| common::make_values(out, &input.raw, f, input.seed ^ 1));
    let Ok(mut layer) = QuantLinear::new(weight, bias) else { return };
    let (out, inp) = (layer.out_features(), layer.in_features());
    for (i, a) in input.adapters.iter().take(4).enumerate() {
        let r = a.rank as usize % 9;
        let ai = (inp as isize + a.in_delta as isize % 2).max(0) as usize;
        let ao = (out as isize + a.out_delta as isize % 2).max(0) as usize;
        let av = common::make_values(r * ai, &input.raw, a.fill, input.seed ^ (i as u64 + 2));
        let bv = common::make_values(ao * r, &input.raw, a.fill, input.seed ^ (i as u64 + 9));
        let name = format!("a{}", a.name % 3);
        if let Ok(ad) = LoraAdapter::new(name.clone(), r, av, bv, f32::from_bits(a.alpha_bits), a.rslora) {
            if layer.add_adapter(ad).is_ok() && !a.enabled {
                layer.set_adapter_enabled(&name, false).unwrap();
            }
        }
    }
    let m = input.m as usize % 9;
    let len = (m * inp) as isize + input.x_len_delta as isize % 2;
    let x = common::make_values(len.max(0) as usize, &input.raw, input.x_fill, input.seed ^ 77);
    for op in input.ops.iter().take(4) {
        match op {
            Op::Forward { bf16_input, act8 } => {
                let opts = if *act8 {
                    ForwardOptions::default().activations(Activations::Int8)
                } else {
                    ForwardOptions::default()
                };
                let r = if *bf16_input {
                    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                    layer.forward_with(&xb, opts)
                } else {
                    layer.forward_with(&x, opts)
                };
                if let Ok(y) = r {
                    assert_eq!(y.len(), x.len() / inp * out);
                    assert_eq!(x.len() % inp, 0, "a ragged x was accepted");
                }
            }
            Op::Batch { ids } => {
                let ids: Vec<Option<usize>> = ids.iter().map(|i| i.map(|i| i as usize % 6)).collect();
                for path in [KernelPath::best(), KernelPath::REFERENCE] {
                    if let Ok(y) =
                        layer.forward_with(&x, lowbit::linear::ForwardOptions::default().adapter_ids(&ids).path(path))
                    {
                        assert_eq!(ids.len() * inp, x.len());
                        assert_eq!(y.len(), ids.len() * out);
                        for id in ids.iter().flatten() {
                            assert!(layer.adapters()[*id].is_enabled());
                        }
                    }
                }
            }
            Op::BuildAct8Layout => {
                layer.build_act8_layout();
            }
            Op::Remove(i) => {
                let _ = layer.remove_adapter(&format!("a{}", i % 3));
            }
            Op::Merge(i) => {
                let name = format!("a{}", i % 3);
                if let Ok((merged, report)) = lowbit::merge::merge_into_layer(&layer, &name) {
                    assert_eq!((merged.out_features(), merged.in_features()), (out, inp));
                    assert_eq!(merged.adapters().len() + 1, layer.adapters().len());
                    assert_eq!(report.numel, out * inp);
                }
            }
        }
    }
});

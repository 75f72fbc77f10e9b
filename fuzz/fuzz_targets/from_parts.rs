//! Every `from_parts` constructor with arbitrary parts (lengths, scales, tables, maps, offsets, shapes whose
//! products overflow), then dequantization of whatever is accepted. Must return Ok or Err; an accepted
//! tensor must dequantize to the same bits on every path, and finite values only.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lowbit::affine::{AffineTensor, Granularity};
use lowbit::cpu::KernelPath;
use lowbit::double_quant::DoubleQuantScales;
use lowbit::lora::LoraAdapter;
use lowbit::nf4::{BlockScales, FourBitFormat, FourBitTensor};
use lowbit::DType;

#[derive(Arbitrary, Debug)]
enum Parts {
    Affine {
        shape: Vec<u64>,
        granularity: (u8, u32),
        codes: Vec<u8>,
        scales: Vec<u32>,
        zero_points: Vec<u8>,
    },
    FourBit {
        shape: Vec<u64>,
        fp4: bool,
        blocksize: u16,
        table: [u32; 16],
        builtin_table: bool,
        packed: Vec<u8>,
        plain: Option<Vec<u32>>,
        codes: Vec<u8>,
        nested_absmax: Vec<u32>,
        offset: u32,
        nested_blocksize: u16,
        map_patch: Vec<(u8, u32)>,
    },
    Lora {
        rank: u16,
        a: Vec<u32>,
        b: Vec<u32>,
        alpha: u32,
        rslora: bool,
    },
}

fn f32s(bits: &[u32]) -> Vec<f32> {
    bits.iter().map(|&b| f32::from_bits(b)).collect()
}

fn shape_of(s: &[u64]) -> Vec<usize> {
    s.iter().take(8).map(|&d| d as usize).collect()
}

fn check_dequant(f: impl Fn(KernelPath) -> Vec<f32>) {
    let want = f(KernelPath::REFERENCE);
    for path in KernelPath::all_available() {
        assert!(common::bits_eq(&f(path), &want), "path {path} differs from the reference");
    }
}

fuzz_target!(|parts: Parts| {
    match parts {
        Parts::Affine { shape, granularity, codes, scales, zero_points } => {
            let g = match granularity.0 % 3 {
                0 => Granularity::PerTensor,
                1 => Granularity::PerChannel,
                _ => Granularity::PerGroup(granularity.1 as usize),
            };
            let Ok(t) = AffineTensor::from_parts(shape_of(&shape), g, codes, f32s(&scales), zero_points) else {
                return;
            };
            check_dequant(|p| t.dequantize_with(p).unwrap());
            let _ = t.dequantize_to_bytes(DType::BF16).unwrap();
            let _ = t.bits_per_weight();
        }
        Parts::FourBit {
            shape,
            fp4,
            blocksize,
            table,
            builtin_table,
            packed,
            plain,
            codes,
            nested_absmax,
            offset,
            nested_blocksize,
            map_patch,
        } => {
            let format = if fp4 { FourBitFormat::Fp4 } else { FourBitFormat::Nf4 };
            let table: [f32; 16] = if builtin_table { *format.table() } else { table.map(f32::from_bits) };
            let scales = match plain {
                Some(p) => BlockScales::Plain(f32s(&p)),
                None => {
                    let mut map = Box::new(lowbit::double_quant::DYNAMIC_MAP);
                    for (i, v) in map_patch.iter().take(4) {
                        map[*i as usize] = f32::from_bits(*v);
                    }
                    match DoubleQuantScales::from_parts(
                        codes,
                        f32s(&nested_absmax),
                        f32::from_bits(offset),
                        nested_blocksize as usize,
                        map,
                    ) {
                        Ok(d) => {
                            assert!(d.decode().len() == d.len());
                            BlockScales::Double(d)
                        }
                        Err(_) => return,
                    }
                }
            };
            let Ok(t) = FourBitTensor::from_parts(
                shape_of(&shape),
                format,
                blocksize as usize,
                table,
                packed,
                scales,
                DType::F32,
            ) else {
                return;
            };
            check_dequant(|p| t.dequantize_with(p).unwrap());
            let _ = t.bits_per_weight();
            if builtin_table {
                let _ = lowbit::io::bnb::to_tensors("w", &t).expect("a built-in table writes");
            }
        }
        Parts::Lora { rank, a, b, alpha, rslora } => {
            if let Ok(ad) = LoraAdapter::new("x", rank as usize, f32s(&a), f32s(&b), f32::from_bits(alpha), rslora) {
                assert_eq!(ad.in_features() * ad.rank(), ad.a().len());
                let _ = ad.scaling();
            }
        }
    }
});

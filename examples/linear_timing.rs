//! Times one fused forward per path (a quick look; the criterion bench `linear` is the real measurement).
use lowbit::cpu::Path;
use lowbit::linear::{QuantLinear, QuantWeight};
use std::time::Instant;

fn main() -> lowbit::Result<()> {
    let (out, inp, m) = (4096usize, 14336usize, 1usize);
    let w: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 5000.0).collect();
    let layer = QuantLinear::new(QuantWeight::FourBit(lowbit::nf4::quantize_nf4(&w, &[out, inp], 64, false)?), None)?;
    let x: Vec<f32> = (0..m * inp).map(|i| (i % 17) as f32 / 17.0).collect();
    let only = std::env::var("ONLY").ok();
    for path in Path::all_available()
        .into_iter()
        .filter(|p| *p != Path::REFERENCE && only.as_deref().is_none_or(|o| o == p.name()))
    {
        let t = Instant::now();
        let reps: usize = std::env::var("REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
        for _ in 0..reps {
            std::hint::black_box(layer.forward_with(&x, path)?);
        }
        println!("{path}: {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / reps as f64);
    }
    Ok(())
}

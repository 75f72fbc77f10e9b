//! End-to-end tests of the CLI's GPU support (`--device gpu`, the demo's GPU rows).
//!
//! Like the library's GPU tests (`tests/common`): without an adapter these tests check the clear
//! "no adapter" output and say they skipped; with `LOWBIT_REQUIRE_GPU=1` a missing adapter is a failure.
//! The GPU results are judged by the library's stated bound (`QuantLinear::error_bound` with
//! `BoundTarget::Gpu`), the rule the commands use too.
#![cfg(feature = "gpu")]

mod common;

use common::{assert_ok, lowbit, s, stderr, stdout};

use lowbit::gpu::GpuContext;
use lowbit::io::peft::{load_quant_linears, PeftAdapter};
use lowbit::io::{bnb, SafetensorsFile, TensorData};
use lowbit::linear::{Agreement, BoundTarget, ForwardOptions, QuantLinear};
use safetensors::Dtype;
use std::path::Path;
use std::process::Output;
use std::sync::OnceLock;

/// Exit status 1 with an `error: ...` line containing `needle`, never a panic.
#[track_caller]
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stdout:\n{}\nstderr:\n{err}", stdout(o));
    assert!(err.lines().any(|l| l.starts_with("error: ") && l.contains(needle)), "expected {needle:?} in {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn require() -> bool {
    std::env::var("LOWBIT_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Whether the library finds an adapter (the CLI opens the same preferred one). With `LOWBIT_REQUIRE_GPU=1`,
/// no adapter fails the test.
fn has_adapter() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    let has = *HAS.get_or_init(|| match GpuContext::new_blocking() {
        Ok(c) => {
            eprintln!("GPU adapter: {} ({:?})", c.adapter_name(), c.adapter_info().backend);
            true
        }
        Err(e) => {
            assert!(!require(), "LOWBIT_REQUIRE_GPU=1 but no GPU adapter: {e}");
            false
        }
    });
    if !has {
        eprintln!(
            "*** no GPU adapter: checking the no-adapter output only (LOWBIT_REQUIRE_GPU=1 makes this a failure) ***"
        );
    }
    has
}

/// Deterministic values in about [-scale, scale].
fn values(n: usize, salt: u64, scale: f32) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ salt.wrapping_mul(0x2545_f491_4f6c_dd1d);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

const UP: &str = "model.layers.0.mlp.up_proj";
const DOWN: &str = "model.layers.0.mlp.down_proj";
/// Not a multiple of the NF4 block size: blocks cross rows.
const HIDDEN: usize = 100;
const INTER: usize = 24;

/// UP `[INTER, HIDDEN]` NF4 block 64 with a bias; DOWN `[HIDDEN, INTER]` NF4 + double quantization.
fn write_checkpoint(path: &Path) {
    let up = lowbit::nf4::quantize_nf4(&values(INTER * HIDDEN, 1, 0.5), &[INTER, HIDDEN], 64, false).unwrap();
    let down = lowbit::nf4::quantize_nf4(&values(HIDDEN * INTER, 2, 0.5), &[HIDDEN, INTER], 64, true).unwrap();
    let mut t = bnb::to_tensors(&format!("{UP}.weight"), &up).unwrap();
    t.extend(bnb::to_tensors(&format!("{DOWN}.weight"), &down).unwrap());
    t.push((format!("{UP}.bias"), TensorData::from_slice(Dtype::F32, vec![INTER], &values(INTER, 3, 1.0))));
    lowbit::io::write_safetensors(path, &t, None, false).unwrap();
}

/// A PEFT adapter with rank-4 modules for UP and DOWN.
fn write_adapter(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj", "down_proj"],
      "use_rslora": false, "fan_in_fan_out": false}"#;
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let key = |p: &str, ab: &str| format!("base_model.model.{p}.{ab}.weight");
    let f32t = |shape: Vec<usize>, v: &[f32]| TensorData::from_slice(Dtype::F32, shape, v);
    let t = vec![
        (key(UP, "lora_A"), f32t(vec![4, HIDDEN], &values(4 * HIDDEN, 10, 0.1))),
        (key(UP, "lora_B"), f32t(vec![INTER, 4], &values(INTER * 4, 11, 0.1))),
        (key(DOWN, "lora_A"), f32t(vec![4, INTER], &values(4 * INTER, 12, 0.1))),
        (key(DOWN, "lora_B"), f32t(vec![HIDDEN, 4], &values(HIDDEN * 4, 13, 0.1))),
    ];
    lowbit::io::write_safetensors(dir.join("adapter_model.safetensors"), &t, None, false).unwrap();
}

fn write_input(path: &Path, m: usize, k: usize) -> Vec<f32> {
    let x = values(m * k, 20 + m as u64, 1.0);
    lowbit::io::write_safetensors(
        path,
        &[("x".to_string(), TensorData::from_slice(Dtype::F32, vec![m, k], &x))],
        None,
        true,
    )
    .unwrap();
    x
}

fn library_layer(checkpoint: &Path, path: &str, adapter: Option<&Path>) -> QuantLinear {
    let mut layers = load_quant_linears(&SafetensorsFile::open(checkpoint).unwrap()).unwrap();
    if let Some(dir) = adapter {
        PeftAdapter::load(dir).unwrap().attach(&mut layers, "default").unwrap();
    }
    layers.into_iter().find(|(p, _)| p == path).unwrap().1
}

fn read_y(path: &Path) -> Vec<f32> {
    let f = SafetensorsFile::open(path).unwrap();
    let st = f.tensors().unwrap();
    lowbit::io::view_to_f32("y", &st.tensor("y").unwrap()).unwrap()
}

#[test]
fn forward_on_the_gpu_agrees_with_the_cpu_within_the_bound() {
    let has = has_adapter();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("nf4.safetensors");
    write_checkpoint(&ckpt);
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter);
    for (path, k) in [(UP, HIDDEN), (DOWN, INTER)] {
        for m in [1, 5, 20] {
            let xf = dir.path().join("x.safetensors");
            let x = write_input(&xf, m, k);
            for with_adapter in [false, true] {
                let run = |device: &str| {
                    let y = dir.path().join(format!("y-{device}.safetensors"));
                    let mut args = vec!["forward", s(&ckpt), "--layer", path, "--input", s(&xf), "-o", s(&y)];
                    args.extend(["--force", "--device", device]);
                    if with_adapter {
                        args.extend(["--adapter", s(&adapter)]);
                    }
                    (lowbit(&args), y)
                };
                let (o, _) = run("gpu");
                if !has {
                    assert_clean_failure(&o, "--device gpu: no GPU adapter found");
                    return;
                }
                assert_ok(&o);
                let msg = stdout(&o);
                assert!(msg.contains(" on GPU "), "{msg}");
                let (o, cpu_path) = run("cpu");
                assert_ok(&o);
                assert!(!stdout(&o).contains(" on GPU "));
                let gpu = read_y(&dir.path().join("y-gpu.safetensors"));
                let cpu = read_y(&cpu_path);
                let layer = library_layer(&ckpt, path, with_adapter.then_some(adapter.as_path()));
                assert_eq!(layer.adapters().len(), usize::from(with_adapter));
                let want = layer.forward_with(&x, lowbit::linear::ForwardOptions::reference()).unwrap();
                let what = format!("{path} M={m} adapter={with_adapter}");
                for (got, target) in [(&cpu, BoundTarget::Cpu), (&gpu, BoundTarget::Gpu)] {
                    let bound = layer.error_bound(&x, ForwardOptions::default(), target).unwrap();
                    let a = Agreement::compare(got, &want, &bound);
                    assert!(a.ok(target), "{target:?} {what}: {a:?}");
                }
            }
        }
    }
}

#[test]
fn demo_shows_gpu_rows_or_the_skip_line() {
    let has = has_adapter();
    let o = lowbit(&["demo", "--size", "64"]);
    assert_ok(&o);
    let out = stdout(&o);
    if !has {
        assert!(out.contains("\nGPU: no adapter found ("), "{out}");
        assert!(out.contains("); GPU rows skipped"), "{out}");
        assert!(!out.contains("GPU QuantLinear 64x64"), "{out}");
        return;
    }
    assert!(out.contains("\nGPU: "), "{out}");
    let gpu = &out[out.find("GPU QuantLinear 64x64").expect("GPU rows")..];
    // 3 formats x M in {1, 8} x without / with a rank-16 adapter.
    let rows: Vec<&str> = gpu.lines().filter(|l| l.ends_with("  ok")).collect();
    assert_eq!(rows.len(), 12, "{out}");
    for kernel in ["-4bit", "-4bit-dq", "-int8-channel"] {
        assert!(rows.iter().any(|r| r.contains(kernel)), "{kernel}: {out}");
    }
    assert!(!out.contains("MISMATCH"), "{out}");
    assert!(out.contains("all 12 GPU QuantLinear runs too"), "{out}");
}

#[test]
fn bench_on_the_gpu_reports_rates_and_checks_the_reference() {
    let has = has_adapter();
    for (format, m, lora) in [("nf4", "1", None), ("nf4-dq", "3", Some("4")), ("int8", "20", Some("2"))] {
        let mut args = vec!["bench", "--device", "gpu", "--format", format, "--shape", "48x100", "--batch", m];
        args.extend(["--iters", "3"]);
        if let Some(r) = lora {
            args.extend(["--lora-rank", r]);
        }
        let o = lowbit(&args);
        if !has {
            assert_clean_failure(&o, "--device gpu: no GPU adapter found");
            return;
        }
        assert_ok(&o);
        let out = stdout(&o);
        assert!(out.contains("\nGPU "), "{out}");
        let timed = out.contains("kernel time (GPU timestamp queries)") || out.contains("wall time per forward");
        assert!(timed, "{out}");
        assert!(out.contains("GFLOP/s") && out.contains("GB/s of packed weight read"), "{out}");
        assert!(out.contains("vs reference (f64) (GPU bound)") && out.trim_end().ends_with(": ok"), "{out}");
    }
}

#[test]
fn gpu_usage_errors() {
    let o = lowbit(&["bench", "--device", "gpu", "--format", "nf4", "--shape", "8x8", "--threads", "2"]);
    assert_clean_failure(&o, "--threads applies to --device cpu only");
    for args in
        [&["bench", "--all", "--device", "gpu"][..], &["bench", "--format", "nf4", "--shape", "8x8", "--device", "tpu"]]
    {
        let o = lowbit(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}

/// `lowbit generate --device gpu`: the whole SmolLM2 model resident on the GPU (NF4+DQ) answers Paris, as
/// the CPU does. About 20 s on lavapipe (a decode step there takes seconds; speed needs a real GPU).
#[test]
fn generate_on_the_gpu_answers_paris() {
    let Some(g) = lowbit_testkit::model::smollm2_gguf("generate_on_the_gpu_answers_paris") else { return };
    let has = has_adapter();
    let args = ["generate", s(&g), "--prompt", "The capital of France is", "--scheme", "nf4:64+dq"];
    let o = lowbit(&[&args[..], &["--device", "gpu", "--max-tokens", "2"]].concat());
    if !has {
        assert_clean_failure(&o, "--device gpu: no GPU adapter found");
        return;
    }
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.starts_with(" Paris"), "{out}");
    assert!(out.contains("tokens/s (GPU)"), "{out}");
}

//! `lowbit finetune` on the real SmolLM2-135M-Instruct GGUF (skipped loudly without it; LOWBIT_REQUIRE_MODEL=1
//! makes that a failure): it trains, prints `step N loss X`, writes a PEFT adapter that `lowbit generate` loads
//! and that training can continue from; `--device gpu` (lavapipe in CI) gives the CPU's losses; and its
//! argument errors (always run).

mod common;

use common::{assert_clean_failure, assert_ok, lowbit, s, stdout};

/// `step N loss X …` lines → the losses.
fn losses(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("step ")?;
            let mut it = rest.split_whitespace();
            let _n = it.next()?;
            (it.next()? == "loss").then(|| it.next()?.parse().ok())?
        })
        .collect()
}

#[test]
fn finetune_trains_writes_a_peft_adapter_and_generate_loads_it() {
    let Some(g) = lowbit_testkit::model::smollm2_gguf("finetune_trains_writes_a_peft_adapter") else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("my-lora");
    // A short sequence repeated: 8 steps of AdamW with LoRA+ memorise it (the loss falls).
    let tokens = "504,3575,282,4649,314,7042,30,378,3575,282,5611,314,6561,30";
    let o = lowbit(&[
        "finetune",
        s(&g),
        "--scheme",
        "nf4",
        "--double-quant",
        "--tokens",
        tokens,
        "--adapter-out",
        s(&out),
        "--steps",
        "8",
        "--ctx",
        "16",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--lr",
        "3e-3",
        "--lora-plus-ratio",
        "8",
        "--seed",
        "7",
    ]);
    assert_ok(&o);
    let text = stdout(&o);
    let l = losses(&text);
    assert_eq!(l.len(), 8, "{text}");
    assert!(text.contains("tokens/s"), "{text}");
    assert!(l[7] < 0.8 * l[0], "the loss falls: {l:?}");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    let config = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
    assert!(config.contains("\"peft_type\": \"LORA\"") && config.contains("\"r\": 4"), "{config}");
    // generate loads it (the adapter changes the logits of the trained sequence).
    let logits = |adapter: Option<&std::path::Path>| -> Vec<f32> {
        let path = dir.path().join("logits.safetensors");
        let mut args = vec![
            "generate",
            s(&g),
            "--scheme",
            "nf4:64+dq",
            "--tokens",
            "504,3575,282,4649",
            "--max-tokens",
            "0",
            "--logits-out",
            s(&path),
            "--force",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        assert_ok(&lowbit(&args));
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("logits").unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let (base, tuned) = (logits(None), logits(Some(&out)));
    let moved = base.iter().zip(&tuned).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > 0.05, "the trained adapter changes the logits (max |Δ| {moved})");
    // The output exists now: refused without --force, and training continues from it with --adapter.
    let again =
        ["finetune", s(&g), "--scheme", "nf4:64+dq", "--tokens", tokens, "--adapter-out", s(&out), "--steps", "1"];
    assert_clean_failure(&lowbit(&again), "already exists");
    let cont = dir.path().join("continued");
    let o = lowbit(&[
        "finetune",
        s(&g),
        "--scheme",
        "nf4:64+dq",
        "--adapter",
        s(&out),
        "--tokens",
        tokens,
        "--adapter-out",
        s(&cont),
        "--steps",
        "1",
        "--ctx",
        "16",
        "--optimizer",
        "sgd",
        "--lr",
        "1e-3",
    ]);
    assert_ok(&o);
    let l2 = losses(&stdout(&o));
    // Starting from the trained adapter, the first loss is the trained one's (close to the last step's).
    assert!(l2[0] < l[0], "continued from the adapter: {l2:?} vs first {l:?}");
    // Continuing takes the adapter's own rank: --rank is refused.
    let o = lowbit(&[
        "finetune",
        s(&g),
        "--adapter",
        s(&out),
        "--tokens",
        tokens,
        "--adapter-out",
        s(&dir.path().join("x")),
        "--rank",
        "2",
    ]);
    assert_clean_failure(&o, "--adapter continues training");
}

/// `--device gpu` trains the same adapter as the CPU: two SGD steps print the same losses (the second one
/// after the GPU layers received the first update). Tolerance: the GPU's training pass agrees with the CPU's to
/// ~3e-6 of each gradient's scale (`llm/tests/gpu_train.rs`); the losses are compared at 1e-4 relative.
#[cfg(feature = "gpu")]
#[test]
fn finetune_on_the_gpu_prints_the_cpu_losses() {
    let Some(g) = lowbit_testkit::model::smollm2_gguf("finetune_on_the_gpu_prints_the_cpu_losses") else { return };
    if lowbit_testkit::gpu::test_context().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |device: &str| {
        let out = dir.path().join(format!("lora-{device}"));
        let o = lowbit(&[
            "finetune",
            s(&g),
            "--scheme",
            "nf4:64+dq",
            "--tokens",
            "504,3575,282,4649,314,7042,30,378,3575,282,5611,314",
            "--adapter-out",
            s(&out),
            "--steps",
            "2",
            "--ctx",
            "12",
            "--rank",
            "4",
            "--optimizer",
            "sgd",
            "--lr",
            "0.5",
            "--device",
            device,
        ]);
        assert_ok(&o);
        assert!(out.join("adapter_model.safetensors").is_file());
        losses(&stdout(&o))
    };
    let (cpu, gpu) = (run("cpu"), run("gpu"));
    eprintln!("losses: CPU {cpu:?}, GPU {gpu:?}");
    assert_eq!(cpu.len(), 2);
    assert_eq!(gpu.len(), 2);
    assert!(cpu[1] < cpu[0], "SGD lowers the loss: {cpu:?}");
    for (a, b) in cpu.iter().zip(&gpu) {
        assert!((a - b).abs() <= 1e-4 * a, "CPU {cpu:?} vs GPU {gpu:?}");
    }
}

#[test]
fn finetune_argument_errors_are_clean() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("missing.gguf");
    let out = dir.path().join("out");
    let run = |extra: &[&str]| {
        let mut args = vec!["finetune", s(&model), "--tokens", "1,2,3", "--adapter-out", s(&out)];
        args.extend_from_slice(extra);
        lowbit(&args)
    };
    assert_clean_failure(&run(&["--double-quant"]), "--double-quant needs a 4-bit --scheme");
    assert_clean_failure(&run(&["--scheme", "int8", "--double-quant"]), "--double-quant needs a 4-bit --scheme");
    assert_clean_failure(&run(&["--ctx", "1"]), "a context of at least 2 tokens");
    assert_clean_failure(&run(&["--steps", "0"]), "steps ≥ 1");
    assert_clean_failure(&run(&["--act8"]), "--act8 is an inference mode");
    // Usage errors (clap): status 2 and the offending value named.
    let o = run(&["--optimizer", "lion"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(common::stderr(&o).contains("expected one of \"adamw\", \"adamw8bit\", \"sgd\""), "{}", common::stderr(&o));
    assert_clean_failure(&run(&["--lr=-1"]), "lr");
    assert_clean_failure(&run(&["--optimizer", "sgd", "--weight-decay", "0.1"]), "weight_decay");
    // --device gpu is accepted (the missing model is what fails).
    assert_clean_failure(&run(&["--device", "gpu"]), "missing.gguf");
    // No data at all.
    let o = lowbit(&["finetune", s(&model), "--adapter-out", s(&out)]);
    assert!(!o.status.success());
    // A missing model is reported as such (after the arguments pass).
    assert_clean_failure(&run(&[]), "missing.gguf");
}

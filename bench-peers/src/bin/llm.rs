//! A whole model against its peers, in one run: SmolLM2-135M (the Q4_1 GGUF) on lowbit-llm (dense f32, int8
//! channel, NF4, NF4+DQ quantized on load; with the tied lm_head f32 or int8), llama.cpp's `llama-bench` on the same GGUF, and
//! candle-transformers' quantized llama on the same GGUF.
//!
//! What is timed is what `llama-bench -p 256 -n 128` times: prefill = one forward of a 256-token prompt into
//! an empty cache; decode = 128 one-token forwards from an empty cache, each feeding back the greedy token
//! (tokens/s = tokens ÷ wall time). Each measurement runs in a fresh child process whose thread pool is set
//! by `RAYON_NUM_THREADS` (lowbit, candle) or `-t` (llama.cpp), one warm-up pass first. Rounds are
//! interleaved (every engine and thread count once per round, in the same order), the memory bandwidth probe
//! runs at the start of each round, and the table gives medians over rounds with the ratio to llama.cpp.
//!
//! ```text
//! # llama-bench: cmake -B build -DGGML_NATIVE=ON … && cmake --build build --target llama-bench (see README)
//! RUSTFLAGS="-C target-cpu=native" CARGO_TARGET_DIR=../target-peers-native \
//!   cargo run --release --bin llm -- MODEL.gguf --llama-bench PATH/llama-bench [--rounds 3]
//! ```
//! candle picks its SIMD at compile time, hence `target-cpu=native`; lowbit and llama.cpp detect at run time
//! (llama.cpp's `GGML_NATIVE` build is native too).

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use lowbit_llm::{LoadOptions, Logits, Model, WeightMode};
use lowbit_testkit::membw;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PROMPT: usize = 256;
const GEN: usize = 128;
/// lowbit rows: (label, `--scheme`, `--lm-head`). The tied lm_head is f32 unless `--lm-head` (llama.cpp runs
/// the GGUF's Q8_0 `token_embd` there, so `int8:channel` is the like-for-like row).
const LOWBIT: [(&str, &str, &str); 6] = [
    ("dense f32", "-", "-"),
    ("int8 channel", "int8:channel", "-"),
    ("NF4", "nf4:64", "-"),
    ("NF4+DQ", "nf4:64+dq", "-"),
    ("int8 channel, lm_head int8", "int8:channel", "int8:channel"),
    ("NF4+DQ, lm_head int8", "nf4:64+dq", "int8:channel"),
];

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The prompt: a fixed, deterministic id sequence (llama-bench uses random ids; attention cost depends on
/// length, not content).
fn prompt_ids(vocab: usize) -> Vec<u32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..PROMPT)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32
}

/// (prefill tok/s, decode tok/s) of lowbit-llm, in this process (thread count from RAYON_NUM_THREADS).
fn run_lowbit(gguf: &Path, scheme: &str, lm_head: &str) -> Res<(f64, f64)> {
    let weights = match scheme {
        "-" => WeightMode::AsStored,
        s => WeightMode::Quantize(s.parse()?),
    };
    let lm_head = if lm_head == "-" { None } else { Some(lm_head.parse()?) };
    let model = Model::load(gguf, &LoadOptions { weights, adapters: vec![], lm_head, embedding: None })?;
    let vocab = model.config().vocab_size;
    let prompt = prompt_ids(vocab);
    let mut logits = vec![0.0f32; vocab];
    let mut state = model.new_state(PROMPT + GEN)?;
    let mut pass = || -> Res<(f64, f64)> {
        state.cache.clear();
        let t = Instant::now();
        model.forward(&prompt, &mut state, Logits::Last, &mut logits)?;
        let prefill = t.elapsed().as_secs_f64();
        state.cache.clear();
        let mut id = prompt[0];
        let t = Instant::now();
        for _ in 0..GEN {
            model.forward(&[id], &mut state, Logits::Last, &mut logits)?;
            id = argmax(&logits);
        }
        Ok((PROMPT as f64 / prefill, GEN as f64 / t.elapsed().as_secs_f64()))
    };
    pass()?;
    pass()
}

/// (prefill tok/s, decode tok/s) of candle-transformers' quantized llama on the GGUF's own Q4_1 weights.
fn run_candle(gguf: &Path) -> Res<(f64, f64)> {
    let dev = Device::Cpu;
    let mut f = std::fs::File::open(gguf)?;
    let content = gguf_file::Content::read(&mut f)?;
    let mut model = ModelWeights::from_gguf(content, &mut f, &dev)?;
    let vocab = 49152;
    let prompt = prompt_ids(vocab);
    let mut pass = || -> Res<(f64, f64)> {
        let x = Tensor::new(prompt.as_slice(), &dev)?.unsqueeze(0)?;
        let t = Instant::now();
        let _ = model.forward(&x, 0)?.to_vec2::<f32>()?;
        let prefill = t.elapsed().as_secs_f64();
        let mut id = prompt[0];
        let t = Instant::now();
        for i in 0..GEN {
            let x = Tensor::new(&[id], &dev)?.unsqueeze(0)?;
            let l = model.forward(&x, i)?.squeeze(0)?.to_vec1::<f32>()?;
            id = argmax(&l);
        }
        Ok((PROMPT as f64 / prefill, GEN as f64 / t.elapsed().as_secs_f64()))
    };
    pass()?;
    pass()
}

/// (prefill tok/s, decode tok/s) from `llama-bench -p 256 -n 128 -r 1 -t N -o json`.
fn run_llama(bin: &Path, gguf: &Path, threads: usize) -> Res<(f64, f64)> {
    let out = Command::new(bin)
        .args(["-m", &gguf.to_string_lossy(), "-p", &PROMPT.to_string(), "-n", &GEN.to_string()])
        .args(["-r", "2", "-t", &threads.to_string(), "-o", "json"])
        .output()?;
    if !out.status.success() {
        return Err(format!("llama-bench failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rate = |p: u64, g: u64| -> Res<f64> {
        rows.as_array()
            .and_then(|a| a.iter().find(|r| r["n_prompt"] == p && r["n_gen"] == g))
            .and_then(|r| r["avg_ts"].as_f64())
            .ok_or_else(|| format!("llama-bench json has no n_prompt={p} n_gen={g} row").into())
    };
    Ok((rate(PROMPT as u64, 0)?, rate(0, GEN as u64)?))
}

/// Runs this binary again as a child with `RAYON_NUM_THREADS=threads` for one measurement.
fn child(engine: &str, arg: &str, arg2: &str, gguf: &Path, threads: usize) -> Res<(f64, f64)> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--one", engine, arg, arg2, &gguf.to_string_lossy()])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()?;
    if !out.status.success() {
        return Err(format!("{engine} {arg}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let s = String::from_utf8(out.stdout)?;
    let mut it = s.split_whitespace().map(str::parse::<f64>);
    match (it.next(), it.next()) {
        (Some(Ok(p)), Some(Ok(d))) => Ok((p, d)),
        _ => Err(format!("{engine}: unexpected output {s:?}").into()),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--one") {
        let gguf = Path::new(&args[4]);
        let (p, d) = match args[1].as_str() {
            "lowbit" => run_lowbit(gguf, &args[2], &args[3])?,
            _ => run_candle(gguf)?,
        };
        println!("{p} {d}");
        return Ok(());
    }
    let mut gguf = None;
    let mut llama: Option<PathBuf> = None;
    let mut rounds = 3usize;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--llama-bench" => llama = it.next().map(PathBuf::from),
            "--rounds" => rounds = it.next().ok_or("--rounds N")?.parse()?,
            _ => gguf = Some(PathBuf::from(a)),
        }
    }
    let gguf = gguf.ok_or("usage: llm MODEL.gguf --llama-bench PATH [--rounds N]")?;
    let threads = [1usize, 2];
    // (engine label, thread count) → per-round (prefill, decode).
    let mut names: Vec<String> = LOWBIT.iter().map(|(n, _, _)| format!("lowbit {n}")).collect();
    names.push("candle Q4_1 (as stored)".into());
    if llama.is_some() {
        names.push("llama.cpp Q4_1 (as stored)".into());
    }
    let mut results = vec![vec![(Vec::new(), Vec::new()); threads.len()]; names.len()];
    let mut bw = vec![Vec::new(); threads.len()];
    for round in 0..rounds {
        let limits = membw::measure(membw::DEFAULT_BYTES, 3);
        for (ti, &t) in threads.iter().enumerate() {
            bw[ti].push(membw::gb_s(limits.for_threads(t).read));
            for (ei, name) in names.iter().enumerate() {
                let r = if ei < LOWBIT.len() {
                    child("lowbit", LOWBIT[ei].1, LOWBIT[ei].2, &gguf, t)?
                } else if ei == LOWBIT.len() {
                    child("candle", "-", "-", &gguf, t)?
                } else {
                    run_llama(llama.as_deref().ok_or("llama-bench")?, &gguf, t)?
                };
                eprintln!("round {round} {name} {t}t: prefill {:.1} decode {:.1} tok/s", r.0, r.1);
                results[ei][ti].0.push(r.0);
                results[ei][ti].1.push(r.1);
            }
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "SmolLM2-135M-Instruct ({}), prompt {PROMPT} / decode {GEN} tokens, medians of {rounds} interleaved rounds; \
         load average {}",
        gguf.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    for (ti, &t) in threads.iter().enumerate() {
        println!("read bandwidth, {t} thread(s): {:.1} GB/s (median of the rounds)", median(&mut bw[ti]));
    }
    println!();
    println!(
        "| engine | prefill 1t | prefill 2t | decode 1t | decode 2t | ÷ llama.cpp (prefill 1t / 2t, decode 1t / 2t) |"
    );
    println!("|---|---|---|---|---|---|");
    let med: Vec<Vec<(f64, f64)>> =
        results.iter_mut().map(|e| e.iter_mut().map(|(p, d)| (median(p), median(d))).collect()).collect();
    let llama_row = llama.is_some().then(|| med[names.len() - 1].clone());
    for (ei, name) in names.iter().enumerate() {
        let m = &med[ei];
        let ratio = match &llama_row {
            Some(l) => format!(
                "{:.2} / {:.2}, {:.2} / {:.2}",
                m[0].0 / l[0].0,
                m[1].0 / l[1].0,
                m[0].1 / l[0].1,
                m[1].1 / l[1].1
            ),
            None => "-".into(),
        };
        println!("| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {ratio} |", m[0].0, m[1].0, m[0].1, m[1].1);
    }
    Ok(())
}

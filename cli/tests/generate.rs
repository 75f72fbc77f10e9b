//! `lowbit generate` and `lowbit perplexity` on the real SmolLM2-135M-Instruct GGUF (skipped loudly without
//! it; LOWBIT_REQUIRE_MODEL=1 makes that a failure), and their argument errors (always run).

mod common;

use common::{assert_clean_failure, assert_ok, lowbit, s, stdout};

#[test]
fn greedy_generation_answers_paris_and_reports_speeds() {
    let Some(g) = lowbit_testkit::model::smollm2_gguf("greedy_generation_answers_paris") else { return };
    let o = lowbit(&["generate", s(&g), "--prompt", "The capital of France is", "--max-tokens", "4"]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.starts_with(" Paris"), "{out}");
    assert!(out.contains("prefill: 5 tokens") && out.contains("decode: 3 tokens") && out.contains("tokens/s"), "{out}");
    // --tokens gives the same run as the text prompt.
    let o = lowbit(&["generate", s(&g), "--tokens", "504,3575,282,4649,314", "--max-tokens", "4"]);
    assert_ok(&o);
    assert!(stdout(&o).starts_with(" Paris"), "{}", stdout(&o));
}

#[test]
fn logits_out_with_max_tokens_0_is_a_pure_forward() {
    let Some(g) = lowbit_testkit::model::smollm2_gguf("logits_out_with_max_tokens_0") else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    let o =
        lowbit(&["generate", s(&g), "--tokens", "504,3575,282,4649,314", "--max-tokens", "0", "--logits-out", s(&out)]);
    assert_ok(&o);
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    assert_eq!(t.shape(), [5, 49152]);
    let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let last = &v[4 * 49152..];
    let argmax = (0..last.len()).fold(0, |b, i| if last[i] > last[b] { i } else { b });
    assert_eq!(argmax, 7042, "\" Paris\" after the prompt");
    // The file exists now: a second run refuses it without --force.
    let o = lowbit(&["generate", s(&g), "--tokens", "504", "--max-tokens", "0", "--logits-out", s(&out)]);
    assert_clean_failure(&o, "exists");
}

#[test]
fn perplexity_of_a_short_text_is_finite_and_states_the_method() {
    let Some(g) = lowbit_testkit::model::smollm2_gguf("perplexity_of_a_short_text") else { return };
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. Paris is the capital of France.").unwrap();
    let o = lowbit(&["perplexity", s(&g), "--text", s(&text), "--ctx", "8", "--scheme", "int8"]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("the first token of each window is not scored"), "{out}");
    let line = out.lines().find(|l| l.starts_with("perplexity: ")).expect("a perplexity line");
    let ppl: f64 = line["perplexity: ".len()..].trim().parse().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0 && ppl < 10_000.0, "{line}");
    assert!(out.contains("tokens/s"), "{out}");
}

#[test]
fn bad_arguments_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    let o = lowbit(&["generate", s(&missing), "--prompt", "hi"]);
    assert_clean_failure(&o, "missing.gguf");
    let o = lowbit(&["generate", s(&missing), "--prompt", "hi", "--temperature=-1"]);
    assert_clean_failure(&o, "temperature");
    let o = lowbit(&["generate", s(&missing), "--prompt", "hi", "--top-p", "0"]);
    assert_clean_failure(&o, "top-p");
    let o = lowbit(&["perplexity", s(&missing), "--text", s(&missing), "--ctx", "1"]);
    assert_clean_failure(&o, "--ctx 1");
    // Neither --prompt nor --tokens: a usage error (exit 2).
    assert_eq!(lowbit(&["generate", s(&missing)]).status.code(), Some(2));
}

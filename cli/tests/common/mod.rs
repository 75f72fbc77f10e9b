//! Helpers shared by the CLI's integration tests: running the `lowbit` binary and checking its outcome.
#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;
use std::process::{Command, Output};

/// Runs the built `lowbit` binary with `args`.
pub fn lowbit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lowbit")).args(args).output().expect("run lowbit")
}

/// A temporary path as `&str` (tempfile paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[track_caller]
pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "status {:?}\nstdout:\n{}\nstderr:\n{}", o.status, stdout(o), stderr(o));
}

/// A failure with exit status 1 and a one-line `error: ...` message, never a panic.
#[track_caller]
pub fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stdout:\n{}\nstderr:\n{err}", stdout(o));
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
}

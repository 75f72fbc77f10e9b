//! The CLI's error: a message for `error: <message>`, built from lowbit's errors or the CLI's own checks.

use std::fmt;
use std::path::Path;

/// An error to report to the user; `main` prints it as `error: <message>` and exits with status 1.
#[derive(Debug)]
pub struct CliError(String);

impl CliError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> CliError {
        CliError(message.into())
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<lowbit::Error> for CliError {
    fn from(e: lowbit::Error) -> CliError {
        CliError(e.to_string())
    }
}

impl From<lowbit_testkit::Error> for CliError {
    fn from(e: lowbit_testkit::Error) -> CliError {
        CliError(e.to_string())
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> CliError {
        CliError(format!("writing output: {e}"))
    }
}

impl From<safetensors::SafeTensorError> for CliError {
    fn from(e: safetensors::SafeTensorError) -> CliError {
        CliError(e.to_string())
    }
}

/// Adds context (such as the tensor name) in front of an error's message.
pub trait Context<T> {
    /// Prefixes the error message with `what: `.
    fn context(self, what: impl FnOnce() -> String) -> Result<T, CliError>;
}

impl<T, E: Into<CliError>> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, CliError> {
        self.map_err(|e| CliError(format!("{}: {}", what(), e.into())))
    }
}

/// Adds `what PATH` in front of an error's message, naming the path once: a message that already starts with
/// `PATH: ` (an I/O error on that path) loses that prefix, and one that names the path (or a file under it)
/// elsewhere gets only `bare: ` in front.
pub trait PathContext<T> {
    /// Prefixes the error message with `named PATH: `, or `bare: ` when the message names `path` already.
    fn path_context(self, path: &Path, named: &str, bare: &str) -> Result<T, CliError>;
}

impl<T, E: Into<CliError>> PathContext<T> for Result<T, E> {
    fn path_context(self, path: &Path, named: &str, bare: &str) -> Result<T, CliError> {
        self.map_err(|e| with_path(path, named, bare, e.into()))
    }
}

/// `named PATH: message`, with `path` named once (see [`PathContext`]).
pub fn with_path(path: &Path, named: &str, bare: &str, e: CliError) -> CliError {
    let p = path.display().to_string();
    let msg = e.0;
    if let Some(rest) = msg.strip_prefix(&format!("{p}: ")) {
        return CliError(format!("{named} {p}: {rest}"));
    }
    if !p.is_empty() && msg.contains(&p) {
        return CliError(format!("{bare}: {msg}"));
    }
    CliError(format!("{named} {p}: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_path_once() {
        let p = Path::new("/a/adapter");
        let e = |m: &str| CliError::new(m);
        let w = |m: &str| with_path(p, "adapter", "in the adapter", e(m)).0;
        assert_eq!(w("/a/adapter: not found"), "adapter /a/adapter: not found");
        assert_eq!(w("/a/adapter/adapter_config.json: bad"), "in the adapter: /a/adapter/adapter_config.json: bad");
        assert_eq!(w("rank 0"), "adapter /a/adapter: rank 0");
    }
}

//! The CLI's error: a message for `error: <message>`, built from lowbit's errors or the CLI's own checks.

use std::fmt;

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

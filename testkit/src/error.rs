//! The error of the demo and the benchmarks: a message, built from lowbit's errors or the testkit's own
//! checks. The CLI prints it as `error: <message>`.

use std::fmt;

/// A failed demo or benchmark, as a message for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Error {
        Error(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<lowbit::Error> for Error {
    fn from(e: lowbit::Error) -> Error {
        Error(e.to_string())
    }
}

/// Adds context (such as the case being run) in front of an error's message.
pub trait Context<T> {
    /// Prefixes the error message with `what: `.
    fn context(self, what: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T, E: Into<Error>> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|e| Error(format!("{}: {}", what(), e.into())))
    }
}

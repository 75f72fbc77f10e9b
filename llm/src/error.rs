//! The runtime's error: lowbit's errors, tokenizer errors, and bad model / input descriptions.

use std::fmt;

/// Everything that can go wrong loading or running a model.
#[derive(Debug)]
pub enum Error {
    /// An error from lowbit (checkpoint I/O, kernels, GPU).
    Lowbit(lowbit::Error),
    /// The tokenizer could not be built, or could not encode / decode.
    Tokenizer(String),
    /// The model's description (config, tensor shapes, architecture) is not one this runtime runs.
    Model(String),
    /// A caller's argument is out of range (token id, position past the KV cache, option value).
    Invalid(String),
}

/// `Result` with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Lowbit(e) => write!(f, "{e}"),
            Error::Tokenizer(e) => write!(f, "tokenizer: {e}"),
            Error::Model(e) => write!(f, "model: {e}"),
            Error::Invalid(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Lowbit(e) => Some(e),
            _ => None,
        }
    }
}

impl From<lowbit::Error> for Error {
    fn from(e: lowbit::Error) -> Error {
        Error::Lowbit(e)
    }
}

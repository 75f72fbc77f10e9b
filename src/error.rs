//! The one error type of lowbit.
//!
//! Every public fallible function returns [`Result<T>`](crate::Result). Messages name the argument or file
//! field that was wrong, the value that was seen and what was expected, so that a user can fix the call
//! without reading lowbit's source.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong in lowbit.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An argument had a value outside what the function accepts.
    InvalidArgument {
        /// Name of the argument (e.g. `"group_size"`).
        arg: &'static str,
        /// The value that was passed, rendered for humans.
        value: String,
        /// What would have been accepted.
        expected: String,
    },
    /// Two lengths or shapes that must agree did not.
    ShapeMismatch {
        /// What was being checked (e.g. `"input length vs shape [4, 8]"`).
        what: String,
        /// The length or shape that was passed.
        got: String,
        /// The length or shape that was expected.
        expected: String,
    },
    /// A NaN or infinite value in data that must be finite.
    NonFinite {
        /// Name of the argument or tensor.
        arg: String,
        /// Flat index of the first offending element.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// A file or in-memory container whose contents are malformed or inconsistent.
    Format {
        /// Which file, tensor or field.
        context: String,
        /// What was wrong and what was expected.
        detail: String,
    },
    /// Something valid that lowbit does not (yet) support.
    Unsupported {
        /// What was asked for.
        what: String,
    },
    /// An operating-system I/O error, with the path it concerned.
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// No GPU adapter was found for the requested backends (no GPU driver, no lavapipe, no WebGPU in this
    /// browser, or none matching the requested name). Feature `gpu`.
    NoGpuAdapter {
        /// What was searched and what was found, for the message.
        detail: String,
    },
    /// A GPU operation failed: the adapter refused a device, a shader failed to compile (a bug in lowbit or the
    /// driver), a wgpu validation error, out of memory, a lost device or a failed readback. Invalid inputs of
    /// GPU functions are not this variant: they are reported as the other variants, before anything reaches
    /// the GPU. Feature `gpu`.
    Gpu {
        /// The operation that failed (e.g. `"request device"`, `"compile shader gemv-4bit"`).
        what: String,
        /// wgpu's or the driver's message.
        detail: String,
    },
}

/// `Result` with lowbit's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(arg: &'static str, value: impl fmt::Display, expected: impl Into<String>) -> Self {
        Error::InvalidArgument { arg, value: value.to_string(), expected: expected.into() }
    }

    /// Shorthand for [`Error::ShapeMismatch`].
    pub fn shape(what: impl Into<String>, got: impl fmt::Debug, expected: impl fmt::Debug) -> Self {
        Error::ShapeMismatch { what: what.into(), got: format!("{got:?}"), expected: format!("{expected:?}") }
    }

    /// Shorthand for [`Error::Format`].
    pub fn format(context: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Format { context: context.into(), detail: detail.into() }
    }

    /// Shorthand for [`Error::Gpu`].
    pub fn gpu(what: impl Into<String>, detail: impl fmt::Display) -> Self {
        Error::Gpu { what: what.into(), detail: detail.to_string() }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { arg, value, expected } => {
                write!(f, "invalid `{arg}`: got {value}, expected {expected}")
            }
            Error::ShapeMismatch { what, got, expected } => {
                write!(f, "shape mismatch in {what}: got {got}, expected {expected}")
            }
            Error::NonFinite { arg, index, value } => {
                write!(f, "`{arg}` holds a non-finite value {value} at flat index {index}; expected finite numbers")
            }
            Error::Format { context, detail } => write!(f, "malformed {context}: {detail}"),
            Error::Unsupported { what } => write!(f, "unsupported: {what}"),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::NoGpuAdapter { detail } => write!(f, "no GPU adapter: {detail}"),
            Error::Gpu { what, detail } => write!(f, "GPU operation `{what}` failed: {detail}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

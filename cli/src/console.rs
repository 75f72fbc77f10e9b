//! Writing results to stdout without panicking (`lowbit inspect big.safetensors | head`): the testkit's
//! writer, which treats a closed pipe as "nobody is reading", with the CLI's error type.

use crate::error::CliError;

/// Writes `text` to stdout as is. A closed pipe is ignored; any other write error is returned.
pub fn out(text: &str) -> Result<(), CliError> {
    Ok(lowbit_testkit::console::out(text)?)
}

/// Writes `line` and a newline to stdout (see [`out`]).
pub fn line(line: &str) -> Result<(), CliError> {
    out(&format!("{line}\n"))
}

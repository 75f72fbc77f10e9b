//! Writing results to stdout without panicking: `println!` panics when stdout is a closed pipe
//! (`lowbit inspect big.safetensors | head`); these helpers treat a closed pipe as "nobody is reading".

use crate::error::CliError;
use std::io::Write;

/// Writes `text` to stdout as is. A closed pipe is ignored; any other write error is returned.
pub fn out(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::new(format!("writing to stdout: {e}"))),
        _ => Ok(()),
    }
}

/// Writes `line` and a newline to stdout (see [`out`]).
pub fn line(line: &str) -> Result<(), CliError> {
    out(&format!("{line}\n"))
}

//! Writing the demo's and the benchmarks' output to stdout without panicking: a closed pipe
//! (`lowbit demo | head`) means "nobody is reading", not an error.

use crate::error::Error;
use std::io::Write;

/// Writes `text` to stdout as is. A closed pipe is ignored; any other write error is returned.
pub fn out(text: &str) -> Result<(), Error> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::new(format!("writing to stdout: {e}"))),
        _ => Ok(()),
    }
}

/// Writes `line` and a newline to stdout (see [`out`]).
pub fn line(line: &str) -> Result<(), Error> {
    out(&format!("{line}\n"))
}

//! Guards around the output file: never touch the input, never replace an existing file without `--force`.

use crate::error::CliError;
use std::path::Path;

/// Checks, before any work is done, that `output` may be written: it must not be `input` itself (which is
/// memory-mapped while we read it), and it must not exist unless `force` is set.
pub fn check_output(input: &Path, output: &Path, force: bool) -> Result<(), CliError> {
    if output.is_dir() {
        return Err(CliError::new(format!("output {} is a directory; expected a file path", output.display())));
    }
    let dir = output.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(CliError::new(format!(
            "cannot write {}: directory {} does not exist",
            output.display(),
            dir.display()
        )));
    }
    if !output.exists() {
        return Ok(());
    }
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(input), std::fs::canonicalize(output)) {
        if a == b {
            return Err(CliError::new(format!(
                "output {} is the input file; choose another output path (the input is never modified)",
                output.display()
            )));
        }
    }
    if !force {
        return Err(CliError::new(format!("output {} already exists; pass --force to replace it", output.display())));
    }
    Ok(())
}

//! A scratch directory for tests that write files, removed (with its contents) on drop.

use std::path::{Path, PathBuf};

/// `<temp>/lowbit-<pid>-<name>`, emptied when created and removed on drop. Distinct names per process keep
/// tests that run in parallel apart.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates the directory (removing what an earlier run of the same process id left there). Panics if it
    /// cannot be created: this is test support.
    pub fn new(name: &str) -> ScratchDir {
        let p = std::env::temp_dir().join(format!("lowbit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating scratch directory {}: {e}", p.display()));
        ScratchDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

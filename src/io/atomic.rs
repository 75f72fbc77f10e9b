//! Crash-safe, race-free output files: a temporary sibling named after the output, registered so that a
//! signal handler can delete it, synced, then moved into place without replacing anything that appeared
//! meanwhile (unless asked to, and then only a regular file).
//!
//! * [`temp_path_for`] names the temporary `.NAME.lowbit-tmp.PID.N` next to `NAME`; a name too long for that
//!   (the 255-byte limit of most file systems) is shortened with a hash, so every valid final name works.
//! * [`TempFile`] creates it (mode `0o666` less the umask, like any tool's output), registers it in a
//!   process-wide registry and deletes it on drop unless it was persisted.
//! * [`TempFile::persist`] syncs the file, then either links it to the destination (`hard_link` fails with
//!   `EEXIST` if the destination exists, atomically) and unlinks the temporary, or, with `replace`, renames it
//!   over an existing regular file. File systems without hard links fall back to check-then-rename, which has
//!   a small documented race window. The directory is synced afterwards.
//! * [`register`] / [`remove_registered`]: the registry. A program's SIGINT/SIGTERM handler calls
//!   [`remove_registered`] so an interrupted run leaves nothing behind.

use crate::{Error, Result};
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The longest file name most file systems accept (ext4, xfs, btrfs, tmpfs: 255 bytes).
const MAX_NAME_BYTES: usize = 255;

/// Distinguishes the temporaries of one process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Registered temporary paths: `(id, path, is_dir)`.
static REGISTRY: Mutex<Vec<(u64, PathBuf, bool)>> = Mutex::new(Vec::new());

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// A fresh temporary path next to `dest`: `.NAME.lowbit-tmp.PID.N`, at most 255 bytes long. When `NAME` is too
/// long, its first bytes are kept and a hash of the whole name is appended (`.PREFIX~HASH.lowbit-tmp.PID.N`).
pub fn temp_path_for(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!(".lowbit-tmp.{}.{n}", std::process::id());
    let full = format!(".{name}{suffix}");
    let file = if full.len() <= MAX_NAME_BYTES {
        full
    } else {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        let tag = format!("~{:016x}", h.finish());
        let room = MAX_NAME_BYTES - 1 - tag.len() - suffix.len();
        let mut cut = room.min(name.len());
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        format!(".{}{tag}{suffix}", &name[..cut])
    };
    parent_dir(dest).join(file)
}

/// A path in the process-wide registry of temporaries; dropping it unregisters the path (and deletes it,
/// unless [`Registration::keep`] was called).
#[derive(Debug)]
pub struct Registration {
    id: u64,
    path: PathBuf,
    is_dir: bool,
    keep: bool,
}

/// Registers `path` (a file, or a directory when `is_dir`) for deletion by [`remove_registered`].
pub fn register(path: &Path, is_dir: bool) -> Registration {
    let id = COUNTER.fetch_add(1, Ordering::Relaxed);
    lock().push((id, path.to_path_buf(), is_dir));
    Registration { id, path: path.to_path_buf(), is_dir, keep: false }
}

impl Registration {
    /// The registered path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unregisters the path without deleting it (it has been moved into place).
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock().retain(|(id, _, _)| *id != self.id);
        if !self.keep {
            let _ = if self.is_dir { std::fs::remove_dir_all(&self.path) } else { std::fs::remove_file(&self.path) };
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, Vec<(u64, PathBuf, bool)>> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// The registered temporaries, oldest first.
pub fn registered() -> Vec<PathBuf> {
    lock().iter().map(|(_, p, _)| p.clone()).collect()
}

/// Deletes every registered temporary (files and directory trees) and empties the registry; returns how many
/// were removed. For signal handlers: call it from a normal thread (not inside the handler), then exit.
pub fn remove_registered() -> usize {
    let entries = std::mem::take(&mut *lock());
    let mut removed = 0;
    for (_, path, is_dir) in entries {
        let r = if is_dir { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed += usize::from(r.is_ok());
    }
    removed
}

/// A temporary file next to its destination; see the module docs.
#[derive(Debug)]
pub struct TempFile {
    file: File,
    reg: Registration,
    dest: PathBuf,
}

impl TempFile {
    /// Creates a fresh temporary for `dest` (which need not exist), mode `0o666` less the umask, and registers
    /// it. Errors say "writing TEMP: `<os error>`".
    pub fn create_for(dest: &Path) -> Result<TempFile> {
        let path = temp_path_for(dest);
        // Registered before it exists, so a signal between creation and registration cannot leave it behind
        // (removing a registered path that does not exist yet is a no-op).
        let reg = register(&path, false);
        // `create_new`: never follow or reuse something planted under our name.
        let file = match std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) => {
                // Not ours: unregister without deleting whatever is there.
                reg.keep();
                return Err(write_error(&path, e));
            }
        };
        Ok(TempFile { file, reg, dest: dest.to_path_buf() })
    }

    /// The temporary's path.
    pub fn path(&self) -> &Path {
        self.reg.path()
    }

    /// The open file, for writing.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Syncs the file and moves it to the destination; see [`persist_file`]. On error the temporary is deleted
    /// and the destination is untouched.
    pub fn persist(self, replace: bool) -> Result<()> {
        let TempFile { file, reg, dest } = self;
        file.sync_all().map_err(|e| write_error(reg.path(), e))?;
        drop(file);
        persist_file(reg.path(), &dest, replace)?;
        reg.keep();
        sync_dir(parent_dir(&dest));
        Ok(())
    }
}

/// Moves the file `tmp` to `dest`. Without `replace`, `dest` must not exist when the move happens: a file
/// created there meanwhile survives and the error says so. With `replace`, an existing `dest` must be a regular
/// file (or a symbolic link, which is replaced itself); FIFOs, devices, sockets and directories are refused.
pub fn persist_file(tmp: &Path, dest: &Path, replace: bool) -> Result<()> {
    if replace {
        match std::fs::symlink_metadata(dest) {
            Ok(m) if m.file_type().is_file() || m.file_type().is_symlink() => {
                return std::fs::rename(tmp, dest).map_err(|e| write_error(dest, e));
            }
            Ok(m) => return Err(not_replaceable(dest, &m)),
            Err(_) => {} // gone or never there: the no-replace path below
        }
    }
    match std::fs::hard_link(tmp, dest) {
        Ok(()) => {
            std::fs::remove_file(tmp).map_err(|e| write_error(tmp, e))?;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(appeared(dest)),
        Err(_) => {
            // No hard links here (FAT, some network file systems): check, then rename. A file created
            // between the check and the rename would be replaced; the window is one system call long.
            if std::fs::symlink_metadata(dest).is_ok() {
                return Err(appeared(dest));
            }
            std::fs::rename(tmp, dest).map_err(|e| write_error(dest, e))
        }
    }
}

/// The error for a destination that exists though it did not when the run started.
fn appeared(dest: &Path) -> Error {
    Error::io(
        dest,
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} appeared while writing; nothing replaced; pass --force to replace it", dest.display()),
        ),
    )
}

/// What kind of file `m` describes, for messages ("a FIFO", "a device", ...).
pub fn describe_file_type(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        return "a directory";
    }
    if t.is_symlink() {
        return "a symbolic link";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

fn not_replaceable(dest: &Path, m: &std::fs::Metadata) -> Error {
    Error::io(
        dest,
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {}; --force replaces only regular files", describe_file_type(m)),
        ),
    )
}

/// An I/O error while writing: `writing PATH: <os error>`.
pub fn write_error(path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("writing {}", path.display()), e)
}

/// Flushes a directory's entries to disk (best effort: not every platform can open a directory for syncing).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "lowbit-atomic-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn temp_names_fit_for_every_valid_name_length() {
        let d = tmpdir();
        for len in [1, 200, 243, 244, 250, 255] {
            let name = "é".repeat(len / 2) + &"x".repeat(len % 2);
            let dest = d.join(&name);
            let t = temp_path_for(&dest);
            let file = t.file_name().unwrap().to_str().unwrap();
            assert!(file.len() <= 255 && file.starts_with('.') && file.contains(".lowbit-tmp."), "{file}");
            let mut tf = TempFile::create_for(&dest).unwrap();
            tf.file().write_all(b"abc").unwrap();
            tf.persist(false).unwrap();
            assert_eq!(std::fs::read(&dest).unwrap(), b"abc");
        }
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 6, "only the outputs remain");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_destination_created_during_the_write_survives() {
        let d = tmpdir();
        let dest = d.join("out.safetensors");
        let mut tf = TempFile::create_for(&dest).unwrap();
        tf.file().write_all(b"ours").unwrap();
        let tmp = tf.path().to_path_buf();
        assert_eq!(registered().iter().filter(|p| **p == tmp).count(), 1);
        std::fs::write(&dest, b"theirs").unwrap(); // the race: someone else creates the output meanwhile
        let err = tf.persist(false).unwrap_err().to_string();
        assert!(err.contains("appeared while writing") && err.contains("nothing replaced"), "{err}");
        assert_eq!(std::fs::read(&dest).unwrap(), b"theirs");
        assert!(!tmp.exists(), "the temporary is removed");
        assert!(!registered().contains(&tmp));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn replace_takes_regular_files_and_refuses_fifos() {
        let d = tmpdir();
        let dest = d.join("out");
        std::fs::write(&dest, b"old").unwrap();
        let mut tf = TempFile::create_for(&dest).unwrap();
        tf.file().write_all(b"new").unwrap();
        tf.persist(true).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        #[cfg(unix)]
        {
            let fifo = d.join("fifo");
            let ok = std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
            if ok {
                let tf = TempFile::create_for(&fifo).unwrap();
                let tmp = tf.path().to_path_buf();
                let err = tf.persist(true).unwrap_err().to_string();
                assert!(err.contains("is a FIFO"), "{err}");
                assert!(!tmp.exists());
            } else {
                eprintln!("skipped: mkfifo unavailable, FIFO refusal not tested here");
            }
        }
        std::fs::remove_dir_all(d).unwrap();
    }
}

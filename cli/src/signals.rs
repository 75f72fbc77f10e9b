//! SIGINT / SIGTERM: delete every temporary file and directory lowbit registered
//! ([`lowbit::io::atomic::remove_registered`]) and exit with 130 / 143, so an interrupted run leaves nothing but
//! the untouched old output.
//!
//! The handler itself only writes the signal number to a pipe (async-signal-safe); a watcher thread reads it,
//! does the deleting with ordinary code and exits.

/// Installs the handlers and starts the watcher thread. Best effort: if the pipe or the thread cannot be
/// made, signals keep their default action (temporaries are then left behind, as before).
#[cfg(unix)]
pub fn install() {
    use std::sync::atomic::Ordering;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return;
    }
    let [read_fd, write_fd] = fds;
    WRITE_FD.store(write_fd, Ordering::SeqCst);
    let watcher = std::thread::Builder::new().name("lowbit-signals".into()).spawn(move || {
        let mut sig = [0u8; 1];
        // SAFETY: reading one byte into a live one-byte buffer from the pipe we own.
        let n = unsafe { libc::read(read_fd, sig.as_mut_ptr().cast(), 1) };
        if n == 1 {
            lowbit::io::atomic::remove_registered();
            std::process::exit(128 + i32::from(sig[0]));
        }
    });
    if watcher.is_err() {
        return;
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid starting value; `on_signal` is an `extern "C" fn(c_int)` that
        // only calls write(2), which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// Other platforms keep the default signal behaviour.
#[cfg(not(unix))]
pub fn install() {}

#[cfg(unix)]
static WRITE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// The signal handler: hands the signal number to the watcher thread.
#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    let fd = WRITE_FD.load(std::sync::atomic::Ordering::SeqCst);
    let byte = sig as u8;
    // SAFETY: write(2) is async-signal-safe; `byte` lives for the call.
    unsafe {
        libc::write(fd, (&byte as *const u8).cast(), 1);
    }
}

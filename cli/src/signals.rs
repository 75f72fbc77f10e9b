//! SIGINT / SIGTERM: delete every temporary file and directory lowbit registered
//! ([`lowbit::io::atomic::remove_registered`]) and exit with 130 / 143, so an interrupted run leaves nothing but
//! the untouched old output.
//!
//! SIGBUS: an input file that another process truncated while lowbit had it mapped (reading a page past the
//! new end raises SIGBUS). Instead of dying by the signal, lowbit deletes its temporaries, prints an error
//! saying what happened and exits with status 1, like any other failed run.
//!
//! The handler itself only writes the signal number to a pipe (async-signal-safe); a watcher thread reads it,
//! does the deleting with ordinary code and exits. A SIGBUS handler cannot return (the faulting read would run
//! again), so after handing the signal over it waits for the watcher to end the process.

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
            if i32::from(sig[0]) == libc::SIGBUS {
                eprintln!(
                    "error: an input file was truncated or replaced while lowbit was reading it (SIGBUS on its \
                     memory-mapped pages); nothing was written. Do not modify a model while it is being converted."
                );
                // SAFETY: _exit(2) ends the process at once; the faulting thread is parked in its handler and
                // nothing else needs flushing (stderr is unbuffered).
                unsafe { libc::_exit(1) };
            }
            std::process::exit(128 + i32::from(sig[0]));
        }
    });
    if watcher.is_err() {
        return;
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGBUS] {
        let handler = if sig == libc::SIGBUS { on_bus as extern "C" fn(libc::c_int) } else { on_signal };
        // SAFETY: a zeroed sigaction is a valid starting value; the handlers are `extern "C" fn(c_int)`s that
        // only call write(2) and pause(2), which are async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as libc::sighandler_t;
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

/// The SIGBUS handler: hands the signal to the watcher thread, then parks the faulting thread until the watcher
/// exits the process (returning would repeat the faulting read).
#[cfg(unix)]
extern "C" fn on_bus(sig: libc::c_int) {
    on_signal(sig);
    loop {
        // SAFETY: pause(2) is async-signal-safe and only waits.
        unsafe {
            libc::pause();
        }
    }
}

//! A progress bar on stderr, shown only when stderr is a terminal (so logs and pipes stay clean).

use crate::console;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// Longest message shown after the bar, in characters.
const MAX_MESSAGE: usize = 80;

/// Progress over a number of steps (tensors, layers); a no-op when stderr is not a terminal.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar of `len` steps, or nothing when stderr is not a terminal.
    pub fn new(len: u64, what: &str) -> Progress {
        if !std::io::stderr().is_terminal() || len == 0 {
            return Progress { bar: None };
        }
        let bar = ProgressBar::new(len);
        let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(console::escape(what));
        Progress { bar: Some(bar) }
    }

    /// Shows what the current step is working on (escaped with [`console::escape`] and cut to
    /// [`MAX_MESSAGE`] characters, so a tensor name can neither drive the terminal nor flood it).
    pub fn set_message(&self, msg: &str) {
        if let Some(b) = &self.bar {
            let mut m = console::escape(msg);
            if m.chars().count() > MAX_MESSAGE {
                m = m.chars().take(MAX_MESSAGE - 1).chain(['…']).collect();
            }
            b.set_message(m);
        }
    }

    /// Marks one step done.
    pub fn inc(&self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

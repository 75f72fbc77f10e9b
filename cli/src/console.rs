//! Writing results to stdout without panicking (`lowbit inspect big.safetensors | head`): the testkit's
//! writer, which treats a closed pipe as "nobody is reading", with the CLI's error type. Everything the CLI
//! prints passes through [`escape`], so a tensor name or path cannot send control sequences to the terminal.

use crate::error::CliError;

/// Whether `c` must not reach a terminal raw: the C0 controls (ESC, BEL, CR, TAB, newline, ...), DEL, the C1
/// controls (U+0080..U+009F, which some terminals read as CSI / OSC) and the bidirectional overrides and
/// isolates (U+202A..U+202E, U+2066..U+2069), which reorder the text shown around them.
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every unsafe character (see [`is_unsafe`]; newlines included) replaced by its visible Rust
/// escape `\u{XX}` (ESC becomes `\u{1b}`), so the result is printable, inert text on one line. Safe
/// characters are kept; escaping twice changes nothing more, since the escapes are plain ASCII.
pub fn escape(s: &str) -> String {
    if !s.chars().any(is_unsafe) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_unsafe(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Multi-line text (a message, a rendered table) escaped line by line with [`escape`]: the line breaks are
/// kept, every other unsafe character is made visible.
pub fn escape_lines(text: &str) -> String {
    text.split('\n').map(escape).collect::<Vec<_>>().join("\n")
}

/// Generated text for the terminal: newlines and tabs kept, every other unsafe character made visible as in
/// [`escape`] (a model can emit ESC or bidi overrides like any other token).
pub fn escape_text(text: &str) -> String {
    text.split('\n').map(|l| l.split('\t').map(escape).collect::<Vec<_>>().join("\t")).collect::<Vec<_>>().join("\n")
}

/// Writes `text` as it is (already escaped) to stdout and flushes. A closed pipe is ignored.
pub fn out_raw(text: &str) -> Result<(), CliError> {
    Ok(lowbit_testkit::console::out(text)?)
}

/// Writes `text` to stdout, escaped with [`escape_lines`]. A closed pipe is ignored; any other write error is
/// returned.
pub fn out(text: &str) -> Result<(), CliError> {
    Ok(lowbit_testkit::console::out(&escape_lines(text))?)
}

/// Writes `line` and a newline to stdout (see [`out`]).
pub fn line(line: &str) -> Result<(), CliError> {
    out(&format!("{line}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_control_characters_visible() {
        let name = "\x1b]0;pwned\x07\x1b[2J\x1b[32mquantized OK\u{9b}\u{7f}\u{202e}";
        let e = escape(name);
        assert_eq!(e, "\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{1b}[32mquantized OK\\u{9b}\\u{7f}\\u{202e}");
        assert!(!e.chars().any(is_unsafe));
        assert_eq!(escape(&e), e);
        assert_eq!(escape("model.layers.0.mlp.up_proj.weight ü"), "model.layers.0.mlp.up_proj.weight ü");
        assert_eq!(escape_lines("a\x1b\nb\r"), "a\\u{1b}\nb\\u{d}");
    }
}

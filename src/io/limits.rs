//! Resource limits for reading untrusted files.
//!
//! Checkpoints and adapters are downloaded from the internet, and servers load them with shapes taken from
//! the files. Every loader in [`crate::io`] therefore checks what a file *declares* (a header length, a
//! shape, a JSON document) against what is actually present and against a [`Limits`] value *before* it
//! allocates or parses anything proportional to the declaration. The plain loaders (`parse_safetensors`,
//! `bnb::load_checkpoint`, ...) use [`Limits::DEFAULT`]; the `*_with_limits` variants take explicit limits.
//!
//! ```
//! use lowbit::io::{parse_safetensors_with_limits, Limits};
//!
//! // A server that only ever loads adapters can be much stricter than the defaults.
//! let strict = Limits { max_tensor_bytes: 64 << 20, max_json_bytes: 64 << 10, ..Limits::DEFAULT };
//! // 8-byte header length claiming 1 TiB of JSON: refused before anything is read or allocated.
//! let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
//! bytes.extend_from_slice(b"{}");
//! assert!(parse_safetensors_with_limits(&bytes, &strict).is_err());
//! ```

use crate::{Error, Result};

/// Limits applied by the loaders to untrusted input. Build one with struct-update syntax from
/// [`Limits::DEFAULT`] to change a single field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest single tensor accepted, in bytes: both as stored in the file and as decoded to f32
    /// (`numel × 4`). Default 32 GiB (on 64-bit targets; `usize::MAX` where that does not fit), above the
    /// largest tensors of current open models (a 128k × 16k embedding is 8 GiB in f32).
    pub max_tensor_bytes: usize,
    /// Largest JSON document accepted, in bytes: a safetensors header, a bitsandbytes quant-state blob, an
    /// adapter config. Checked before parsing. Default 16 MiB (safetensors headers of large shards are a few
    /// hundred KiB; a quant state is about 200 bytes and is further capped at
    /// [`MAX_QUANT_STATE_LEN`](crate::io::bnb::MAX_QUANT_STATE_LEN)).
    pub max_json_bytes: usize,
    /// Deepest nesting of JSON arrays and objects accepted (a document `[[1]]` has depth 2). Checked by a
    /// linear scan before parsing, so the parser's own recursion limit (128 in `serde_json`) is never
    /// reached. Default 32; the formats lowbit reads need at most 4.
    pub max_json_depth: usize,
}

impl Limits {
    /// The limits the plain loaders use (see each field).
    pub const DEFAULT: Limits = Limits {
        max_tensor_bytes: if usize::BITS >= 64 { 32 << 30 } else { usize::MAX },
        max_json_bytes: 16 << 20,
        max_json_depth: 32,
    };

    /// Errors ([`Error::Format`] naming `context`) if a tensor of `bytes` bytes exceeds
    /// [`max_tensor_bytes`](Self::max_tensor_bytes).
    pub fn check_tensor_bytes(&self, context: &str, bytes: usize) -> Result<()> {
        if bytes > self.max_tensor_bytes {
            return Err(Error::format(
                context,
                format!(
                    "{bytes} bytes, more than the limit of {} bytes (Limits::max_tensor_bytes)",
                    self.max_tensor_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Errors if `numel` elements of `elem_size` bytes overflow `usize` or exceed
    /// [`max_tensor_bytes`](Self::max_tensor_bytes).
    pub fn check_elements(&self, context: &str, numel: usize, elem_size: usize) -> Result<()> {
        let bytes = numel
            .checked_mul(elem_size)
            .ok_or_else(|| Error::format(context, format!("{numel} elements of {elem_size} bytes overflow usize")))?;
        self.check_tensor_bytes(context, bytes)
    }

    /// Checks a JSON document's size and nesting depth against [`max_json_bytes`](Self::max_json_bytes) and
    /// [`max_json_depth`](Self::max_json_depth) without parsing it. Brackets inside strings (with `\"`
    /// escapes) do not count. Errors are [`Error::Format`] naming `context`.
    pub fn check_json(&self, context: &str, bytes: &[u8]) -> Result<()> {
        if bytes.len() > self.max_json_bytes {
            return Err(Error::format(
                context,
                format!(
                    "{} bytes of JSON, expected at most {} (Limits::max_json_bytes)",
                    bytes.len(),
                    self.max_json_bytes
                ),
            ));
        }
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for (i, &b) in bytes.iter().enumerate() {
            if in_string {
                match b {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > self.max_json_depth {
                        return Err(Error::format(
                            context,
                            format!(
                                "JSON nested deeper than {} levels at byte {i} (Limits::max_json_depth)",
                                self.max_json_depth
                            ),
                        ));
                    }
                }
                // Unbalanced closers are the parser's to report.
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        Ok(())
    }

    /// [`check_json`](Self::check_json), then parses the document into a [`serde_json::Value`].
    pub fn parse_json(&self, context: &str, bytes: &[u8]) -> Result<serde_json::Value> {
        self.check_json(context, bytes)?;
        serde_json::from_slice(bytes).map_err(|e| Error::format(context, format!("invalid JSON: {e}")))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_depth_and_size() {
        let l = Limits { max_json_depth: 3, max_json_bytes: 64, ..Limits::DEFAULT };
        assert!(l.check_json("t", b"[[[1]]]").is_ok());
        assert!(l.check_json("t", b"[[[[1]]]]").is_err());
        assert!(l.check_json("t", br#"{"a": "[[[[[[", "b": [[1]]}"#).is_ok(), "brackets in strings");
        assert!(l.check_json("t", br#"{"a": "\"[[[[", "b": [[1]]}"#).is_ok(), "escaped quote");
        assert!(l.check_json("t", br#"["\\", [[[1]]]]"#).is_err(), "escaped backslash ends the string");
        assert!(l.check_json("t", &[b' '; 65]).is_err());
        assert!(l.check_json("t", b"]]]]]][[[1]]]").is_ok(), "closers do not underflow");
        assert!(l.parse_json("t", b"[1, 2]").is_ok());
        assert!(l.parse_json("t", b"[1, 2").is_err());
    }

    #[test]
    fn tensor_sizes() {
        let l = Limits { max_tensor_bytes: 100, ..Limits::DEFAULT };
        assert!(l.check_elements("t", 25, 4).is_ok());
        assert!(l.check_elements("t", 26, 4).is_err());
        assert!(l.check_elements("t", usize::MAX, 2).is_err());
        assert!(l.check_tensor_bytes("t", 101).is_err());
    }
}

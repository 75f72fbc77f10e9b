//! Linear layers of a quantized checkpoint: the layer at module path `P` is the quantized 2-D weight
//! `P.weight` (bitsandbytes 4-bit or lowbit int8) and the optional plain bias `P.bias` (F32/F16/BF16, one value
//! per output feature), built by [`lowbit::io::Checkpoint::layer`] (packed codes stay in the mapped file).

use crate::error::{CliError, PathContext};
use crate::quantized::{stored_name, Layout};
use lowbit::io::Checkpoint;
use lowbit::linear::QuantLinear;

/// How many layer paths an error message lists before "and N more".
const LIST_MAX: usize = 8;

/// The module paths of the file's linear layers (quantized weights named `P.weight`), sorted.
pub fn paths(layout: &Layout) -> Vec<&str> {
    let mut p: Vec<&str> = layout.weights().into_iter().filter_map(|w| w.strip_suffix(".weight")).collect();
    p.sort_unstable();
    p
}

/// `a`, `b`, `c` and N more.
pub fn list(items: &[&str]) -> String {
    let shown: Vec<String> = items.iter().take(LIST_MAX).map(|p| format!("`{p}`")).collect();
    match items.len().saturating_sub(LIST_MAX) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

/// A module path as given on the command line: surrounding whitespace and a trailing `.` are ignored.
pub fn normalize(path: &str) -> &str {
    let p = path.trim();
    p.strip_suffix('.').unwrap_or(p)
}

/// Loads the layer at `path` of `ck` (see the module docs). Errors name the checkpoint once and, when the layer
/// is missing, list the layers it has (with a hint when `path` ends in `.weight`).
pub fn load(ck: &Checkpoint, path: &str) -> Result<QuantLinear, CliError> {
    let file_name = ck.path().display().to_string();
    let names = ck.layer_names();
    if names.binary_search_by(|n| n.as_str().cmp(path)).is_err() {
        return Err(CliError::new(missing(ck, &names, path, &file_name)));
    }
    ck.layer(path).path_context(ck.path(), &format!("layer `{path}` of"), &format!("layer `{path}`"))
}

/// Why `path` is not a quantized layer of `ck`, with the hint for a `.weight` suffix and the layers it has.
fn missing(ck: &Checkpoint, names: &[String], path: &str, file_name: &str) -> String {
    let weight_name = format!("{path}.weight");
    let hint = match path.strip_suffix(".weight") {
        Some(p) => format!(" (a layer is named by its module path: `{p}`, without `.weight`)"),
        None => String::new(),
    };
    let why = match ck.tensor_info(&weight_name) {
        Ok(info) => format!("`{weight_name}` is not quantized (a plain {} tensor)", stored_name(info.stored)),
        Err(_) => format!("it has no quantized tensor `{weight_name}`"),
    };
    let have: Vec<&str> = names.iter().map(String::as_str).collect();
    let have = if have.is_empty() { "none".to_string() } else { list(&have) };
    format!("no layer `{path}` in {file_name}{hint}: {why}; its quantized layers: {have}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_paths() {
        assert_eq!(normalize(" a.b. "), "a.b");
        assert_eq!(list(&["a", "b"]), "`a`, `b`");
        let many: Vec<String> = (0..10).map(|i| format!("l{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(list(&many).ends_with("`l7` and 2 more"), "{}", list(&many));
    }
}

//! Linear layers of a quantized checkpoint: the layer at module path `P` is the quantized 2-D weight
//! `P.weight` (bitsandbytes 4-bit or lowbit int8) and the optional plain bias `P.bias` (F32/F16/BF16, one value
//! per output feature), built by [`lowbit::io::Checkpoint::layer`] (packed codes stay in the mapped file).

use crate::error::{CliError, Context, PathContext};
use crate::quantized::{stored_name, Layout};
use lowbit::io::{float_dtype, Checkpoint, StoredType};
use lowbit::linear::QuantLinear;
use lowbit::lora::LoraAdapter;

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
    let why = match (path.strip_suffix(".weight"), ck.tensor_info(&weight_name)) {
        (Some(p), _) => format!("a layer is named by its module path: `{p}`, without `.weight`"),
        (None, Ok(info)) => format!("`{weight_name}` is not quantized (a plain {} tensor)", stored_name(info.stored)),
        (None, Err(_)) => format!("it has no quantized tensor `{weight_name}`"),
    };
    let have: Vec<&str> = names.iter().map(String::as_str).collect();
    let have = if have.is_empty() { "none".to_string() } else { list(&have) };
    format!("no layer `{path}` in {file_name}: {why}; its quantized layers: {have}")
}

/// A linear layer whose weight is not quantized in a lowbit layout: a float tensor, or a GGUF tensor of any
/// type lowbit decodes (Q4_1, Q8_0, ...), decoded to f32 once.
pub struct DenseLinear {
    /// `[out, in]` row-major, f32.
    pub weight: Vec<f32>,
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// The bias `[out]`, if the checkpoint has `P.bias`.
    pub bias: Option<Vec<f32>>,
    /// How the weight is stored (`F16`, `Q4_1`, ...).
    pub stored: String,
}

/// Whether a stored type can be decoded to f32 (a float safetensors dtype, or a ggml type lowbit decodes).
fn decodable(stored: StoredType) -> bool {
    match stored {
        StoredType::Safetensors(d) => float_dtype(d).is_some(),
        StoredType::Ggml(t) => t.can_dequantize(),
    }
}

/// The dense layer at `path` of `ck`: `None` when `{path}.weight` is missing, not 2-D or not decodable. The
/// bias `{path}.bias`, when present, must be decodable, `[out]` and finite.
pub fn load_dense(ck: &Checkpoint, path: &str) -> Result<Option<DenseLinear>, CliError> {
    let weight_name = format!("{path}.weight");
    let Ok(info) = ck.tensor_info(&weight_name) else { return Ok(None) };
    let [out, inp] = info.shape[..] else { return Ok(None) };
    if !decodable(info.stored) {
        return Ok(None);
    }
    let ctx = || format!("layer `{path}`");
    let weight = ck.tensor_f32(&weight_name).context(ctx)?;
    let bias_name = format!("{path}.bias");
    let bias = match ck.tensor_info(&bias_name) {
        Err(_) => None,
        Ok(b) if b.shape == [out] && decodable(b.stored) => {
            let v = ck.tensor_f32(&bias_name).context(ctx)?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(CliError::new(format!(
                    "`{bias_name}` holds {} at index {i}; expected finite values",
                    v[i]
                )));
            }
            Some(v)
        }
        Ok(b) => {
            return Err(CliError::new(format!(
                "`{bias_name}` is a {} tensor of shape {:?}; expected a float tensor of shape [{out}]",
                stored_name(b.stored),
                b.shape
            )))
        }
    };
    Ok(Some(DenseLinear { weight, out, inp, bias, stored: stored_name(info.stored) }))
}

impl DenseLinear {
    /// `y = x·Wᵀ + bias [+ s·(x·Aᵀ)·Bᵀ]` for `x` `[m, in]`: every output accumulated in f64 (products of f32
    /// values are exact in f64) in index order and rounded to f32 once. Errors when the adapter's shapes do not
    /// fit or `x` is not finite.
    pub fn forward(&self, x: &[f32], lora: Option<&LoraAdapter>) -> Result<Vec<f32>, CliError> {
        let (out, inp) = (self.out, self.inp);
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(CliError::new(format!("x holds {} at flat index {i}; expected finite values", x[i])));
        }
        if let Some(a) = lora {
            if (a.out_features(), a.in_features()) != (out, inp) {
                return Err(CliError::new(format!(
                    "the adapter's A [{}, {}] and B [{}, {}] do not fit the weight [{out}, {inp}]",
                    a.rank(),
                    a.in_features(),
                    a.out_features(),
                    a.rank()
                )));
            }
        }
        let mut y = Vec::with_capacity(x.len() / inp.max(1) * out);
        for xr in x.chunks_exact(inp) {
            let xa: Vec<f64> = match lora {
                Some(a) => (0..a.rank())
                    .map(|j| {
                        xr.iter().zip(&a.a()[j * inp..(j + 1) * inp]).map(|(&x, &w)| f64::from(x) * f64::from(w)).sum()
                    })
                    .collect(),
                None => Vec::new(),
            };
            for o in 0..out {
                let w = &self.weight[o * inp..(o + 1) * inp];
                let mut acc: f64 = xr.iter().zip(w).map(|(&x, &w)| f64::from(x) * f64::from(w)).sum();
                acc += self.bias.as_ref().map_or(0.0, |b| f64::from(b[o]));
                if let Some(a) = lora {
                    let r = a.rank();
                    let t: f64 = xa.iter().zip(&a.b()[o * r..(o + 1) * r]).map(|(&t, &b)| t * f64::from(b)).sum();
                    acc += f64::from(a.scaling()) * t;
                }
                y.push(acc as f32);
            }
        }
        Ok(y)
    }
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

//! Which tensors `quantize` quantizes: the default rule (the decoder's linear layers) and the `--skip` /
//! `--include` globs that override it.
//!
//! Precedence, first match wins: a tensor that is not floating point with ≥ 2 dimensions is never quantized;
//! then `--skip GLOB` (kept); then `--include GLOB` (quantized); then the default rule: `*.weight` tensors
//! except embeddings (a name containing `embed`, or a `wte` / `wpe` component) and `lm_head`.

use crate::error::CliError;

/// A shell-style pattern over a whole tensor name: `*` matches any run of characters (dots included), `?`
/// exactly one; everything else matches itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// A pattern; errors on an empty one.
    pub fn new(pattern: &str) -> Result<Glob, String> {
        if pattern.is_empty() {
            return Err("an empty pattern matches no tensor; expected a glob such as `model.layers.0.*`".into());
        }
        Ok(Glob(pattern.to_string()))
    }

    /// The pattern text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the pattern matches all of `name` (iterative wildcard matching, linear in practice; no
    /// recursion, so no stack growth on hostile patterns).
    pub fn matches(&self, name: &str) -> bool {
        let (p, s): (Vec<char>, Vec<char>) = (self.0.chars().collect(), name.chars().collect());
        let (mut pi, mut si) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while si < s.len() {
            if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == s[si])) {
                pi += 1;
                si += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some((pi, si));
                pi += 1;
            } else if let Some((sp, ss)) = star {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

/// Why a tensor was or was not quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Quantized (by the default rule or an `--include`).
    Quantize,
    /// Not floating point or fewer than 2 dimensions: copied as is.
    NotQuantizable,
    /// Kept by the default rule (an embedding, `lm_head`, or not a `*.weight`).
    KeptByRule,
    /// Kept because an `--skip` glob matched it.
    Skipped,
}

/// The `--skip` and `--include` globs.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Tensors matching any of these are kept (highest precedence).
    pub skip: Vec<Glob>,
    /// Tensors matching any of these are quantized (unless skipped), whatever the default rule says.
    pub include: Vec<Glob>,
}

impl Selection {
    /// The decision for tensor `name`; `quantizable` says whether it is floating point with ≥ 2 dimensions.
    pub fn decide(&self, name: &str, quantizable: bool) -> Decision {
        if !quantizable {
            Decision::NotQuantizable
        } else if self.skip.iter().any(|g| g.matches(name)) {
            Decision::Skipped
        } else if self.include.iter().any(|g| g.matches(name)) || default_rule(name) {
            Decision::Quantize
        } else {
            Decision::KeptByRule
        }
    }

    /// Errors when a glob matches none of `names` (a typo would otherwise silently change nothing).
    pub fn check_all_match(&self, names: &[&str]) -> Result<(), CliError> {
        for (flag, globs) in [("--skip", &self.skip), ("--include", &self.include)] {
            if let Some(g) = globs.iter().find(|g| !names.iter().any(|n| g.matches(n))) {
                let shown: Vec<&str> = names.iter().take(4).copied().collect();
                return Err(CliError::new(format!(
                    "{flag} {:?} matches no tensor of the input; expected a glob over full tensor names such as \
                     {shown:?} (`*` any characters, `?` one)",
                    g.as_str()
                )));
            }
        }
        Ok(())
    }
}

/// The default rule for a floating tensor with ≥ 2 dimensions: quantize `*.weight` unless it is an embedding
/// (`embed` anywhere in the name, or a `wte` / `wpe` component) or the output head (`lm_head`).
pub fn default_rule(name: &str) -> bool {
    let Some(module) = name.strip_suffix(".weight") else { return false };
    let parts = || module.split('.');
    !(name.contains("embed") || parts().any(|p| p == "wte" || p == "wpe" || p == "lm_head"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(p: &str) -> Glob {
        Glob::new(p).unwrap()
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(g("model.layers.*.mlp.*").matches("model.layers.12.mlp.up_proj.weight"));
        assert!(!g("model.layers.1.*").matches("model.layers.12.mlp.up_proj.weight"));
        assert!(g("model.layers.1?.*").matches("model.layers.12.mlp.up_proj.weight"));
        assert!(!g("mlp").matches("model.layers.0.mlp.up_proj.weight"), "a glob matches the whole name");
        assert!(g("*").matches("") && g("**a*").matches("ba") && !g("a?").matches("a"));
        assert!(g("*a*b").matches("xaxxab") && !g("*a*b").matches("xaxxa"));
        assert!(Glob::new("").is_err());
    }

    #[test]
    fn default_rule_keeps_embeddings_head_and_non_weights() {
        for name in ["model.layers.0.self_attn.q_proj.weight", "transformer.h.0.attn.c_attn.weight"] {
            assert!(default_rule(name), "{name}");
        }
        for name in [
            "model.embed_tokens.weight",
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "lm_head.weight",
            "model.layers.0.mlp.up_proj.bias",
            "rotary.inv_freq",
        ] {
            assert!(!default_rule(name), "{name}");
        }
    }

    #[test]
    fn skip_beats_include_beats_default() {
        let sel = Selection { skip: vec![g("*.0.*")], include: vec![g("lm_head.weight"), g("*.0.*")] };
        assert_eq!(sel.decide("model.layers.0.mlp.up_proj.weight", true), Decision::Skipped);
        assert_eq!(sel.decide("model.layers.1.mlp.up_proj.weight", true), Decision::Quantize);
        assert_eq!(sel.decide("lm_head.weight", true), Decision::Quantize);
        assert_eq!(sel.decide("model.embed_tokens.weight", true), Decision::KeptByRule);
        assert_eq!(sel.decide("lm_head.weight", false), Decision::NotQuantizable);
        assert!(sel.check_all_match(&["model.layers.0.x", "lm_head.weight"]).is_ok());
        let err = sel.check_all_match(&["model.layers.0.x"]).unwrap_err().to_string();
        assert!(err.contains("--include \"lm_head.weight\" matches no tensor"), "{err}");
    }
}

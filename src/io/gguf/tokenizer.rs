//! [`GgufTokenizer`] from a GGUF's `tokenizer.ggml.*` and `tokenizer.chat_template` metadata. A key that is
//! present with the wrong type is a [`Error::Format`] naming the key; optional keys that are absent are
//! `None` / empty.

use super::{GgufFile, GgufTokenizer, GgufValue};
use crate::{Error, Result};

impl GgufFile {
    fn type_error(&self, key: &str, v: &GgufValue, expected: &str) -> Error {
        Error::format(format!("{}: `{key}`", self.ctx()), format!("is {}, expected {expected}", v.type_description()))
    }

    /// A string array (`tokens`, `merges`), empty if absent.
    fn string_array(&self, key: &str) -> Result<Vec<String>> {
        let Some(v) = self.get(key) else { return Ok(Vec::new()) };
        let items = v.as_array().ok_or_else(|| self.type_error(key, v, "an array of strings"))?;
        items
            .iter()
            .map(|item| item.as_str().map(str::to_string).ok_or_else(|| self.type_error(key, v, "an array of strings")))
            .collect()
    }

    /// A per-token array of the same length as `tokens` (`token_type`, `scores`), empty if absent.
    fn per_token<T>(
        &self,
        key: &str,
        n_tokens: usize,
        expected: &str,
        conv: impl Fn(&GgufValue) -> Option<T>,
    ) -> Result<Vec<T>> {
        let Some(v) = self.get(key) else { return Ok(Vec::new()) };
        let items = v.as_array().ok_or_else(|| self.type_error(key, v, expected))?;
        if items.len() != n_tokens {
            return Err(Error::format(
                format!("{}: `{key}`", self.ctx()),
                format!("has {} entries, expected one per token ({n_tokens})", items.len()),
            ));
        }
        items.iter().map(|item| conv(item).ok_or_else(|| self.type_error(key, v, expected))).collect()
    }

    fn optional<T>(&self, key: &str, expected: &str, conv: impl Fn(&GgufValue) -> Option<T>) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => conv(v).map(Some).ok_or_else(|| self.type_error(key, v, expected)),
        }
    }

    /// The tokenizer metadata (see [`GgufTokenizer`]). Errors: `tokenizer.ggml.model` or
    /// `tokenizer.ggml.tokens` missing, any key of the wrong type, or `token_type` / `scores` not one entry per
    /// token. Special token ids are not checked against the vocabulary.
    pub(super) fn read_tokenizer(&self) -> Result<GgufTokenizer> {
        let ctx = || self.ctx();
        let str_of = |v: &GgufValue| v.as_str().map(str::to_string);
        let model = self
            .optional("tokenizer.ggml.model", "a string", str_of)?
            .ok_or_else(|| Error::format(ctx(), "no tokenizer: metadata key `tokenizer.ggml.model` is missing"))?;
        if !self.metadata.contains_key("tokenizer.ggml.tokens") {
            return Err(Error::format(ctx(), "no tokenizer: metadata key `tokenizer.ggml.tokens` is missing"));
        }
        let tokens = self.string_array("tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let id = |v: &GgufValue| v.as_u64().and_then(|x| u32::try_from(x).ok());
        Ok(GgufTokenizer {
            model,
            pre: self.optional("tokenizer.ggml.pre", "a string", str_of)?,
            merges: self.string_array("tokenizer.ggml.merges")?,
            token_types: self.per_token("tokenizer.ggml.token_type", n, "an array of i32", |v| {
                v.as_i64().and_then(|x| i32::try_from(x).ok())
            })?,
            scores: self.per_token("tokenizer.ggml.scores", n, "an array of f32", |v| match *v {
                GgufValue::F32(x) => Some(x),
                _ => None,
            })?,
            bos_id: self.optional("tokenizer.ggml.bos_token_id", "a u32 token id", id)?,
            eos_id: self.optional("tokenizer.ggml.eos_token_id", "a u32 token id", id)?,
            unk_id: self.optional("tokenizer.ggml.unknown_token_id", "a u32 token id", id)?,
            pad_id: self.optional("tokenizer.ggml.padding_token_id", "a u32 token id", id)?,
            add_bos: self.optional("tokenizer.ggml.add_bos_token", "a bool", GgufValue::as_bool)?,
            chat_template: self.optional("tokenizer.chat_template", "a string", str_of)?,
            tokens,
        })
    }
}

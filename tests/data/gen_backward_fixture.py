#!/usr/bin/env python3
"""Generates tests/data/peft_backward.safetensors: PyTorch autograd's gradients through a quantized linear layer
with PEFT LoRA adapters (QLoRA backward), for lowbit's training tests.

README
======
Regenerate (from the repository root, CPU only, a few seconds):

    python3 tests/data/gen_backward_fixture.py

Versions used for the committed output: Python 3.11.7, torch 2.15.0 (CPU), bitsandbytes 0.50.2, peft 0.21.2,
safetensors 0.8.0, numpy 2.4.6. Everything is seeded (seeds below); two runs write the same bytes. Tests never
run this script: they read the committed file. It reads the committed fixtures of gen_peft_fixture.py
(`peft_base.safetensors`, `peft_adapter/`, `peft_adapter_rslora/`, `peft_io.safetensors`) and does not change them.

The layer and the gradients
---------------------------
    y = x·Wᵀ + bias + Σ_adapters s·(x·Aᵀ)·Bᵀ      W [out, in] the dequantized weight (f32), A [r, in], B [out, r]
    L = Σ y ⊙ dy                                 so ∂L/∂y = dy
    dx = ∂L/∂x = dy·W + Σ s·(dy·B)·A             [M, in]
    dA = ∂L/∂lora_A.weight = s·(dy·B)ᵀ·x         [r, in]
    dB = ∂L/∂lora_B.weight = s·dyᵀ·(x·Aᵀ)        [out, r]
f32 values: PEFT 0.21.2's `lora.Linear` (base layer a plain f32 `torch.nn.Linear` holding W, requires_grad False;
forward `base(x) + lora_B(lora_A(dropout(x))) * scaling` per active adapter, dropout 0 = identity) on CPU in float32,
no autocast, `L.backward()`; `scaling` is PEFT's Python float (alpha/r, or alpha/sqrt(r) with use_rslora).
f64 values (`*_f64`): the formulas above evaluated by numpy in float64 from the SAME f32 operands (W, bias, x, dy,
A, B widened exactly) with s = PEFT's scaling as an f64 (the Python float: 3/sqrt(2) for `down`, all other scalings
are exact small binary fractions). Independent of torch; the script also checks them against torch autograd on a
float64 copy of the module (agreement ~1e-16 relative).
Why a plain nn.Linear instead of PEFT on bnb.nn.Linear4bit: bitsandbytes 0.50.2's native CPU 4-bit kernels are
wrong when in % blocksize != 0 and the Linear4bit forward fails on this CPU (see gen_peft_fixture.py and
gen_fixtures.py); W is bitsandbytes' REFERENCE-backend dequantization (`_dequantize_4bit_compute`) of the committed
state, which equals peft_io.safetensors' `w_dequant` bit for bit (asserted) and which lowbit reproduces bit for bit.

Cases (x [3, in], dy [3, out]; M = 3)
-------------------------------------
  up     model.layers.0.mlp.up_proj of peft_base.safetensors (nf4, double quant, quantized from f32, bias; in 80,
         out 96) with the committed adapter peft_adapter/ (r 8, alpha 16, s = 2), adapter name "peft_adapter".
  down   model.layers.0.mlp.down_proj (nf4, double quant, quantized from bf16, no bias; in 128, out 48) with the
         committed peft_adapter_rslora/ (rank_pattern: r 2, alpha 3, use_rslora, s = 3/sqrt(2)), adapter name
         "peft_adapter_rslora". Its file stores bf16; PEFT (autocast_adapter_dtype=True, f32 base) loads them as
         f32 (the bf16 values widened exactly, asserted), so `down.peft_adapter_rslora.lora_A/B` are f32.
  multi  the `up` layer with BOTH committed adapters active at once (PeftModel.from_pretrained(peft_adapter,
         adapter_name="peft_adapter"), load_adapter(peft_adapter_rslora, adapter_name="peft_adapter_rslora"),
         base_model.set_adapter(["peft_adapter", "peft_adapter_rslora"])): r 8 / alpha 16 / s 2 and
         r 4 / alpha 8 / rsLoRA / s 4. PEFT adds the adapters in that order.
  int8   W0 = randn(40, 72) * 0.05 (seed 31), PerChannelMinMaxObserver(ch_axis=0, dtype=quint8,
         qscheme=per_channel_affine) -> scales, zero points; q = quantize_per_channel(W0, scales.double(),
         zero_points.long(), 0, quint8); W = q.dequantize() (f32) in an nn.Linear(72, 40) named `proj` with bias
         randn(40) * 0.1 (same generator); new PEFT LoRA (torch.manual_seed(32)): r 4, alpha 8, use_rslora, s 4,
         init_lora_weights=False (B random), adapter name "default".
  fp4    model.layers.0.mlp.gate_proj (fp4, plain f32 scales, no bias; in 80, out 96) with a new PEFT LoRA
         (torch.manual_seed(33)): r 2, alpha 3, s 1.5, init_lora_weights=False, adapter name "default".
x and dy: per case torch.Generator().manual_seed(SEED_X + case index), x = randn(3, in), dy = randn(3, out).

Keys (C = case, N = adapter name; f32 unless stated; row-major)
---------------------------------------------------------------
  C.w               [out, in]  the dequantized weight W used (for 4-bit cases: assert bit-equality with lowbit's
                               dequantization of peft_base first)
  C.bias            [out]      only `up` and `int8`
  C.x               [3, in]    input
  C.dy              [3, out]   ∂L/∂y
  C.y               [3, out]   the f32 forward (PEFT)
  C.dx              [3, in]    autograd ∂L/∂x (f32)
  C.N.lora_A        [r, in]    the f32 A used
  C.N.lora_B        [out, r]   the f32 B used
  C.N.grad_A        [r, in]    autograd ∂L/∂A (f32)
  C.N.grad_B        [out, r]   autograd ∂L/∂B (f32)
  C.y_f64, C.dx_f64, C.N.grad_A_f64, C.N.grad_B_f64   F64, same shapes: the f64 evaluation described above
  int8.codes        U8  [40, 72]  q.int_repr()
  int8.scales       F32 [40]      observer scales (f32; torch quantizes with them widened to f64)
  int8.zero_points  I64 [40]      observer zero points (0..=255)
Metadata: "cases" = JSON object, per case: layer (path in peft_base.safetensors or null), base (format), m, in,
out, bias (bool), adapters (list in PEFT's order of {name, dir (committed adapter dir or null), r, alpha,
use_rslora, scaling (PEFT's Python float), scaling_f32 (that float rounded to f32)}). It is the only metadata key:
safetensors writes several metadata keys in a random order, which would make the bytes differ from run to run.
"""

import copy
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
OUT = os.path.join(HERE, "peft_backward.safetensors")
M = 3
SEED_X = 300
UP = "model.layers.0.mlp.up_proj"
DOWN = "model.layers.0.mlp.down_proj"
GATE = "model.layers.0.mlp.gate_proj"


def load_base():
    """The committed bnb 4-bit layers: {short name: (W f32 reference dequant, bias or None, QuantState)}."""
    import bitsandbytes.functional as F
    import safetensors.torch as st
    from bitsandbytes.functional import QuantState
    from gen_fixtures import bnb_reference_dequant

    sd = st.load_file(os.path.join(HERE, "peft_base.safetensors"))
    io = st.load_file(os.path.join(HERE, "peft_io.safetensors"))
    out = {}
    for path in [UP, DOWN, GATE]:
        w = path + ".weight"
        parts = {k[len(w) + 1 :]: v for k, v in sd.items() if k.startswith(w + ".")}
        qs = QuantState.from_dict(parts, device=torch.device("cpu"))
        ref = bnb_reference_dequant(sd[w], qs, torch.float32).contiguous()
        qs32 = copy.copy(qs)
        qs32.dtype = torch.float32
        native = F.dequantize_4bit(sd[w], qs32)
        bad = int((native.view(-1) != ref.view(-1)).sum())
        print(f"  {path}: {qs.quant_type} blocksize {qs.blocksize} nested {qs.nested} dtype {qs.dtype} shape "
              f"{tuple(qs.shape)}: F.dequantize_4bit (native CPU) differs from the reference backend at {bad} "
              f"elements" + (" (the known native-kernel bug, in % blocksize != 0)" if bad else ""))
        assert not bad or qs.shape[-1] % qs.blocksize != 0
        if path + ".w_dequant" in io:
            assert torch.equal(ref.view(torch.int32), io[path + ".w_dequant"].view(torch.int32)), path
            print(f"  {path}: reference dequant == peft_io.safetensors w_dequant bit for bit")
        bias = sd.get(path + ".bias")
        out[path.rsplit(".", 1)[1]] = (ref, None if bias is None else bias.float().contiguous(), qs)
    return out


def lora_layers(pm, name):
    from gen_peft_fixture import mlp

    return getattr(mlp(pm), name)


def f64_reference(w, bias, x, dy, adapters):
    """numpy float64 evaluation of y, dx, dA, dB from the f32 operands. adapters: [(A, B, s)]."""
    d = lambda t: t.detach().numpy().astype(np.float64)  # noqa: E731 (exact widening)
    W, X, DY = d(w), d(x), d(dy)
    y = X @ W.T + (d(bias) if bias is not None else 0.0)
    dx = DY @ W
    grads = []
    for a, b, s in adapters:
        A, B = d(a), d(b)
        t = X @ A.T  # [M, r]
        u = DY @ B  # [M, r]
        y = y + s * (t @ B.T)
        dx = dx + s * (u @ A)
        grads.append((s * (u.T @ X), s * (DY.T @ t)))
    return y, dx, grads


def run_case(out, meta, case, idx, layer, w, bias, names, dirs, base_desc, layer_path):
    """Forward + backward of one PEFT lora.Linear; records everything under `case.`."""
    fout, fin = w.shape
    g = torch.Generator().manual_seed(SEED_X + idx)
    x = torch.randn(M, fin, generator=g)
    dy = torch.randn(M, fout, generator=g)
    assert list(layer.active_adapters) == names, (layer.active_adapters, names)
    assert torch.equal(layer.base_layer.weight.view(torch.int32), w.view(torch.int32))
    assert not layer.base_layer.weight.requires_grad
    params = []
    for n in names:
        a, b = layer.lora_A[n].weight, layer.lora_B[n].weight
        assert a.dtype == torch.float32 and b.dtype == torch.float32 and a.requires_grad and b.requires_grad
        a.grad = b.grad = None
        params.append((a, b))
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    assert y.dtype == torch.float32
    (y * dy).sum().backward()

    out[f"{case}.w"] = w
    if bias is not None:
        out[f"{case}.bias"] = bias
    out[f"{case}.x"], out[f"{case}.dy"] = x, dy
    out[f"{case}.y"], out[f"{case}.dx"] = y.detach(), xg.grad
    ads = []
    for n, (a, b) in zip(names, params):
        out[f"{case}.{n}.lora_A"], out[f"{case}.{n}.lora_B"] = a.detach(), b.detach()
        out[f"{case}.{n}.grad_A"], out[f"{case}.{n}.grad_B"] = a.grad, b.grad
        s = layer.scaling[n]
        ads.append((a.detach(), b.detach(), float(s)))
    y64, dx64, g64 = f64_reference(w, bias, x, dy, ads)
    out[f"{case}.y_f64"], out[f"{case}.dx_f64"] = torch.from_numpy(y64), torch.from_numpy(dx64)
    for n, (ga, gb) in zip(names, g64):
        out[f"{case}.{n}.grad_A_f64"], out[f"{case}.{n}.grad_B_f64"] = torch.from_numpy(ga), torch.from_numpy(gb)

    # Cross-check the numpy f64 evaluation against torch autograd on a float64 copy of the same layer.
    l64 = copy.deepcopy(layer).double()
    for n in names:
        l64.lora_A[n].weight.grad = l64.lora_B[n].weight.grad = None
    x64 = x.double().requires_grad_(True)
    y_t64 = l64(x64)
    (y_t64 * dy.double()).sum().backward()
    chk = [(y_t64.detach(), y64), (x64.grad, dx64)]
    for n, (ga, gb) in zip(names, g64):
        chk += [(l64.lora_A[n].weight.grad, ga), (l64.lora_B[n].weight.grad, gb)]
    worst64 = max(float(np.abs(t.numpy() - r).max() / max(np.abs(r).max(), 1e-300)) for t, r in chk)
    assert worst64 < 1e-13, worst64

    # f32 vs f64, for the report.
    def rel(key):
        a, b = out[key].double(), out[key + "_f64"]
        return float((a - b).abs().max() / b.abs().max())

    keys = [f"{case}.y", f"{case}.dx"] + [f"{case}.{n}.grad_{k}" for n in names for k in "AB"]
    print(f"  {case}: torch f64 autograd vs numpy f64: max |diff|/max|ref| {worst64:.1e}; f32 vs f64 "
          + ", ".join(f"{k.split('.', 1)[1]} {rel(k):.2e}" for k in keys))

    meta[case] = {
        "layer": layer_path,
        "base": base_desc,
        "m": M,
        "in": fin,
        "out": fout,
        "bias": bias is not None,
        "adapters": [
            {
                "name": n,
                "dir": d,
                "r": int(layer.r[n]),
                "alpha": float(layer.lora_alpha[n]),
                "use_rslora": bool(layer.use_rslora[n]) if hasattr(layer, "use_rslora") else None,
                "scaling": float(layer.scaling[n]),
                "scaling_f32": float(np.float32(layer.scaling[n])),
            }
            for n, d in zip(names, dirs)
        ],
    }


def main():
    import importlib.metadata

    import bitsandbytes as bnb
    import peft
    import safetensors.torch as st
    from gen_peft_fixture import LAYERS, Tiny
    from peft import LoraConfig, PeftModel, get_peft_model

    print("torch", torch.__version__, "bitsandbytes", bnb.__version__, "peft", peft.__version__)
    torch.set_grad_enabled(True)
    base = load_base()

    def make_ref(name, fin, fout, qt, cs, wdt, has_bias):
        lin = torch.nn.Linear(fin, fout, bias=has_bias)
        w, b, _ = base[name]
        with torch.no_grad():
            lin.weight.copy_(w)
            if has_bias:
                lin.bias.copy_(b)
        lin.weight.requires_grad_(False)
        if has_bias:
            lin.bias.requires_grad_(False)
        return lin

    def ref_model():
        m = Tiny(make_ref).eval()
        for n, *_ in LAYERS:
            assert torch.equal(getattr(m.model.layers[0].mlp, n).weight, base[n][0])
        return m

    out, meta = {}, {}
    adir = lambda n: os.path.join(HERE, n)  # noqa: E731
    file_ab = {
        n: st.load_file(os.path.join(HERE, n, "adapter_model.safetensors")) for n in ["peft_adapter", "peft_adapter_rslora"]
    }

    def check_loaded(layer, n, path):
        for k in "AB":
            want = file_ab[n][f"base_model.model.{path}.lora_{k}.weight"].float()
            got = getattr(layer, f"lora_{k}")[n].weight
            assert torch.equal(got.detach(), want), (n, path, k)

    # a. up + peft_adapter
    pm = PeftModel.from_pretrained(ref_model(), adir("peft_adapter"), adapter_name="peft_adapter", is_trainable=True)
    lay = lora_layers(pm, "up_proj")
    check_loaded(lay, "peft_adapter", UP)
    w, b, qs = base["up_proj"]
    run_case(out, meta, "up", 0, lay, w, b, ["peft_adapter"], ["tests/data/peft_adapter"],
             "bnb nf4 blocksize 64 double quant (quant_state dtype float32)", UP)

    # b. down + peft_adapter_rslora (bf16 on disk)
    pm = PeftModel.from_pretrained(
        ref_model(), adir("peft_adapter_rslora"), adapter_name="peft_adapter_rslora", is_trainable=True
    )
    lay = lora_layers(pm, "down_proj")
    check_loaded(lay, "peft_adapter_rslora", DOWN)
    w, b, qs = base["down_proj"]
    run_case(out, meta, "down", 1, lay, w, b, ["peft_adapter_rslora"], ["tests/data/peft_adapter_rslora"],
             "bnb nf4 blocksize 64 double quant (quant_state dtype bfloat16)", DOWN)

    # c. up + both adapters active
    pm = PeftModel.from_pretrained(ref_model(), adir("peft_adapter"), adapter_name="peft_adapter", is_trainable=True)
    pm.load_adapter(adir("peft_adapter_rslora"), adapter_name="peft_adapter_rslora", is_trainable=True)
    names = ["peft_adapter", "peft_adapter_rslora"]
    pm.base_model.set_adapter(names)
    lay = lora_layers(pm, "up_proj")
    for n in names:
        check_loaded(lay, n, UP)
        for p in (lay.lora_A[n].weight, lay.lora_B[n].weight):
            p.requires_grad_(True)
    w, b, qs = base["up_proj"]
    run_case(out, meta, "multi", 2, lay, w, b, names, ["tests/data/peft_adapter", "tests/data/peft_adapter_rslora"],
             "bnb nf4 blocksize 64 double quant (quant_state dtype float32)", UP)

    # d. int8: torch quint8 per-channel affine weight
    g = torch.Generator().manual_seed(31)
    w0 = torch.randn(40, 72, generator=g) * 0.05
    bias = torch.randn(40, generator=g) * 0.1
    obs = torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine)
    obs(w0)
    scales, zps = obs.calculate_qparams()
    assert scales.dtype == torch.float32 and ((zps >= 0) & (zps <= 255)).all()
    q = torch.quantize_per_channel(w0, scales.double(), zps.long(), 0, torch.quint8)
    wq = q.dequantize().contiguous()
    rule = (q.int_repr().int() - zps.view(-1, 1).int()).float() * scales.view(-1, 1)
    print(f"  int8: torch dequantize == (q - zp) * scale (f32) at all elements: {torch.equal(rule, wq)}")

    class Proj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(72, 40)
            with torch.no_grad():
                self.proj.weight.copy_(wq)
                self.proj.bias.copy_(bias)
            self.proj.requires_grad_(False)

    torch.manual_seed(32)
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["proj"], init_lora_weights=False,
                     lora_dropout=0.0, bias="none")
    pm = get_peft_model(Proj().eval(), cfg)
    lay = pm.base_model.model.proj
    run_case(out, meta, "int8", 3, lay, wq, bias, ["default"], [None],
             "torch quint8 per_channel_affine axis 0 (PerChannelMinMaxObserver)", None)
    out["int8.codes"] = q.int_repr()
    out["int8.scales"] = scales
    out["int8.zero_points"] = zps.long()

    # e. fp4 gate_proj + new adapter
    torch.manual_seed(33)
    cfg = LoraConfig(r=2, lora_alpha=3, target_modules=["gate_proj"], init_lora_weights=False, lora_dropout=0.0,
                     bias="none")
    pm = get_peft_model(ref_model(), cfg)
    lay = lora_layers(pm, "gate_proj")
    w, b, qs = base["gate_proj"]
    run_case(out, meta, "fp4", 4, lay, w, b, ["default"], [None], "bnb fp4 blocksize 64 plain f32 scales", GATE)

    versions = {p: importlib.metadata.version(p) for p in ["torch", "bitsandbytes", "peft", "safetensors", "numpy"]}
    print("versions", versions)
    st.save_file({k: v.contiguous().clone() for k, v in sorted(out.items())}, OUT,
                 metadata={"cases": json.dumps(meta)})  # ONE key: safetensors writes several in random order
    print(f"wrote {os.path.relpath(OUT)}: {len(out)} tensors, {os.path.getsize(OUT)} bytes")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()

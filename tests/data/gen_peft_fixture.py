#!/usr/bin/env python3
"""Generates the PEFT (LoRA) interoperability fixtures of lowbit's test suite (`tests/peft_interop.rs`).

README
======
Regenerate (from the repository root, CPU only, a few seconds):

    python3 tests/data/gen_peft_fixture.py

Versions used for the committed outputs: Python 3.11.7, torch 2.15.0 (CPU), bitsandbytes 0.50.2, peft 0.21.2,
safetensors 0.8.0. Everything is seeded. Tests never run this script: they read the committed files.

Outputs (about 100 KB together)
-------------------------------
* tests/data/peft_base.safetensors: the state dict of a tiny torch module whose three layers are
  `bnb.nn.Linear4bit`, saved exactly as Hugging Face saves a bnb 4-bit model (state_dict -> safetensors, the
  layout of docs/formats.md §4):
    model.layers.0.mlp.up_proj    Linear4bit(in=80,  out=96), nf4, compress_statistics=True, bias (f32),
                                  weight quantized from f32 (quant_state dtype float32). 80 % 64 != 0.
    model.layers.0.mlp.down_proj  Linear4bit(in=128, out=48), nf4, compress_statistics=True, no bias,
                                  weight quantized from bf16 (quant_state dtype bfloat16).
    model.layers.0.mlp.gate_proj  Linear4bit(in=80,  out=96), fp4, plain scales, no bias: NOT targeted by any
                                  adapter (an AttachReport must list it as a layer without adapter).
  All three use compute_dtype=float32.
* tests/data/peft_adapter/: `peft_model.save_pretrained(dir)` of a LoRA adapter, untouched:
    r=8, lora_alpha=16, use_rslora=False, target_modules=["up_proj", "down_proj"], init_lora_weights=False
    (so lora_B is random, not zero), lora_dropout=0, bias="none". Tensors f32.
* tests/data/peft_adapter_rslora/: a second adapter, save_pretrained then its adapter_model.safetensors
  rewritten with every tensor converted to bfloat16 (same keys, same `format: pt` metadata) to exercise bf16
  loading:
    r=4, lora_alpha=8, use_rslora=True, target_modules=".*\\.(up|down)_proj" (a regex string),
    rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3}, init_lora_weights=False.
* tests/data/peft_io.safetensors, per targeted module path P (`model.layers.0.mlp.up_proj`, ...down_proj):
    P.x               f32 [5, in]   the input
    P.y.peft_adapter  f32 [5, out]  PEFT's output with adapter peft_adapter active
    P.y.peft_adapter_rslora  f32 [5, out]  the same for the rsLoRA adapter
    P.w_dequant       f32 [out, in] the f32 weight the expected outputs were computed with (see below)

What the expected output is, exactly
------------------------------------
`y = PEFT's lora.Linear.forward(x)` in float32 on CPU, i.e.
    result = base_layer(x) = x @ W.T + bias          (torch.nn.functional.linear, f32)
    result = result + lora_B(lora_A(x)) * scaling    (f32; scaling = lora_alpha / r, or lora_alpha / sqrt(r)
                                                      for rsLoRA, a Python float applied to an f32 tensor)
where base_layer is a plain f32 `torch.nn.Linear` whose weight W is bitsandbytes' dequantization of the 4-bit
weight in float32 through its REFERENCE backend (`_dequantize_4bit_compute`, the same helper
gen_fixtures.py uses), and the adapter is loaded with `PeftModel.from_pretrained(reference_model, dir)` from the
committed directory. Why not run PEFT on the Linear4bit itself: bitsandbytes 0.50.2's native CPU dequant
kernel indexes the block scales per row and is wrong whenever in % blocksize != 0 (up_proj, in=80; documented
in gen_fixtures.py), and on AVX512-BF16 CPUs forward() repacks the weight. The script still runs PEFT on the
Linear4bit model (after everything is saved) and prints the difference, for information only; with
bitsandbytes 0.50.2 on this CPU that forward fails for both layers (`_convert_weight_packed_for_cpu`: "shape
'[96, 1]' is invalid" for in=80, "N must be divisible by block_n" for out=48), so the f32 reference above is the
only PEFT output available on CPU.
lowbit's dequantization of the same checkpoint equals W bit for bit (tests/interop_bnb.rs checks the
reference-backend equality on the same layouts; tests/peft_interop.rs checks `P.w_dequant` again).
"""

import copy
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

M = 5
LAYERS = [
    # name, in, out, quant_type, compress_statistics, weight dtype, bias
    ("up_proj", 80, 96, "nf4", True, torch.float32, True),
    ("down_proj", 128, 48, "nf4", True, torch.bfloat16, False),
    ("gate_proj", 80, 96, "fp4", False, torch.float32, False),
]
TARGETED = ["up_proj", "down_proj"]


class Mlp(torch.nn.Module):
    def __init__(self, make):
        super().__init__()
        for name, fin, fout, *rest in LAYERS:
            setattr(self, name, make(name, fin, fout, *rest))


class Block(torch.nn.Module):
    def __init__(self, make):
        super().__init__()
        self.mlp = Mlp(make)


class Inner(torch.nn.Module):
    def __init__(self, make):
        super().__init__()
        self.layers = torch.nn.ModuleList([Block(make)])


class Tiny(torch.nn.Module):
    """Module paths `model.layers.0.mlp.{up,down,gate}_proj`, as in a Llama-style model."""

    def __init__(self, make):
        super().__init__()
        self.model = Inner(make)


def mlp(model):
    # PeftModel -> LoraModel -> Tiny
    while not isinstance(model, Tiny):
        model = model.base_model if hasattr(model, "base_model") and model.base_model is not model else model.model
    return model.model.layers[0].mlp


def main():
    import bitsandbytes as bnb
    import peft
    import safetensors.torch as st
    from gen_fixtures import bnb_reference_dequant
    from peft import LoraConfig, PeftModel, get_peft_model

    print("torch", torch.__version__, "bitsandbytes", bnb.__version__, "peft", peft.__version__)
    g = torch.Generator().manual_seed(2024)

    # ---- base model: Linear4bit layers, quantized on CPU by .to("cpu"), saved BEFORE any forward() ----
    def make_bnb(name, fin, fout, qt, cs, wdt, has_bias):
        layer = bnb.nn.Linear4bit(
            fin, fout, bias=has_bias, compute_dtype=torch.float32, compress_statistics=cs, quant_type=qt
        )
        w = (torch.randn(fout, fin, generator=g) * 0.05).to(wdt)
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=cs, quant_type=qt, module=layer)
        if has_bias:
            layer.bias = torch.nn.Parameter(torch.randn(fout, generator=g) * 0.1, requires_grad=False)
        layer = layer.to("cpu")
        assert layer.weight.bnb_quantized and layer.weight.quant_state.nested == cs
        return layer

    base = Tiny(make_bnb).eval()
    sd = base.state_dict()
    st.save_file({k: v.contiguous().clone() for k, v in sd.items()}, os.path.join(HERE, "peft_base.safetensors"))
    print("base keys:", sorted(sd))

    # ---- the f32 reference model: nn.Linear with bnb's reference-backend f32 dequantization ----
    deq = {}
    for name, *_ in LAYERS:
        lin = getattr(base.model.layers[0].mlp, name)
        deq[name] = bnb_reference_dequant(lin.weight.data, lin.weight.quant_state, torch.float32).contiguous()

    def make_ref(name, fin, fout, qt, cs, wdt, has_bias):
        lin = torch.nn.Linear(fin, fout, bias=has_bias)
        with torch.no_grad():
            lin.weight.copy_(deq[name])
            if has_bias:
                lin.bias.copy_(getattr(base.model.layers[0].mlp, name).bias.float())
        return lin

    # ---- adapters, created on the bnb model (PEFT's Linear4bit LoRA layers), saved with save_pretrained ----
    configs = {
        "peft_adapter": LoraConfig(
            r=8, lora_alpha=16, target_modules=TARGETED, init_lora_weights=False, lora_dropout=0.0, bias="none"
        ),
        "peft_adapter_rslora": LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=r".*\.(up|down)_proj",
            rank_pattern={"down_proj": 2},
            alpha_pattern={"down_proj": 3},
            init_lora_weights=False,
            lora_dropout=0.0,
            bias="none",
        ),
    }
    io = {}
    for adir, cfg in configs.items():
        torch.manual_seed(7 if adir == "peft_adapter" else 8)
        model = copy.deepcopy(base)  # a copy: `base` itself stays untouched
        model.is_loaded_in_4bit = True  # what transformers sets; PEFT dispatches to its bnb LoRA layers on it
        pm = get_peft_model(model, cfg)
        kinds = {n: type(getattr(mlp(pm), n)).__module__ + "." + type(getattr(mlp(pm), n)).__name__ for n in TARGETED}
        print(f"{adir}: LoRA layer classes {kinds}")
        assert all("bnb" in k for k in kinds.values()), kinds
        path = os.path.join(HERE, adir)
        pm.save_pretrained(path)
        os.remove(os.path.join(path, "README.md"))  # a model-card template; not part of the adapter
        if adir == "peft_adapter_rslora":
            f = os.path.join(path, "adapter_model.safetensors")
            t = st.load_file(f)
            st.save_file({k: v.to(torch.bfloat16).contiguous() for k, v in t.items()}, f, metadata={"format": "pt"})
        keys = sorted(st.load_file(os.path.join(path, "adapter_model.safetensors")))
        print(f"{adir}: keys {keys}")

        # Expected output: PEFT loading the committed directory onto the f32 reference model.
        ref = PeftModel.from_pretrained(Tiny(make_ref).eval(), path).eval()
        rm = mlp(ref)
        for name in TARGETED:
            layer = getattr(rm, name)
            assert layer.lora_A["default"].weight.dtype == torch.float32
            fin = LAYERS[[n for n, *_ in LAYERS].index(name)][1]
            p = f"model.layers.0.mlp.{name}"
            if f"{p}.x" not in io:
                io[f"{p}.x"] = torch.randn(M, fin, generator=g)
                io[f"{p}.w_dequant"] = deq[name]
            x = io[f"{p}.x"]
            with torch.no_grad():
                y = layer(x)
            assert y.dtype == torch.float32
            io[f"{p}.y.{adir}"] = y
            print(f"  {p}: scaling {layer.scaling['default']!r}, r {layer.r['default']}, |y| max {y.abs().max():.4f}")
            # For information: PEFT on the bnb Linear4bit model (native CPU kernels).
            bl = getattr(mlp(pm), name)
            try:
                with torch.no_grad():
                    yb = bl(x.float()).float()
                print(f"  {p}: PEFT on Linear4bit (bnb native CPU forward) differs from the reference by "
                      f"{(yb - y).abs().max().item():.3e}")
            except (RuntimeError, AssertionError) as e:
                print(f"  {p}: PEFT on Linear4bit fails on this CPU (bitsandbytes {bnb.__version__}): {e}")

    st.save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(HERE, "peft_io.safetensors"),
                 metadata={"m": str(M), "adapters": json.dumps(list(configs))})
    for f in ["peft_base.safetensors", "peft_io.safetensors", "peft_adapter/adapter_model.safetensors",
              "peft_adapter_rslora/adapter_model.safetensors"]:
        print(f"wrote tests/data/{f}: {os.path.getsize(os.path.join(HERE, f))} bytes")


if __name__ == "__main__":
    main()

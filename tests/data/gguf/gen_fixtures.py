#!/usr/bin/env python3
"""Fixtures for lowbit's ggml dequantization (tests/ggml_dequant.rs) and the GGUF reader.

For each type lowbit decodes, writes into this directory:
  TYPE.bin   raw little-endian blocks of one tensor [rows, cols] (random bytes; f16 scales set to realistic
             finite values, except the "extreme" blocks listed in the manifest, whose bytes are all 0x00, all
             0xff, or carry inf / NaN / largest / subnormal scales)
  TYPE.f32   gguf-py's `gguf.quants.dequantize` of TYPE.bin, little-endian f32, [rows, cols]
  manifest.json  {TYPE: {"shape": [rows, cols], "blocks": n, "extreme_blocks": [...]}}
  all_types.gguf one tensor per type (named TYPE in lowercase, the same bytes, raw_dtype=TYPE), written with
             gguf.GGUFWriter; its dequantization is TYPE.f32 (checked below by reading it back with GGUFReader).

Run from anywhere: `python3 tests/data/gguf/gen_fixtures.py` (needs the `gguf` pip package and numpy).
Deterministic (fixed seed). Tests never run Python: the outputs are committed.
"""

import json
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(20261202)

# (type, shape [rows, cols], byte offsets of the f16 scale fields in a block)
TYPES = [
    (T.F32, (3, 37), []),
    (T.F16, (3, 37), []),
    (T.BF16, (3, 37), []),
    (T.Q8_0, (7, 96), [0]),
    (T.Q4_0, (7, 96), [0]),
    (T.Q4_1, (7, 96), [0, 2]),
    (T.Q5_0, (7, 96), [0]),
    (T.Q5_1, (7, 96), [0, 2]),
    (T.Q2_K, (7, 512), [80, 82]),
    (T.Q3_K, (7, 512), [108]),
    (T.Q4_K, (7, 512), [0, 2]),
    (T.Q5_K, (7, 512), [0, 2]),
    (T.Q6_K, (7, 512), [208]),
]

# Special f16 scale patterns for extreme blocks: +inf, NaN (quiet), NaN (signalling, negative), largest
# finite, smallest subnormal, -0.
SPECIAL_F16 = [0x7C00, 0x7E00, 0xFC01, 0x7BFF, 0x0001, 0x8000]


def realistic_f16(n):
    """Scales like real checkpoints': positive and negative magnitudes 1e-4 .. 1e-1 as f16."""
    mag = np.exp(rng.uniform(np.log(1e-4), np.log(1e-1), n)).astype(np.float32)
    sign = np.where(rng.random(n) < 0.2, -1.0, 1.0).astype(np.float32)
    return (mag * sign).astype(np.float16).view(np.uint16)


def plain_values(ty, n):
    """Elements of F32 / F16 / BF16 tensors: normal data plus every special value class."""
    x = rng.normal(0.0, 0.05, n).astype(np.float32)
    if ty == T.F32:
        bits = x.view(np.uint32).copy()
        specials = [0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFC12345, 0x80000000, 0x00000001, 0x007FFFFF,
                    0x7F7FFFFF]
        bits[: len(specials)] = specials
        return bits.astype("<u4").tobytes()
    if ty == T.F16:
        bits = x.astype(np.float16).view(np.uint16).copy()
        specials = [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFD55, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7BFF]
        bits[: len(specials)] = specials
        return bits.astype("<u2").tobytes()
    # BF16: the top half of f32 bits (truncation is fine: any bit pattern is a valid bf16)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    specials = [0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFAA, 0x8000, 0x0001, 0x007F, 0x7F7F]
    bits[: len(specials)] = specials
    return bits.astype("<u2").tobytes()


def quant_blocks(ty, n_blocks, scale_offsets):
    """Random blocks with realistic scales, and the indices of the extreme blocks (the last few)."""
    _, type_size = GGML_QUANT_SIZES[ty]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in scale_offsets:
        blocks[:, off : off + 2] = realistic_f16(n_blocks).astype("<u2").view(np.uint8).reshape(n_blocks, 2)
    extreme = []
    # Extreme blocks at the end: all zero bytes, all 0xff bytes (NaN scales), then special scale patterns.
    patterns = [("zeros", None), ("ones", None)] + [("scale", s) for s in SPECIAL_F16]
    for k, (kind, special) in enumerate(patterns):
        i = n_blocks - len(patterns) + k
        if i < 0:
            continue
        if kind == "zeros":
            blocks[i] = 0
        elif kind == "ones":
            blocks[i] = 0xFF
        else:
            # first scale field special, the others realistic
            blocks[i, scale_offsets[0] : scale_offsets[0] + 2] = np.array([special], dtype="<u2").view(np.uint8)
        extreme.append(i)
    return blocks, extreme


def main():
    manifest = {}
    tensors = []
    for ty, shape, scale_offsets in TYPES:
        rows, cols = shape
        block_size, type_size = GGML_QUANT_SIZES[ty]
        assert cols % block_size == 0
        n_blocks = rows * cols // block_size
        if scale_offsets:
            blocks, extreme = quant_blocks(ty, n_blocks, scale_offsets)
            raw = blocks.tobytes()
        else:
            raw, extreme = plain_values(ty, rows * cols), []
        data = np.frombuffer(raw, dtype=np.uint8).reshape(rows, cols // block_size * type_size)
        with np.errstate(all="ignore"):
            deq = np.asarray(gguf.quants.dequantize(data, ty), dtype=np.float32)
        assert deq.shape == (rows, cols), (ty.name, deq.shape)
        with open(os.path.join(HERE, f"{ty.name}.bin"), "wb") as f:
            f.write(raw)
        with open(os.path.join(HERE, f"{ty.name}.f32"), "wb") as f:
            f.write(deq.astype("<f4").tobytes())
        manifest[ty.name] = {"shape": [rows, cols], "blocks": n_blocks, "extreme_blocks": extreme}
        tensors.append((ty, data, deq))

    path = os.path.join(HERE, "all_types.gguf")
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name("lowbit ggml dequantization fixture")
    for ty, data, _ in tensors:
        w.add_tensor(ty.name.lower(), data, raw_dtype=ty)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # The GGUF holds the same tensors: read it back and check gguf-py dequantizes it to TYPE.f32.
    r = gguf.GGUFReader(path)
    by_name = {t.name: t for t in r.tensors}
    for ty, _, deq in tensors:
        t = by_name[ty.name.lower()]
        assert t.tensor_type == ty, (t.name, t.tensor_type)
        with np.errstate(all="ignore"):
            back = np.asarray(gguf.quants.dequantize(t.data, ty), dtype=np.float32).reshape(deq.shape)
        assert back.view(np.uint32).tobytes() == deq.view(np.uint32).tobytes(), ty.name
        assert [int(x) for x in t.shape] == [deq.shape[1], deq.shape[0]], (t.name, t.shape)
    manifest["all_types.gguf"] = {
        "tensors": {ty.name.lower(): ty.name for ty, _, _ in tensors},
        "note": "tensor NAME holds TYPE.bin (GGUF dims [cols, rows]); its dequantization is TYPE.f32",
    }
    with open(os.path.join(HERE, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(HERE, n)) for n in os.listdir(HERE))
    print(f"wrote {len(tensors)} types, {total} bytes in {HERE}")


if __name__ == "__main__":
    main()

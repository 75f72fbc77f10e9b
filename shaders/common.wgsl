// Shared code of the output passes (GEMV and GEMM): weight decoding and the bias + LoRA-expand epilogue.
// Included by gemv.wgsl and gemm.wgsl through lowbit's tiny preprocessor (src/gpu/shader.rs):
// `#include "file"`, `#if NAME` / `#if !NAME`, `#else`, `#endif`. The host prepends `enable f16;` when F16
// is defined.

// The uniform structs `Chunk` (static per chunk: `ck`) and `Call` (per recorded forward: `call`), the
// bindings and the constants (WG, MAXM, RED_LEN, GEMM_*) are not declared here: the host generates their
// declarations from the Rust definitions in src/gpu/layout.rs and prepends them to every kernel.

#if FOURBIT
// 4-bit code of flat element e (bytes hold two codes, first element in the HIGH nibble; a u32 word holds
// bytes 0..3 little-endian, i.e. elements 8w .. 8w+7).
fn code4(word: u32, j: u32) -> u32 {
    let byte = (word >> ((j >> 1u) * 8u)) & 0xffu;
    return select(byte & 0xfu, byte >> 4u, (j & 1u) == 0u);
}

// Block scale (absmax) of global block b.
fn block_scale(b: u32) -> f32 {
#if DQ
    let lb = b - ck.sblk_base;
    let q = (scales[lb >> 2u] >> ((lb & 3u) * 8u)) & 0xffu;
    // (map[q] * nested_absmax) + offset: two f32 operations (a driver may contract them into an FMA; the
    // tests' bound allows for that).
    let p = bitcast<f32>(lconst[16u + q]) * bitcast<f32>(lconst[ck.nested_off + (b >> ck.nested_log2)]);
    return p + ck.dq_offset;
#else
    return bitcast<f32>(scales[b - ck.sblk_base]);
#endif
}

// Dequantized weight at global output row o, column col.
fn weight_at(o: u32, col: u32) -> f32 {
    let e = o * ck.n_in + col;
    let word = codes[(e >> 3u) - ck.word_base];
    return bitcast<f32>(lconst[code4(word, e & 7u)]) * block_scale(e >> ck.log2_bs);
}
#else
// int8 affine: parameter entry of (o, col) for the compiled granularity.
fn param_index(o: u32, col: u32) -> u32 {
#if GRAN_TENSOR
    return 0u;
#else
#if GRAN_CHANNEL
    return o;
#else
    return o * ck.ngroups + col / ck.group_size;
#endif
#endif
}

// ((q - zp) as f32) * scale, exactly the reference's dequantization.
fn dequant8(q: u32, p: u32) -> f32 {
    let lp = p - ck.sblk_base;
    let scale = bitcast<f32>(scales[lp]);
    let zp = (scales[ck.zp_off + (lp >> 2u)] >> ((lp & 3u) * 8u)) & 0xffu;
    return f32(i32(q) - i32(zp)) * scale;
}

fn weight_at(o: u32, col: u32) -> f32 {
    let e = o * ck.n_in + col;
    let q = (codes[(e >> 2u) - ck.word_base] >> ((e & 3u) * 8u)) & 0xffu;
    return dequant8(q, param_index(o, col));
}
#endif

// bias[o] + Σ_{adapters a of row m} s_a · Σ_k t[m, off_a + k] · B_a[o, k], in f32.
fn epilogue(m: u32, o: u32) -> f32 {
    var extra = 0.0;
    if (ck.has_bias != 0u) {
        extra = bitcast<f32>(lconst[ck.bias_off + o]);
    }
    if (call.use_lora != 0u) {
        for (var a = 0u; a < ck.n_adapters; a = a + 1u) {
            let bit = (rowinfo[m * call.mask_stride + (a >> 5u)] >> (a & 31u)) & 1u;
            if (bit == 0u) {
                continue;
            }
            let d = ck.ad_off + a * 4u;
            let off = lconst[d];
            let rank = lconst[d + 1u];
            let s = bitcast<f32>(lconst[d + 2u]);
            let bbase = lconst[d + 3u] + o * rank;
            var e = 0.0;
            for (var k = 0u; k < rank; k = k + 1u) {
                e = e + t[m * ck.r_total + off + k] * lora[bbase + k];
            }
            extra = extra + s * e;
        }
    }
    return extra;
}

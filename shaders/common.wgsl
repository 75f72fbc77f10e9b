// Shared declarations for the output passes (GEMV and GEMM): bindings, parameters, weight decoding and the
// LoRA expand. Included by gemv.wgsl and gemm.wgsl through lowbit's tiny preprocessor (src/gpu/shader.rs):
// `#include "file"`, `#if NAME` / `#if !NAME`, `#else`, `#endif`. The host prepends `enable f16;` when F16
// is defined.

// Static per-chunk parameters (uploaded once with the weight). All indices are u32; the host rejects
// tensors whose element count does not fit.
struct Chunk {
    n_in: u32,        // K: input features
    n_out: u32,       // N: output features of the whole layer (row stride of y)
    row0: u32,        // first output row (feature) covered by this chunk
    rows: u32,        // number of output rows in this chunk
    word_base: u32,   // global u32-word index of codes[0]
    sblk_base: u32,   // global index of the scale entry in scales[0] (4-bit: block; DQ: block, multiple of 4; int8: parameter)
    zp_off: u32,      // int8: word offset of the packed zero points inside `scales`
    log2_bs: u32,     // 4-bit: log2(block size); int8 per-group: group size g
    ngroups: u32,     // int8 per-group: groups per row
    nested_log2: u32, // DQ: log2(nested block size)
    nested_off: u32,  // DQ: word offset of nested_absmax inside `lconst` (the map is lconst[16..272))
    dq_offset: f32,   // DQ: the offset added back after scaling
    bias_off: u32,    // word offset of the bias inside `lconst`
    has_bias: u32,    // 1 when the layer has a bias
    ad_off: u32,      // word offset of the adapter descriptors inside `lconst` (4 words each)
    n_adapters: u32,  // number of attached adapters
    r_total: u32,     // sum of adapter ranks (row stride of t)
    _p0: u32,
    _p1: u32,
    _p2: u32,
};

// Per-call parameters.
struct Call {
    m: u32,          // rows of x
    mask_words: u32, // u32 words of adapter mask per row in `rowinfo`
    use_lora: u32,   // 1 when at least one row has an adapter
    _p: u32,
};

@group(0) @binding(0) var<storage, read> codes: array<u32>;
@group(0) @binding(1) var<storage, read> scales: array<u32>;
@group(0) @binding(2) var<storage, read> lconst: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> t: array<f32>;
@group(0) @binding(6) var<storage, read> lora: array<f32>;
@group(0) @binding(7) var<storage, read> rowinfo: array<u32>;
@group(0) @binding(8) var<uniform> ck: Chunk;
@group(0) @binding(9) var<uniform> call: Call;

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
    return o * ck.ngroups + col / ck.log2_bs;
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
            let bit = (rowinfo[m * call.mask_words + (a >> 5u)] >> (a & 31u)) & 1u;
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

// GEMV for decode (small M): one workgroup of WG threads per output feature o and batch of up to MAXM rows
// of x. Threads stride over the u32 words of W's flattened row (4-bit: 8 codes per word, one block scale per
// word since blocks are multiples of 32 elements; int8: 4 codes per word), decode each weight once and use
// it for every row of the batch. Partial sums are reduced across the workgroup (subgroupAdd when SUBGROUPS,
// else a tree in workgroup memory); the first MAXM threads add bias and LoRA expand and write y.
// Rows that start mid-word (odd `in`, blocks crossing rows) are handled: the loop runs over the global
// element range [o*in, (o+1)*in).
#include "common.wgsl"

var<workgroup> red: array<f32, RED_LEN>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
#if SUBGROUPS
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) n_sg: u32,
#endif
) {
    let row = wg.x + wg.y * 65535u;
    if (row >= ck.rows) {
        return;
    }
    let o = ck.row0 + row;
    let mb = wg.z * MAXM;
    let mcount = min(MAXM, call.m - mb);
    let e_start = o * ck.n_in;
    let e_end = e_start + ck.n_in;
    var acc: array<f32, MAXM>;
    for (var i = 0u; i < MAXM; i = i + 1u) {
        acc[i] = 0.0;
    }
#if FOURBIT
    let w_first = e_start >> 3u;
    let w_last = (e_end + 7u) >> 3u;
    for (var w = w_first + lid.x; w < w_last; w = w + WG) {
        let word = codes[w - ck.word_base];
        let e0 = w << 3u;
        let sc = block_scale(e0 >> ck.log2_bs);
        for (var j = 0u; j < 8u; j = j + 1u) {
            let e = e0 + j;
            if (e < e_start || e >= e_end) {
                continue;
            }
            let wv = bitcast<f32>(lconst[code4(word, j)]) * sc;
            let col = e - e_start;
            for (var i = 0u; i < mcount; i = i + 1u) {
                acc[i] = acc[i] + x[(mb + i) * ck.n_in + col] * wv;
            }
        }
    }
#else
    let w_first = e_start >> 2u;
    let w_last = (e_end + 3u) >> 2u;
    for (var w = w_first + lid.x; w < w_last; w = w + WG) {
        let word = codes[w - ck.word_base];
        let e0 = w << 2u;
        for (var j = 0u; j < 4u; j = j + 1u) {
            let e = e0 + j;
            if (e < e_start || e >= e_end) {
                continue;
            }
            let col = e - e_start;
            let wv = dequant8((word >> (j * 8u)) & 0xffu, param_index(o, col));
            for (var i = 0u; i < mcount; i = i + 1u) {
                acc[i] = acc[i] + x[(mb + i) * ck.n_in + col] * wv;
            }
        }
    }
#endif
#if SUBGROUPS
    for (var i = 0u; i < MAXM; i = i + 1u) {
        let s = subgroupAdd(acc[i]);
        if (sg_lane == 0u) {
            red[sg_id * MAXM + i] = s;
        }
    }
    workgroupBarrier();
    if (lid.x < mcount) {
        var sum = 0.0;
        for (var g = 0u; g < n_sg; g = g + 1u) {
            sum = sum + red[g * MAXM + lid.x];
        }
        let m = mb + lid.x;
        y[m * ck.n_out + o] = sum + epilogue(m, o);
    }
#else
    for (var i = 0u; i < MAXM; i = i + 1u) {
        red[i * WG + lid.x] = acc[i];
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid.x < s) {
            for (var i = 0u; i < MAXM; i = i + 1u) {
                red[i * WG + lid.x] = red[i * WG + lid.x] + red[i * WG + lid.x + s];
            }
        }
        workgroupBarrier();
    }
    if (lid.x < mcount) {
        let m = mb + lid.x;
        y[m * ck.n_out + o] = red[lid.x * WG] + epilogue(m, o);
    }
#endif
}

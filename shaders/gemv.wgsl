// GEMV for decode (small M): one workgroup of WG threads per output feature o and batch of up to MAXM rows
// of x. Threads stride over the u32 words of W's flattened row (4-bit: 8 codes per word, one block scale per
// word since blocks are multiples of 32 elements; int8: 4 codes per word), decode each weight once and use
// it for every row of the batch (one row, the decode case, in a scalar accumulator, more in two vec4s: a
// run-time-indexed array would live in local memory, half the speed on an H200). Partial sums of
// the batch's rows are reduced across the workgroup (subgroupAdd when SUBGROUPS, else a tree in workgroup
// memory); the first MAXM threads add bias and LoRA expand and write y.
// Rows that start mid-word (odd `in`, blocks crossing rows) are handled: the loop runs over the global
// element range [o*in, (o+1)*in).
#include "common.wgsl"

var<workgroup> red: array<f32, RED_LEN>;

// Offsets of the batch's MAXM (= 8) rows of x in two vec4s; rows past `mcount` repeat the last row.
fn x_rows(mb: u32, mcount: u32) -> array<vec4<u32>, 2> {
    let last = mcount - 1u;
    let r = vec4<u32>(0u, 1u, 2u, 3u);
    return array<vec4<u32>, 2>(
        (mb + min(r, vec4<u32>(last))) * ck.n_in,
        (mb + min(r + 4u, vec4<u32>(last))) * ck.n_in,
    );
}

// x[row offsets + col] of four rows.
fn x4(rows: vec4<u32>, col: u32) -> vec4<f32> {
    return vec4<f32>(x[rows.x + col], x[rows.y + col], x[rows.z + col], x[rows.w + col]);
}

// The eight row sums as the reduction's array.
fn spill(a0: vec4<f32>, a1: vec4<f32>) -> array<f32, MAXM> {
    return array<f32, MAXM>(a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w);
}

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
    // Filled below (acc[0] for one row, all MAXM for more); the reduction reads the batch's mcount rows only.
    var acc: array<f32, MAXM>;
#if FOURBIT
    let w_first = e_start >> 3u;
    let w_last = (e_end + 7u) >> 3u;
    if (mcount == 1u) {
        // One row of x (decode): a scalar accumulator, which a compiler keeps in a register (the array below
        // is indexed by a run-time bound and may live in local memory). Same products, same order.
        var s = 0.0;
        let xb = mb * ck.n_in;
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
                s = s + x[xb + e - e_start] * wv;
            }
        }
        acc[0] = s;
    } else {
        // 2..MAXM rows: the rows' sums in two vec4 registers (rows past mcount read row mcount - 1 and are
        // never stored).
        let xr = x_rows(mb, mcount);
        var a0 = vec4<f32>(0.0);
        var a1 = vec4<f32>(0.0);
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
                a0 = a0 + x4(xr[0], col) * wv;
                a1 = a1 + x4(xr[1], col) * wv;
            }
        }
        acc = spill(a0, a1);
    }
#else
    let w_first = e_start >> 2u;
    let w_last = (e_end + 3u) >> 2u;
    if (mcount == 1u) {
        // One row of x: a scalar accumulator, as for 4-bit weights.
        var s = 0.0;
        let xb = mb * ck.n_in;
        for (var w = w_first + lid.x; w < w_last; w = w + WG) {
            let word = codes[w - ck.word_base];
            let e0 = w << 2u;
            for (var j = 0u; j < 4u; j = j + 1u) {
                let e = e0 + j;
                if (e < e_start || e >= e_end) {
                    continue;
                }
                let col = e - e_start;
                s = s + x[xb + col] * dequant8((word >> (j * 8u)) & 0xffu, param_index(o, col));
            }
        }
        acc[0] = s;
    } else {
        let xr = x_rows(mb, mcount);
        var a0 = vec4<f32>(0.0);
        var a1 = vec4<f32>(0.0);
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
                a0 = a0 + x4(xr[0], col) * wv;
                a1 = a1 + x4(xr[1], col) * wv;
            }
        }
        acc = spill(a0, a1);
    }
#endif
    // Only the batch's mcount rows are reduced (mcount is uniform across the workgroup).
#if SUBGROUPS
    for (var i = 0u; i < mcount; i = i + 1u) {
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
    for (var i = 0u; i < mcount; i = i + 1u) {
        red[i * WG + lid.x] = acc[i];
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid.x < s) {
            for (var i = 0u; i < mcount; i = i + 1u) {
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

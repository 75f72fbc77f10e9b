// Greedy decoding: out[r] = the index of the largest logits[r, :] (the lowest index among equal maxima).
// One workgroup of WG threads per row (row = wg.x + wg.y * 65535): each thread scans the columns lid,
// lid + WG, ... in increasing order keeping the first strict maximum, then a tree reduction over
// (value, index) pairs that prefers the larger value and, on equal values, the lower index. NaN logits give
// an unspecified index (a comparison with NaN is false, so a NaN never replaces a number it follows).

const WG: u32 = 256u;
const NONE: u32 = 0xffffffffu;

struct Params {
    m: u32,
    vocab: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

var<workgroup> rv: array<f32, WG>;
var<workgroup> ri: array<u32, WG>;

// Whether (v2, i2) beats (v1, i1).
fn better(v1: f32, i1: u32, v2: f32, i2: u32) -> bool {
    if (i2 == NONE) {
        return false;
    }
    if (i1 == NONE) {
        return true;
    }
    return v2 > v1 || (v2 == v1 && i2 < i1);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let row = wg.x + wg.y * 65535u;
    if (row >= p.m) {
        return;
    }
    let base = row * p.vocab;
    var bv = 0.0;
    var bi = NONE;
    for (var c = lid; c < p.vocab; c = c + WG) {
        let v = logits[base + c];
        if (bi == NONE || v > bv) {
            bv = v;
            bi = c;
        }
    }
    rv[lid] = bv;
    ri[lid] = bi;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off >> 1u) {
        if (lid < off) {
            if (better(rv[lid], ri[lid], rv[lid + off], ri[lid + off])) {
                rv[lid] = rv[lid + off];
                ri[lid] = ri[lid + off];
            }
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        out[row] = select(ri[0], 0u, ri[0] == NONE);
    }
}

// The gradient of RMSNorm (y = w * (x * r), r = inverseSqrt(mean(x^2) + eps)) ADDED into dx:
//   dx[row, c] += r * (w[c] * dy[row, c] - x[row, c] * r^2 * S / n),   S = sum_c w[c] * dy[row, c] * x[row, c].
// One workgroup of WG threads per row (row = wg.x + wg.y * 65535): r is recomputed exactly as rms_norm.wgsl
// computes it (strided f32 sums of squares, the same tree), then S by the same scheme.

const WG: u32 = 256u;

struct Params {
    m: u32,
    n: u32,
    eps: f32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

var<workgroup> red: array<f32, WG>;

fn reduce_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off >> 1u) {
        if (lid < off) {
            red[lid] = red[lid] + red[lid + off];
        }
        workgroupBarrier();
    }
    let s = red[0];
    workgroupBarrier(); // everyone has read red[0] before it is reused
    return s;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let row = wg.x + wg.y * 65535u;
    // Uniform across the workgroup, so the barriers stay in uniform control flow.
    if (row >= p.m) {
        return;
    }
    let base = row * p.n;
    var sq = 0.0;
    var s = 0.0;
    for (var c = lid; c < p.n; c = c + WG) {
        let v = x[base + c];
        sq = sq + v * v;
        s = s + w[c] * dy[base + c] * v;
    }
    let r = inverseSqrt(reduce_sum(lid, sq) / f32(p.n) + p.eps);
    let k = r * r * reduce_sum(lid, s) / f32(p.n);
    for (var c = lid; c < p.n; c = c + WG) {
        dx[base + c] = dx[base + c] + r * (w[c] * dy[base + c] - x[base + c] * k);
    }
}

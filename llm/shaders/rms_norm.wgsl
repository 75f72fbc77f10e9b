// RMSNorm, Hugging Face order: y[r, c] = (x[r, c] * inverseSqrt(mean_c(x[r, :]^2) + eps)) * w[c].
// One workgroup of WG threads per row (row = wg.x + wg.y * 65535): each thread sums the squares of the
// columns lid, lid + WG, ... in f32, then a tree reduction in workgroup memory; every thread then writes its
// strided columns.

const WG: u32 = 256u;

struct Params {
    m: u32,
    n: u32,
    eps: f32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let row = wg.x + wg.y * 65535u;
    // Uniform across the workgroup (depends on the workgroup id only), so the barriers below stay uniform.
    if (row >= p.m) {
        return;
    }
    let base = row * p.n;
    var s = 0.0;
    for (var c = lid; c < p.n; c = c + WG) {
        let v = x[base + c];
        s = s + v * v;
    }
    red[lid] = s;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off >> 1u) {
        if (lid < off) {
            red[lid] = red[lid] + red[lid + off];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(red[0] / f32(p.n) + p.eps);
    for (var c = lid; c < p.n; c = c + WG) {
        y[base + c] = (x[base + c] * inv) * w[c];
    }
}

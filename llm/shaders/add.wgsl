// Residual add in place: x[i] += y[i]. One thread per element.

const WG: u32 = 256u;

struct Params {
    n: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = (wg.x + wg.y * 65535u) * WG + lid.x;
    if (t >= p.n) {
        return;
    }
    x[t] = x[t] + y[t];
}

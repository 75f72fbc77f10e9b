// SwiGLU's elementwise part: out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)).
// exp is only ever evaluated at a non-positive argument, so it cannot overflow: for g >= 0 the sigmoid is
// 1 / (1 + exp(-g)); for g < 0 it is e / (1 + e) with e = exp(g) (which underflows to 0 for very negative g,
// giving 0 * up, never inf / inf = NaN). One thread per element.

const WG: u32 = 256u;

struct Params {
    n: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = (wg.x + wg.y * 65535u) * WG + lid.x;
    if (t >= p.n) {
        return;
    }
    let g = gate[t];
    let e = exp(-abs(g));
    let sig = select(e / (1.0 + e), 1.0 / (1.0 + e), g >= 0.0);
    out[t] = (g * sig) * up[t];
}

// The gradient of act = silu(gate) * up (silu(g) = g / (1 + exp(-g))), overwriting dgate and dup:
//   s = sigmoid(g),   dup = dact * (g * s),   dgate = dact * up * (s * (1 + g * (1 - s))),
// with the sigmoid evaluated as silu_mul.wgsl does (exp of -|g| only, never overflowing), so every finite gate
// gives finite results. One thread per element
// (i = (wg.x + wg.y * 65535) * WG + lid).

const WG: u32 = 256u;

struct Params {
    n: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read> dact: array<f32>;
@group(0) @binding(4) var<storage, read_write> dgate: array<f32>;
@group(0) @binding(5) var<storage, read_write> dup: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * 65535u) * WG + lid.x;
    if (i >= p.n) {
        return;
    }
    let g = gate[i];
    let e = exp(-abs(g));
    let s = select(e / (1.0 + e), 1.0 / (1.0 + e), g >= 0.0);
    let da = dact[i];
    dup[i] = da * (g * s);
    dgate[i] = da * up[i] * (s * (1.0 + g * (1.0 - s)));
}

// Appends m rows of k and v ([m, n_kv, head_dim]) to the caches ([n_kv, max_seq, head_dim]) at positions
// pos0 .. pos0 + m: cache[kvh, pos0 + r, d] = src[r, kvh, d]. One thread per element (a plain copy).

const WG: u32 = 256u;

struct Params {
    m: u32,
    n_kv: u32,
    head_dim: u32,
    pos0: u32,
    max_seq: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = (wg.x + wg.y * 65535u) * WG + lid.x;
    let row = p.n_kv * p.head_dim;
    if (t >= p.m * row) {
        return;
    }
    let r = t / row;
    let u = t - r * row;
    let kvh = u / p.head_dim;
    let d = u - kvh * p.head_dim;
    let dst = (kvh * p.max_seq + p.pos0 + r) * p.head_dim + d;
    k_cache[dst] = k[t];
    v_cache[dst] = v[t];
}

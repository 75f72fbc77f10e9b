// Rotary position embedding, Hugging Face rotate_half convention, in place on q [m, n_heads, head_dim] and
// k [m, n_kv, head_dim] at positions pos0 + r. For i < half = head_dim / 2, (a, b) = (v[i], v[i + half]):
//   v[i] = a * cos - b * sin,   v[i + half] = b * cos + a * sin,
// with cos / sin read from the host's tables [max_pos, half] at row pos0 + r.
// One thread per rotated pair: thread t -> row r, head (q heads first, then k heads), pair index i.

const WG: u32 = 256u;

struct Params {
    m: u32,
    n_heads: u32,
    n_kv: u32,
    half: u32,
    pos0: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> k: array<f32>;
@group(0) @binding(3) var<storage, read> cos_t: array<f32>;
@group(0) @binding(4) var<storage, read> sin_t: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = (wg.x + wg.y * 65535u) * WG + lid.x;
    let per_row = (p.n_heads + p.n_kv) * p.half;
    if (t >= p.m * per_row) {
        return;
    }
    let r = t / per_row;
    let u = t - r * per_row;
    let head = u / p.half;
    let i = u - head * p.half;
    let ti = (p.pos0 + r) * p.half + i;
    let c = cos_t[ti];
    let s = sin_t[ti];
    let hd = 2u * p.half;
    if (head < p.n_heads) {
        let base = (r * p.n_heads + head) * hd + i;
        let a = q[base];
        let b = q[base + p.half];
        q[base] = a * c - b * s;
        q[base + p.half] = b * c + a * s;
    } else {
        let base = (r * p.n_kv + (head - p.n_heads)) * hd + i;
        let a = k[base];
        let b = k[base + p.half];
        k[base] = a * c - b * s;
        k[base + p.half] = b * c + a * s;
    }
}

// Embedding lookup: out[r, c] = table[ids[r], c] for r < m, c < hidden; an id >= vocab writes zeros (the host
// validates ids before uploading them, so this only keeps a bad id from reading out of bounds).
// One thread per output element; workgroup index = wg.x + wg.y * 65535 (a 2-D grid past 65535 groups).

const WG: u32 = 256u;

struct Params {
    m: u32,
    vocab: u32,
    hidden: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = (wg.x + wg.y * 65535u) * WG + lid.x;
    if (t >= p.m * p.hidden) {
        return;
    }
    let r = t / p.hidden;
    let c = t - r * p.hidden;
    let id = ids[r];
    var v = 0.0;
    if (id < p.vocab) {
        v = table[id * p.hidden + c];
    }
    out[t] = v;
}

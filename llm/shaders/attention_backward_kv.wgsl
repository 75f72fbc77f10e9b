// Attention backward, part 2 of 2 (after attention_backward_q.wgsl, whose probs and ds it reads): one thread
// per element (j, g, d) of dk and dv [t, n_kv, hd] (e = j * n_kv * hd + g * hd + d =
// (wg.x + wg.y * 65535) * WG + lid), summed over the query heads h of kv head g in ascending order, then the
// query rows i = j .. t-1 in ascending order (the CPU's order):
//   dk[j, g, d] = scale * sum_h sum_i ds[h, i, j] * q[i, h, d],   dv[j, g, d] = sum_h sum_i probs[h, i, j] * dout[i, h, d].

const WG: u32 = 256u;

struct Params {
    t: u32,
    n_heads: u32,
    n_kv: u32,
    head_dim: u32,
    scale: f32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> dout: array<f32>;
@group(0) @binding(3) var<storage, read> probs: array<f32>;
@group(0) @binding(4) var<storage, read> ds: array<f32>;
@group(0) @binding(5) var<storage, read_write> dk: array<f32>;
@group(0) @binding(6) var<storage, read_write> dv: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = (wg.x + wg.y * 65535u) * WG + lid.x;
    let hd = p.head_dim;
    let kvw = p.n_kv * hd;
    if (e >= p.t * kvw) {
        return;
    }
    let j = e / kvw;
    let rem = e - j * kvw;
    let g = rem / hd;
    let d = rem - g * hd;
    let group = p.n_heads / p.n_kv;
    let qw = p.n_heads * hd;
    var ak = 0.0;
    var av = 0.0;
    for (var h = g * group; h < (g + 1u) * group; h = h + 1u) {
        for (var i = j; i < p.t; i = i + 1u) {
            let at = (h * p.t + i) * p.t + j;
            let x = i * qw + h * hd + d;
            ak = ak + ds[at] * q[x];
            av = av + probs[at] * dout[x];
        }
    }
    dk[e] = ak * p.scale;
    dv[e] = av;
}

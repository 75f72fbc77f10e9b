// Attention backward, part 1 of 2 (part 2: attention_backward_kv.wgsl), for one whole causal sequence of t
// rows at positions 0 .. t-1, q [t, n_heads, hd], k and v [t, n_kv, hd] (after RoPE), dout [t, n_heads, hd]
// (the gradient of the attention output). One thread per (head h, query row i) (item = h * t + i =
// (wg.x + wg.y * 65535) * WG + lid), kv head g = h / (n_heads / n_kv), keys j = 0 ..= i:
//   s_j = (q_i . k_j) * scale,  P_j = softmax(s)_j (max subtracted)       -> probs[h, i, j]
//   dP_j = dout_i . v_j,  D = sum_j P_j dP_j,  dS_j = P_j (dP_j - D)      -> ds[h, i, j]
//   dq[i, h, :] = scale * sum_j dS_j k_j
// Entries j > i of probs and ds are not written (part 2 reads j <= i only). Every sum is f32, sequential in
// ascending index, so results are deterministic.

const WG: u32 = 64u;

struct Params {
    t: u32,
    n_heads: u32,
    n_kv: u32,
    head_dim: u32,
    scale: f32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> dout: array<f32>;
@group(0) @binding(5) var<storage, read_write> probs: array<f32>;
@group(0) @binding(6) var<storage, read_write> ds: array<f32>;
@group(0) @binding(7) var<storage, read_write> dq: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let item = (wg.x + wg.y * 65535u) * WG + lid.x;
    if (item >= p.n_heads * p.t) {
        return;
    }
    let h = item / p.t;
    let i = item - h * p.t;
    let g = h / (p.n_heads / p.n_kv);
    let hd = p.head_dim;
    let qw = p.n_heads * hd;
    let kvw = p.n_kv * hd;
    let qb = i * qw + h * hd;
    let row = item * p.t; // probs / ds row [h, i, :]
    var mx = 0.0;
    for (var j = 0u; j <= i; j = j + 1u) {
        let kb = j * kvw + g * hd;
        var dot = 0.0;
        for (var d = 0u; d < hd; d = d + 1u) {
            dot = dot + q[qb + d] * k[kb + d];
        }
        let s = dot * p.scale;
        probs[row + j] = s;
        mx = select(max(mx, s), s, j == 0u);
    }
    var sum = 0.0;
    for (var j = 0u; j <= i; j = j + 1u) {
        let e = exp(probs[row + j] - mx);
        probs[row + j] = e;
        sum = sum + e;
    }
    var dsum = 0.0;
    for (var j = 0u; j <= i; j = j + 1u) {
        let pj = probs[row + j] / sum;
        probs[row + j] = pj;
        let vb = j * kvw + g * hd;
        var dp = 0.0;
        for (var d = 0u; d < hd; d = d + 1u) {
            dp = dp + dout[qb + d] * v[vb + d];
        }
        ds[row + j] = dp;
        dsum = dsum + pj * dp;
    }
    for (var j = 0u; j <= i; j = j + 1u) {
        ds[row + j] = probs[row + j] * (ds[row + j] - dsum);
    }
    for (var d = 0u; d < hd; d = d + 1u) {
        var acc = 0.0;
        for (var j = 0u; j <= i; j = j + 1u) {
            acc = acc + ds[row + j] * k[j * kvw + g * hd + d];
        }
        dq[qb + d] = acc * p.scale;
    }
}

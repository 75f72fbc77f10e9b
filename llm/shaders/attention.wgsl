// Causal grouped-query attention over the KV cache, one workgroup of WG threads per (row r, head h)
// (item = r * n_heads + h = wg.x + wg.y * 65535). Row r sits at position pos = pos0 + r and attends to the
// cached positions j = 0 ..= pos of kv head h / (n_heads / n_kv):
//   s_j = (q[r, h, :] . k_cache[kvh, j, :]) * scale,   out[r, h, :] = sum_j softmax(s)_j * v_cache[kvh, j, :].
// Keys are processed in tiles of WG with an online softmax (no scores array, so any length up to max_seq):
//   1. thread t computes the score of key t0 + t (a dot product over head_dim; q is staged in workgroup
//      memory);
//   2. a tree reduction gives the tile's maximum; the running maximum becomes M' = max(M, tile max) and the
//      running sum and accumulators are rescaled by exp(M - M') (0 on the first tile);
//   3. p_j = exp(s_j - M') goes to workgroup memory, a tree reduction adds them to the running sum;
//   4. thread t owns output dims t, t + WG, ... (head_dim <= MAX_HD) and adds sum_j p_j * v[j, d] over the
//      tile (consecutive threads read consecutive dims of a cached row).
// exp is only evaluated at non-positive arguments of valid scores, never at a sentinel.

const WG: u32 = 64u;
const MAX_HD: u32 = 256u;
const PER: u32 = 4u; // MAX_HD / WG

struct Params {
    m: u32,
    n_heads: u32,
    n_kv: u32,
    head_dim: u32,
    pos0: u32,
    max_seq: u32,
    scale: f32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k_cache: array<f32>;
@group(0) @binding(3) var<storage, read> v_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> qs: array<f32, MAX_HD>;
var<workgroup> ps: array<f32, WG>;
var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let item = wg.x + wg.y * 65535u;
    // Everything that decides control flow below depends only on the workgroup id and the uniform, so the
    // barriers are in uniform control flow.
    if (item >= p.m * p.n_heads) {
        return;
    }
    let r = item / p.n_heads;
    let h = item - r * p.n_heads;
    let kvh = h / (p.n_heads / p.n_kv);
    let hd = p.head_dim;
    let qbase = item * hd;
    for (var d = lid; d < hd; d = d + WG) {
        qs[d] = q[qbase + d];
    }
    workgroupBarrier();
    let n_keys = p.pos0 + r + 1u;
    let cbase = kvh * p.max_seq * hd;
    var run_max = 0.0;
    var run_sum = 0.0;
    var acc: array<f32, PER>;
    for (var c = 0u; c < PER; c = c + 1u) {
        acc[c] = 0.0;
    }
    for (var t0 = 0u; t0 < n_keys; t0 = t0 + WG) {
        let j = t0 + lid;
        let valid = j < n_keys;
        var s = 0.0;
        if (valid) {
            let kb = cbase + j * hd;
            var dot = 0.0;
            for (var d = 0u; d < hd; d = d + 1u) {
                dot = dot + qs[d] * k_cache[kb + d];
            }
            s = dot * p.scale;
        }
        // Key t0 (thread 0) is always valid, so the tile maximum is over real scores only.
        red[lid] = select(bitcast<f32>(0xff7fffffu), s, valid);
        workgroupBarrier();
        for (var off = WG / 2u; off > 0u; off = off >> 1u) {
            if (lid < off) {
                red[lid] = max(red[lid], red[lid + off]);
            }
            workgroupBarrier();
        }
        let tile_max = red[0];
        let new_max = select(max(run_max, tile_max), tile_max, t0 == 0u);
        let corr = select(exp(run_max - new_max), 0.0, t0 == 0u);
        var pj = 0.0;
        if (valid) {
            pj = exp(s - new_max);
        }
        workgroupBarrier(); // everyone has read red[0]
        ps[lid] = pj;
        red[lid] = pj;
        workgroupBarrier();
        for (var off = WG / 2u; off > 0u; off = off >> 1u) {
            if (lid < off) {
                red[lid] = red[lid] + red[lid + off];
            }
            workgroupBarrier();
        }
        run_sum = run_sum * corr + red[0];
        let cnt = min(WG, n_keys - t0);
        for (var c = 0u; c < PER; c = c + 1u) {
            let d = lid + c * WG;
            if (d < hd) {
                var a = acc[c] * corr;
                for (var jj = 0u; jj < cnt; jj = jj + 1u) {
                    a = a + ps[jj] * v_cache[cbase + (t0 + jj) * hd + d];
                }
                acc[c] = a;
            }
        }
        run_max = new_max;
        workgroupBarrier(); // the next tile overwrites ps and red
    }
    for (var c = 0u; c < PER; c = c + 1u) {
        let d = lid + c * WG;
        if (d < hd) {
            out[qbase + d] = acc[c] / run_sum;
        }
    }
}

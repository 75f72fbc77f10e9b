// Next-token cross-entropy and its gradient, in place: for row r < n of logits [n, vocab] with target t_r,
//   lse = max + log(sum_j exp(l_j - max)),   loss[r] = lse - l[t_r],
//   l_j becomes scale * (exp(l_j - max) / sum)   (j != t_r),   l[t_r] becomes scale * (exp(l[t_r] - lse) - 1).
// One workgroup of WG threads per row (row = wg.x + wg.y * 65535): strided f32 scans, tree reductions in
// workgroup memory for the maximum and the sum. Each element is read and then overwritten by the same thread.

const WG: u32 = 256u;

struct Params {
    n: u32,
    vocab: u32,
    scale: f32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let row = wg.x + wg.y * 65535u;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if (row >= p.n) {
        return;
    }
    let base = row * p.vocab;
    var mx = bitcast<f32>(0xff800000u); // -inf
    for (var j = lid; j < p.vocab; j = j + WG) {
        mx = max(mx, logits[base + j]);
    }
    red[lid] = mx;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off >> 1u) {
        if (lid < off) {
            red[lid] = max(red[lid], red[lid + off]);
        }
        workgroupBarrier();
    }
    let row_max = red[0];
    workgroupBarrier(); // everyone has read red[0]
    var s = 0.0;
    for (var j = lid; j < p.vocab; j = j + WG) {
        s = s + exp(logits[base + j] - row_max);
    }
    red[lid] = s;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off >> 1u) {
        if (lid < off) {
            red[lid] = red[lid] + red[lid + off];
        }
        workgroupBarrier();
    }
    let sum = red[0];
    let lse = row_max + log(sum);
    let t = targets[row];
    let lt = logits[base + t];
    // All threads have read logits[base + t] before thread t % WG overwrites it.
    storageBarrier();
    workgroupBarrier();
    for (var j = lid; j < p.vocab; j = j + WG) {
        if (j == t) {
            logits[base + j] = p.scale * (exp(lt - lse) - 1.0);
        } else {
            logits[base + j] = p.scale * (exp(logits[base + j] - row_max) / sum);
        }
    }
    if (lid == 0u) {
        loss[row] = lse - lt;
    }
}

// LoRA shrink: t[m, j] = x[m] · A_all[j] when the adapter owning rank-row j applies to row m, else 0.
// One workgroup of WG threads per (j, m): strided partial sums, then a tree reduction in workgroup memory.
// f32 accumulation.

struct Chunk {
    n_in: u32, n_out: u32, row0: u32, rows: u32, word_base: u32, sblk_base: u32, zp_off: u32, log2_bs: u32,
    ngroups: u32, nested_log2: u32, nested_off: u32, dq_offset: f32, bias_off: u32, has_bias: u32, ad_off: u32,
    n_adapters: u32, r_total: u32, _p0: u32, _p1: u32, _p2: u32,
};
struct Call { m: u32, mask_words: u32, use_lora: u32, _p: u32, };

@group(0) @binding(2) var<storage, read> lconst: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(5) var<storage, read_write> t: array<f32>;
@group(0) @binding(6) var<storage, read> lora: array<f32>;
@group(0) @binding(7) var<storage, read> rowinfo: array<u32>;
@group(0) @binding(8) var<uniform> ck: Chunk;
@group(0) @binding(9) var<uniform> call: Call;

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = wg.x;
    let m = wg.y + wg.z * 65535u;
    if (j >= ck.r_total || m >= call.m) {
        return;
    }
    // Which adapter owns rank-row j?
    var use_row = false;
    for (var a = 0u; a < ck.n_adapters; a = a + 1u) {
        let d = ck.ad_off + a * 4u;
        let off = lconst[d];
        if (j >= off && j < off + lconst[d + 1u]) {
            use_row = ((rowinfo[m * call.mask_words + (a >> 5u)] >> (a & 31u)) & 1u) != 0u;
        }
    }
    var acc = 0.0;
    if (use_row) {
        let xb = m * ck.n_in;
        let ab = j * ck.n_in;
        for (var k = lid.x; k < ck.n_in; k = k + WG) {
            acc = acc + x[xb + k] * lora[ab + k];
        }
    }
    red[lid.x] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid.x < s) {
            red[lid.x] = red[lid.x] + red[lid.x + s];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        t[m * ck.r_total + j] = red[0];
    }
}

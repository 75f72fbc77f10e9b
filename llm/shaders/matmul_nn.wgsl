// Dense c[m, n] = a[m, k] * b[k, n] (row-major, overwriting c): the input gradient of a dense layer or of the
// tied lm_head, dx[rows, n_in] = dy[rows, n_out] * W[n_out, n_in].
// Tiles of TS x TS outputs per workgroup of WG = TS * TS threads (tile = wg.x + wg.y * 65535, tiles ordered
// row-major over ceil(m / TS) x ceil(n / TS)); k in steps of TS through workgroup memory. Each output is
// accumulated by one thread in f32 in ascending k, so results are deterministic.

const WG: u32 = 256u;
const TS: u32 = 16u;

struct Params {
    m: u32,
    k: u32,
    n: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

var<workgroup> ta: array<f32, WG>;
var<workgroup> tb: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let tile = wg.x + wg.y * 65535u;
    let tiles_n = (p.n + TS - 1u) / TS;
    // Uniform across the workgroup.
    if (tile >= ((p.m + TS - 1u) / TS) * tiles_n) {
        return;
    }
    let tr = tile / tiles_n;
    let tc = tile - tr * tiles_n;
    let ly = lid / TS;
    let lx = lid - ly * TS;
    let row = tr * TS + ly;
    let col = tc * TS + lx;
    var acc = 0.0;
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TS) {
        // ta[ly][lx] = a[row, k0 + lx]; tb[ly][lx] = b[k0 + ly, col] (zero outside).
        var va = 0.0;
        if (row < p.m && k0 + lx < p.k) {
            va = a[row * p.k + k0 + lx];
        }
        var vb = 0.0;
        if (k0 + ly < p.k && col < p.n) {
            vb = b[(k0 + ly) * p.n + col];
        }
        ta[lid] = va;
        tb[lid] = vb;
        workgroupBarrier();
        let kk = min(TS, p.k - k0);
        for (var i = 0u; i < kk; i = i + 1u) {
            acc = acc + ta[ly * TS + i] * tb[i * TS + lx];
        }
        workgroupBarrier();
    }
    if (row < p.m && col < p.n) {
        c[row * p.n + col] = acc;
    }
}

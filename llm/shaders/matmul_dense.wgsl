// Dense f32 linear layer: y[r, o] = sum_i x[r, i] * w[o, i] (+ bias[o]) for r < m, o < n_out; w is [n_out, n_in]
// row-major (the Hugging Face / lowbit layout), x is [m, n_in], y is [m, n_out].
// One thread per output element (t = r * n_out + o; workgroup index = wg.x + wg.y * 65535): a sequential f32
// sum over i, the same order as a plain CPU dot product. `bias` is always bound (one dummy word without one).

const WG: u32 = 256u;

struct Params {
    m: u32,
    n_out: u32,
    n_in: u32,
    has_bias: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = (wg.x + wg.y * 65535u) * WG + lid.x;
    if (t >= p.m * p.n_out) {
        return;
    }
    let r = t / p.n_out;
    let o = t - r * p.n_out;
    let xb = r * p.n_in;
    let wb = o * p.n_in;
    var s = 0.0;
    for (var i = 0u; i < p.n_in; i = i + 1u) {
        s = s + x[xb + i] * w[wb + i];
    }
    if (p.has_bias != 0u) {
        s = s + bias[o];
    }
    y[t] = s;
}

// Tiled GEMM for prefill: a workgroup of 16x16 threads computes a 64 (rows of x) x 64 (output features) tile
// of y, each thread a 4x4 block. Per step of BK inputs the workgroup decodes a 64xBK tile of W (bit-identical
// to the reference dequantization) and loads a 64xBK tile of x into workgroup memory, then every thread
// accumulates its 16 outputs in f32. With F16 the tiles are stored in f16 and the products are formed in f16
// (accumulation stays f32). Bias and the LoRA expand are added in the same output pass.
#include "common.wgsl"

#if F16
alias elem = f16;
#else
alias elem = f32;
#endif

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;

var<workgroup> xs: array<elem, 1024>; // [BK][BM]
var<workgroup> ws: array<elem, 1024>; // [BK][BN]

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let n0 = wg.x * BN;
    let m0 = wg.y * BM;
    let li = lid.y * 16u + lid.x;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i = i + 1u) {
        acc[i] = 0.0;
    }
    for (var k0 = 0u; k0 < ck.n_in; k0 = k0 + BK) {
        for (var r = 0u; r < 4u; r = r + 1u) {
            let idx = li + r * 256u;
            let l = idx / BK;
            let kk = idx % BK;
            let col = k0 + kk;
            var wv = 0.0;
            if (n0 + l < ck.rows && col < ck.n_in) {
                wv = weight_at(ck.row0 + n0 + l, col);
            }
            ws[kk * BN + l] = elem(wv);
            var xv = 0.0;
            if (m0 + l < call.m && col < ck.n_in) {
                xv = x[(m0 + l) * ck.n_in + col];
            }
            xs[kk * BM + l] = elem(xv);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk = kk + 1u) {
            var a: array<elem, 4>;
            var b: array<elem, 4>;
            for (var i = 0u; i < 4u; i = i + 1u) {
                a[i] = xs[kk * BM + lid.y * 4u + i];
                b[i] = ws[kk * BN + lid.x * 4u + i];
            }
            for (var i = 0u; i < 4u; i = i + 1u) {
                for (var j = 0u; j < 4u; j = j + 1u) {
                    acc[i * 4u + j] = acc[i * 4u + j] + f32(a[i] * b[j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i = i + 1u) {
        let m = m0 + lid.y * 4u + i;
        if (m >= call.m) {
            continue;
        }
        for (var j = 0u; j < 4u; j = j + 1u) {
            let l = n0 + lid.x * 4u + j;
            if (l < ck.rows) {
                let o = ck.row0 + l;
                y[m * ck.n_out + o] = acc[i * 4u + j] + epilogue(m, o);
            }
        }
    }
}

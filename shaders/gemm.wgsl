// Tiled GEMM for prefill: a workgroup of GEMM_WG_SIDE² threads (16x16) computes a BM (rows of x) x BN
// (output features) tile of y (64x64), each thread a GEMM_THREAD² block (4x4). Per step of BK inputs the workgroup decodes a 64xBK tile of W (bit-identical
// to the reference dequantization) and loads a 64xBK tile of x into workgroup memory, then every thread
// accumulates its 16 outputs in f32. With F16 the tiles are stored in f16 and the products are formed in f16
// (accumulation stays f32). Bias and the LoRA expand are added in the same output pass.
#include "common.wgsl"

#if F16
alias elem = f16;
#else
alias elem = f32;
#endif

// Tile sizes come from the host (src/gpu/layout.rs): GEMM_BM = GEMM_BN (the loads below share one row index
// for x and W), GEMM_BK, GEMM_THREAD outputs per thread along each side, GEMM_WG_SIDE threads per side,
// GEMM_TILE_LEN = BK·BM elements per tile, GEMM_LOADS = TILE_LEN / threads loads per thread and step.
const BM: u32 = GEMM_BM;
const BN: u32 = GEMM_BN;
const BK: u32 = GEMM_BK;
const TH: u32 = GEMM_THREAD;

var<workgroup> xs: array<elem, GEMM_TILE_LEN>; // [BK][BM]
var<workgroup> ws: array<elem, GEMM_TILE_LEN>; // [BK][BN]

@compute @workgroup_size(GEMM_WG_SIDE, GEMM_WG_SIDE)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let n0 = wg.x * BN;
    let m0 = wg.y * BM;
    let li = lid.y * GEMM_WG_SIDE + lid.x;
    var acc: array<f32, GEMM_THREAD * GEMM_THREAD>;
    for (var i = 0u; i < TH * TH; i = i + 1u) {
        acc[i] = 0.0;
    }
    for (var k0 = 0u; k0 < ck.n_in; k0 = k0 + BK) {
        for (var r = 0u; r < GEMM_LOADS; r = r + 1u) {
            let idx = li + r * GEMM_WG_SIDE * GEMM_WG_SIDE;
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
            var a: array<elem, GEMM_THREAD>;
            var b: array<elem, GEMM_THREAD>;
            for (var i = 0u; i < TH; i = i + 1u) {
                a[i] = xs[kk * BM + lid.y * TH + i];
                b[i] = ws[kk * BN + lid.x * TH + i];
            }
            for (var i = 0u; i < TH; i = i + 1u) {
                for (var j = 0u; j < TH; j = j + 1u) {
                    acc[i * TH + j] = acc[i * TH + j] + f32(a[i] * b[j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < TH; i = i + 1u) {
        let m = m0 + lid.y * TH + i;
        if (m >= call.m) {
            continue;
        }
        for (var j = 0u; j < TH; j = j + 1u) {
            let l = n0 + lid.x * TH + j;
            if (l < ck.rows) {
                let o = ck.row0 + l;
                y[m * ck.n_out + o] = acc[i * TH + j] + epilogue(m, o);
            }
        }
    }
}

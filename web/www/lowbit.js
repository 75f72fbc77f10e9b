// Loads lowbit-web: the relaxed-SIMD build (web/pkg-relaxed: f32x4.relaxed_madd in the 4-bit GEMV) where this
// browser validates relaxed SIMD and the build exists, else the simd128 build (web/pkg). `?simd=128` forces the
// fallback. Exports the module's API as `lb`, its init as `init`, and which build was loaded as `variant`.
const RELAXED_PROBE = new Uint8Array([
  0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
  0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7b, // type: () -> v128
  0x03, 0x02, 0x01, 0x00, // one function of type 0
  0x0a, 0x3d, 0x01, 0x3b, 0x00, // code: one body of 59 bytes, no locals
  0xfd, 0x0c, ...new Array(16).fill(0), 0xfd, 0x0c, ...new Array(16).fill(0), 0xfd, 0x0c, ...new Array(16).fill(0),
  0xfd, 0x85, 0x02, // f32x4.relaxed_madd
  0x0b,
]);

export const relaxedSimd = WebAssembly.validate(RELAXED_PROBE);
const forced = new URLSearchParams(location.search).get('simd');
async function load() {
  if (relaxedSimd && forced !== '128') {
    try {
      const m = await import('../pkg-relaxed/lowbit_web.js');
      return ['relaxed-simd', m];
    } catch { /* not built: the simd128 package */ }
  }
  return ['simd128', await import('../pkg/lowbit_web.js')];
}
const [v, m] = await load();
export const variant = v;
export const lb = m;
export const init = m.default;

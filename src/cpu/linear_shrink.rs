//! The LoRA shrink `t = x·Aᵀ` of a split forward, computed by the blocks themselves.
//!
//! Unsplit, the shrink runs before the blocks: at M = 1 with a rank-16 adapter it is one 16-row piece, so it ran
//! on the calling thread alone (about 3 µs of the 4.5 µs an adapter added to SmolLM2's 576×1536 at two threads)
//! while the other thread waited for its half of the base product. Here the shrink is cut into pieces (half a
//! 16-rank group: 8 dot products, whole ranks otherwise), each block claims its share before its base product,
//! and each block's output pass first makes sure every piece is done (running any piece nobody has claimed, so a
//! thread that runs every block by itself never waits for work it holds). A piece has the bits of the unsplit
//! shrink ([`LinearKernels::dots_half`](super::table::LinearKernels::dots_half)), so results never depend on the
//! split.

use crate::format::layer::{AdapterSelection, LayerView};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU8, Ordering};

/// A piece's state: free, claimed by one thread and being computed, or done (its values written).
const FREE: u8 = 0;
const TAKEN: u8 = 1;
const DONE: u8 = 2;

/// One piece of row `row` of adapter `adapter`'s `t`: with `half: Some(h)`, the 8 entries from `k0`, half `h` of a
/// 16-entry group (`dots_half`); with `None`, the whole rank (`dots`, `k0 == 0`).
#[derive(Clone, Copy, Debug)]
struct Piece {
    adapter: usize,
    row: usize,
    k0: usize,
    half: Option<usize>,
}

/// One shrink value, written by the thread that claimed its piece and read after the piece is done.
#[derive(Default)]
#[repr(transparent)]
struct Cell(UnsafeCell<f32>);

// SAFETY: a cell is written only by the one thread whose compare-exchange claimed its piece (FREE → TAKEN),
// before that thread stores DONE with Release ordering; it is read only after a load of DONE with Acquire
// ordering ([`SharedShrink::finish`] then [`SharedShrink::row`]). No cell is ever read and written concurrently.
unsafe impl Sync for Cell {}

/// What a forward keeps across calls (no allocation after the first call with a given shape).
#[derive(Default)]
pub(crate) struct DeferredShrink {
    pieces: Vec<Piece>,
    state: Vec<AtomicU8>,
    /// Every used adapter's `t` (`[m, rank]`), adapter `a` from `offset[a]`.
    t: Vec<Cell>,
    offset: Vec<usize>,
}

impl std::fmt::Debug for DeferredShrink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredShrink").field("pieces", &self.pieces.len()).finish()
    }
}

impl DeferredShrink {
    /// Plans this call's pieces (every row of `x` and adapter the selection uses) and clears their state;
    /// returns how many there are.
    pub fn plan(&mut self, layer: LayerView<'_>, m: usize, sel: AdapterSelection<'_>) -> usize {
        self.pieces.clear();
        self.offset.clear();
        let mut len = 0;
        for (a, ad) in layer.adapters.iter().enumerate() {
            self.offset.push(len);
            let rank = ad.rank();
            len += m * rank;
            for row in (0..m).filter(|&r| layer.uses(sel, r, a)) {
                if rank.is_multiple_of(16) {
                    for k0 in (0..rank).step_by(8) {
                        self.pieces.push(Piece { adapter: a, row, k0, half: Some(k0 / 8 % 2) });
                    }
                } else {
                    self.pieces.push(Piece { adapter: a, row, k0: 0, half: None });
                }
            }
        }
        self.t.clear();
        self.t.resize_with(len, Cell::default);
        self.state.clear();
        self.state.resize_with(self.pieces.len(), || AtomicU8::new(FREE));
        self.pieces.len()
    }

    /// The shared view the blocks of one forward use; `blocks` is how many blocks the forward runs.
    pub fn view<'a>(
        &'a self,
        layer: LayerView<'a>,
        x: &'a [f32],
        kernels: &super::table::LinearKernels,
        blocks: usize,
    ) -> SharedShrink<'a> {
        SharedShrink {
            layer,
            x,
            pieces: &self.pieces,
            state: &self.state,
            t: &self.t,
            offset: &self.offset,
            dots: kernels.dots,
            dots_half: kernels.dots_half,
            share: self.pieces.len().div_ceil(blocks.max(1)),
        }
    }
}

/// The pieces of one forward's shrink as every block sees them.
#[derive(Clone, Copy)]
pub(crate) struct SharedShrink<'a> {
    layer: LayerView<'a>,
    x: &'a [f32],
    pieces: &'a [Piece],
    state: &'a [AtomicU8],
    t: &'a [Cell],
    offset: &'a [usize],
    dots: fn(&[f32], &[f32], &mut [f32]),
    dots_half: fn(&[f32], &[f32], &mut [f32], usize),
    /// Pieces a block claims before its base product.
    share: usize,
}

impl SharedShrink<'_> {
    /// At a block's start: claims and computes up to its share of the pieces nobody has claimed yet.
    pub fn claim_share(&self) {
        let mut taken = 0;
        for p in 0..self.pieces.len() {
            if taken == self.share {
                return;
            }
            if self.claim(p) {
                self.compute(p);
                taken += 1;
            }
        }
    }

    /// Before a block's output pass: returns once every piece is done, computing those nobody has claimed and
    /// waiting for those another thread is computing.
    pub fn finish(&self) {
        for p in 0..self.pieces.len() {
            let mut spins = 0u32;
            loop {
                match self.state[p].load(Ordering::Acquire) {
                    DONE => break,
                    FREE if self.claim(p) => {
                        self.compute(p);
                        break;
                    }
                    _ => {
                        // Another thread is computing it (a few µs at most, unless that thread was descheduled).
                        spins = spins.wrapping_add(1);
                        if spins.is_multiple_of(1024) {
                            std::thread::yield_now();
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                }
            }
        }
    }

    /// Row `row` of adapter `a`'s `t` (`rank` values). Only after [`finish`](Self::finish) on this thread.
    pub fn row(&self, a: usize, row: usize, rank: usize) -> &[f32] {
        if rank == 0 {
            return &[];
        }
        let cells = &self.t[self.offset[a] + row * rank..self.offset[a] + (row + 1) * rank];
        // SAFETY: `Cell` is a transparent `UnsafeCell<f32>`, so the cells are `rank` consecutive f32s; every piece
        // is done (`finish` saw DONE with Acquire ordering), so no thread writes them any more (see `Cell`).
        unsafe { std::slice::from_raw_parts(UnsafeCell::raw_get(&cells[0].0).cast_const(), rank) }
    }

    fn claim(&self, p: usize) -> bool {
        self.state[p].compare_exchange(FREE, TAKEN, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    /// Computes piece `p` (claimed by this thread) into its cells and marks it done (also if a kernel panics, so
    /// that a thread waiting for the piece reaches the join that carries the panic instead of spinning forever).
    fn compute(&self, p: usize) {
        let _done = MarkDone(&self.state[p]);
        let Piece { adapter, row, k0, half } = self.pieces[p];
        let ad = &self.layer.adapters[adapter];
        let (n_in, rank) = (self.layer.in_features, ad.rank());
        let len = if half.is_some() { 8 } else { rank };
        let x = &self.x[row * n_in..(row + 1) * n_in];
        let a_rows = &ad.a()[k0 * n_in..(k0 + len) * n_in];
        let at = self.offset[adapter] + row * rank + k0;
        let cells = &self.t[at..at + len];
        // SAFETY: this thread claimed the piece, so it is the only one touching these cells until it stores DONE
        // (see `Cell`); `Cell` is a transparent `UnsafeCell<f32>`, so the cells are `len` consecutive f32s (a piece
        // has at least one entry: ranks are positive).
        let dst = unsafe { std::slice::from_raw_parts_mut(UnsafeCell::raw_get(&cells[0].0), len) };
        match half {
            Some(h) => (self.dots_half)(x, a_rows, dst, h),
            None => (self.dots)(x, a_rows, dst),
        }
    }
}

/// Marks a piece done when dropped: after its values are written, or while a panic unwinds.
struct MarkDone<'a>(&'a AtomicU8);

impl Drop for MarkDone<'_> {
    fn drop(&mut self) {
        self.0.store(DONE, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use crate::cpu::dispatch::kernels;
    use crate::cpu::Isa;

    /// On every instruction set here, each half of a 16-row `dots` call computed alone by `dots_half` has the
    /// bits the whole call gives it (inputs with and without a tail of columns past the vector width).
    #[test]
    fn dots_half_has_the_bits_of_the_whole_call() {
        let mut s = 0x9e37_79b9u32;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for isa in Isa::available() {
            let k = kernels(isa).linear;
            for n in [1usize, 7, 15, 16, 17, 33, 64, 100, 576] {
                let x: Vec<f32> = (0..n).map(|_| next()).collect();
                let rows: Vec<f32> = (0..16 * n).map(|_| next() * 3.0).collect();
                let mut whole = [0f32; 16];
                (k.dots)(&x, &rows, &mut whole);
                for h in 0..2 {
                    let mut half = [0f32; 8];
                    (k.dots_half)(&x, &rows[8 * h * n..(8 * h + 8) * n], &mut half, h);
                    for j in 0..8 {
                        assert_eq!(half[j].to_bits(), whole[8 * h + j].to_bits(), "{isa:?} n {n} half {h} row {j}");
                    }
                }
            }
        }
    }
}

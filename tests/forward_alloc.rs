//! `QuantLinear::forward_into` allocates nothing proportional to M after warm-up: a counting global allocator
//! measures every byte allocated (on any thread, rayon workers included) over 100 calls, for every scheme, on
//! the single-threaded and the threaded path, with bias and a LoRA adapter, for M = 1, 7 and 64.
//!
//! One `#[test]` only: the counter is process-wide, so no other test may run beside it.

use lowbit::cpu::KernelPath;
use lowbit::linear::{ForwardOptions, QuantLinear, QuantWeight, Workspace};
use lowbit::lora::LoraAdapter;
use lowbit::Scheme;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static BYTES: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the threads that run forwards: the test's thread and every rayon worker. Other threads (the test
    /// harness's) are not counted.
    static COUNTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn count(bytes: usize) {
    if COUNTED.with(|c| c.get()) {
        BYTES.fetch_add(bytes, Ordering::Relaxed);
        CALLS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

#[test]
fn forward_into_allocates_nothing_per_call_after_warm_up() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .start_handler(|_| COUNTED.with(|c| c.set(true)))
        .build_global()
        .expect("the global rayon pool is built once, here");
    COUNTED.with(|c| c.set(true));
    let (out, inp, rank) = (320, 512, 8);
    let paths =
        [KernelPath { parallel: false, ..KernelPath::best() }, KernelPath { parallel: true, ..KernelPath::best() }];
    for scheme in Scheme::representative() {
        let weight = QuantWeight::quantize(&data(out * inp, 1), &[out, inp], scheme).unwrap();
        let mut layer = QuantLinear::new(weight, Some(data(out, 2))).unwrap();
        let a = data(rank * inp, 3).iter().map(|v| v * 0.1).collect();
        layer.add_adapter(LoraAdapter::new("default", rank, a, data(out * rank, 4), 16.0, false).unwrap()).unwrap();
        for m in [1usize, 7, 64] {
            let x = data(m * inp, 5 + m as u32);
            for path in paths {
                let opts = ForwardOptions::default().path(path);
                let mut ws = Workspace::default();
                let mut y = vec![0.0f32; m * out];
                for _ in 0..2 {
                    layer.forward_into_with(&x, &mut y, &mut ws, opts).unwrap();
                }
                let (b0, c0) = (BYTES.load(Ordering::SeqCst), CALLS.load(Ordering::SeqCst));
                for _ in 0..100 {
                    layer.forward_into_with(&x, &mut y, &mut ws, opts).unwrap();
                }
                let (bytes, calls) = (BYTES.load(Ordering::SeqCst) - b0, CALLS.load(Ordering::SeqCst) - c0);
                let y_bytes = m * out * 4;
                println!(
                    "{scheme} M={m} {path}: {bytes} bytes in {calls} allocations over 100 calls (y = {y_bytes} B)"
                );
                // Less than one output buffer per call on average (rayon's work-stealing deques may resize now
                // and then; everything lowbit needs comes from the workspace).
                assert!(
                    bytes < 100 * y_bytes,
                    "{scheme} M={m} {path}: 100 calls allocated {bytes} bytes, not less than one output ({y_bytes} B) per call"
                );
                // And the reused workspace gives exactly the convenience wrapper's result.
                assert_eq!(y, layer.forward_with(&x, opts).unwrap(), "{scheme} M={m} {path}");
            }
        }
    }
}

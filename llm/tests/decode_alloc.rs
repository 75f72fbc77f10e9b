//! After the first token, a decode step allocates nothing proportional to the model (the KV cache, the
//! state's buffers and lowbit's Workspace are reused): counted with a global allocator on the test thread and
//! every rayon worker, for dense and quantized layers with a LoRA adapter, 2 threads.

mod common;

use lowbit_llm::{Logits, Sampler, SamplingOptions};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static BYTES: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the threads that run forwards (the test's and the rayon workers), not the harness's.
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

#[test]
fn decode_steps_allocate_nothing_after_the_first() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .start_handler(|_| COUNTED.with(|c| c.set(true)))
        .build_global()
        .expect("the global rayon pool is built once, here");
    COUNTED.with(|c| c.set(true));
    for scheme in [None, Some("int8:channel"), Some("nf4:64+dq")] {
        let model = common::tiny_model(scheme.map(|s| s.parse().unwrap()), true, 5);
        let vocab = model.config().vocab_size;
        let steps = 40;
        let mut st = model.new_state(8 + steps).unwrap();
        let mut logits = vec![0.0f32; vocab];
        let mut sampler = Sampler::new(SamplingOptions { temperature: 0.8, top_p: 0.9, seed: 3 }).unwrap();
        model.forward(&[1, 2, 3, 4, 5, 6, 7], &mut st, Logits::Last, &mut logits).unwrap();
        let mut id = sampler.sample(&logits);
        model.forward(&[id], &mut st, Logits::Last, &mut logits).unwrap();
        id = sampler.sample(&logits);
        let (b0, c0) = (BYTES.load(Ordering::SeqCst), CALLS.load(Ordering::SeqCst));
        for _ in 0..steps {
            model.forward(&[id], &mut st, Logits::Last, &mut logits).unwrap();
            id = sampler.sample(&logits);
        }
        let (bytes, calls) = (BYTES.load(Ordering::SeqCst) - b0, CALLS.load(Ordering::SeqCst) - c0);
        println!("{}: {bytes} bytes in {calls} allocations over {steps} decode steps", scheme.unwrap_or("dense"));
        // Measured: dense 0 allocations, int8 / NF4+DQ one of 1.5 KB in 40 steps. Allowed: less than one logits
        // row per step in bytes and at most 4 allocations (rayon's deques may resize now and then; the model's
        // activations, the attention scores and lowbit's scratch come from reused buffers).
        assert!(bytes < steps * vocab * 4, "{scheme:?}: {steps} steps allocated {bytes} bytes");
        assert!(calls <= 4, "{scheme:?}: {calls} allocations in {steps} steps");
    }
}

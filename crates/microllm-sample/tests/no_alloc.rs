//! Proves `Sampler::sample` does not touch the heap after construction, with a counting
//! global allocator. Counting is per thread so the test harness's own threads do not count.

use microllm_sample::{Sampler, SamplerConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn bump() {
    // try_with: the thread-local may be gone during thread teardown.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is upheld by `System`; the counter is a const-initialised
// thread-local that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> usize {
    ALLOCS.with(|c| c.get())
}

#[test]
fn sample_does_not_allocate() {
    let n_vocab = 49_152;
    let logits: Vec<f32> = (0..n_vocab)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
        .collect();
    let history: Vec<u32> = (0..200).map(|i| (i * 37) % n_vocab as u32).collect();
    let configs = [
        SamplerConfig::greedy(),
        SamplerConfig::default(),
        SamplerConfig {
            top_k: 0, // full sort for top-p
            repeat_penalty: 1.1,
            presence_penalty: 0.5,
            frequency_penalty: 0.5,
            ..SamplerConfig::default()
        },
        SamplerConfig {
            temperature: 0.0,
            repeat_penalty: 1.3,
            ..SamplerConfig::default()
        },
        SamplerConfig {
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplerConfig::default()
        },
    ];
    for cfg in configs {
        let mut s = Sampler::new(cfg.clone(), n_vocab).unwrap();
        let before = allocs();
        let mut acc = 0u64;
        for step in 0..20 {
            acc += s.sample(&logits, &history[..100 + step]) as u64;
        }
        s.reset(9);
        acc += s.sample(&logits, &history) as u64;
        let after = allocs();
        assert_eq!(after - before, 0, "sample() allocated with {cfg:?}");
        assert!(acc > 0 || cfg.temperature <= 0.0);
    }
    // The counter works: an allocation is seen.
    let before = allocs();
    let v: Vec<u8> = Vec::with_capacity(10);
    assert!(allocs() > before);
    drop(v);
}

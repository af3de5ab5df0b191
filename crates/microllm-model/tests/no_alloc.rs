//! A counting allocator around the decode step: after the state is built, evaluating one
//! token must not touch the heap (llama2.c's RunState discipline).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use microllm_gguf::GgufFile;
use microllm_kernels::Kernels;
use microllm_model::{KvType, Logits, Model, ModelOptions, StateOptions};
use microllm_testkit::{tiny_model_bytes, TinySpec};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_step_does_not_allocate() {
    // A Q8_0 cache needs heads that are multiples of 32 wide.
    let mut wide_heads = TinySpec::llama();
    (wide_heads.n_head, wide_heads.n_head_kv) = (2, 1);
    let cases = [
        (TinySpec::llama(), KvType::F16),
        (TinySpec::qwen2(), KvType::F16),
        (TinySpec::mistral(), KvType::F16),
        (wide_heads, KvType::Q8_0),
    ];
    for (spec, kv_type) in cases {
        for n_threads in [1, 2] {
            let file = GgufFile::from_bytes(tiny_model_bytes(&spec)).unwrap();
            let model = Model::from_gguf(
                file,
                ModelOptions {
                    n_threads,
                    kernels: Kernels::detect(),
                    pack: true,
                },
            )
            .unwrap();
            let mut state = model
                .new_state(StateOptions {
                    n_ctx: 64,
                    n_batch: 16,
                    kv_type,
                })
                .unwrap();
            model
                .forward(&mut state, &[1, 2, 3, 4], Logits::Last)
                .unwrap();
            let before = ALLOCS.load(Ordering::SeqCst);
            for t in 0..20u32 {
                model.forward(&mut state, &[t + 5], Logits::Last).unwrap();
            }
            let n = ALLOCS.load(Ordering::SeqCst) - before;
            assert_eq!(
                n, 0,
                "{n} allocations in 20 decode steps ({n_threads} threads, {kv_type} KV cache)"
            );
        }
    }
}

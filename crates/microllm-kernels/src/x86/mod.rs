//! x86-64 SIMD paths and their run-time feature check.

pub(crate) mod avx2;
pub(crate) mod avx2_attn;
pub(crate) mod avx2_canon;
pub(crate) mod avx2_k;
pub(crate) mod avx2_packed;
pub(crate) mod avx2_panel;

/// Whether the running CPU has everything `avx2.rs` uses. `is_x86_feature_detected!` caches
/// its answer, so this is cheap after the first call.
pub(crate) fn avx2_fma_f16c_detected() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

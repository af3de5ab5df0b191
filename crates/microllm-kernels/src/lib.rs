//! microllm-kernels: tensor block formats and the dot-product kernels behind every matmul.
//!
//! **Main design decision: one scalar reference per format is the specification, and the
//! instruction set is chosen once at run time.** [`reference`](mod@reference) holds plain loops that follow
//! ggml's reference quantizers and generic dot products; [`Kernels`] is a small `Copy` value
//! built once ([`Kernels::detect`], [`Kernels::with_path`], or [`Kernels::from_env`] for
//! binaries and tests) that routes every call to either that reference or the AVX2+FMA+F16C
//! code in `x86/avx2.rs` (`x86/avx2_k.rs` for the K-quants). No `target-cpu=native` is needed: one release binary runs
//! everywhere, and `MICROLLM_KERNELS=scalar` forces the reference for debugging. Every SIMD
//! function is tested against the reference at awkward lengths.
//!
//! Formats: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K, Q3_K, Q4_K,
//! Q5_K, Q6_K as weights. As in llama.cpp, quantized weights are dotted with activations
//! quantized to 8 bits (Q8_0, Q8_1 for the legacy formats with a minimum, Q8_K for the
//! K-quants), so the inner loop is an exact integer dot per block followed by f32
//! multiply-adds; float weights are dotted with f32 activations.
//!
//! Fidelity: the quantized dot products reproduce the f32 arithmetic of llama.cpp's x86 AVX2
//! kernels operation for operation (the integer parts are exact, so only the float order
//! matters), because micro models turn one-ulp differences into visible logit differences.
//! For the K-quants llama.cpp itself uses different kernels depending on the batch size
//! (repacked Q4_K gemv/gemm, the tiled K-quant matmul, `vec_dot`), and the K-quant reference
//! follows the same orders ([`reference::KOrder`]), so scalar and AVX2 agree bit for bit.
//!
//! Determinism: on a given path, [`Kernels::gemm`] does not depend on how rows are split
//! across calls, and for the legacy and float formats it equals a loop of
//! [`Kernels::vec_dot`] whatever the number of columns. The AVX2 activation quantizers
//! produce the same bytes as the reference.
//!
//! Kernels take slices and return: no allocation, no threads, no global state beyond the
//! cached CPU-feature check. Parallelism belongs to the caller (the `pool` module holds the
//! thread pool; it splits gemm work by rows or columns).

pub use microllm_gguf::GgmlType;

pub mod blocks;
mod format;
pub mod packed;
pub mod panel;
pub mod pool;
pub mod reference;
#[cfg(target_arch = "x86_64")]
mod x86;

use format::{DotShape, Fmt, SUPPORTED_WEIGHTS};
use half::f16;
use std::fmt;

/// Errors from building a kernel table or converting rows. Messages say what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// The tensor type has no kernel here.
    #[error(
        "tensor type {ty} is not supported by microllm-kernels (supported: {supported}); \
         use a model quantized to one of the supported types"
    )]
    Unsupported { ty: &'static str, supported: String },
    /// A length does not fit the type.
    #[error(
        "bad length for {what}: expected {expected}, got {got}; check the tensor shape and type"
    )]
    BadLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// The requested instruction-set path cannot run on this CPU.
    #[error(
        "kernel path {path} is unavailable: {reason}; use MICROLLM_KERNELS=auto (or scalar) instead"
    )]
    PathUnavailable { path: KernelPath, reason: String },
    /// `MICROLLM_KERNELS` holds something we do not understand.
    #[error("MICROLLM_KERNELS={value:?} is not understood; set it to scalar, avx2, avx2vnni or auto (or unset it)")]
    BadEnv { value: String },
    /// `MICROLLM_PREFETCH` holds something we do not understand.
    #[error(
        "MICROLLM_PREFETCH={value:?} is not understood; set it to l1, l2 or auto (or unset it)"
    )]
    BadPrefetchEnv { value: String },
}

/// The instruction-set path a [`Kernels`] table uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KernelPath {
    /// The portable scalar reference ([`reference`](mod@reference)).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// [`KernelPath::Avx2`], with the packed matmul on AVX-512 (F, BW, VL, VNNI): two panels
    /// per 512-bit vector and `vpdpbusd` in the inner step (bit-identical results: the
    /// integer sums are exact either way and every lane's float epilogue is the same), and
    /// decode attention's direct path on 512-bit vectors (the same bits too).
    Avx2Vnni,
}

impl fmt::Display for KernelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KernelPath::Scalar => "scalar",
            KernelPath::Avx2 => "avx2+fma+f16c",
            KernelPath::Avx2Vnni => "avx2+fma+f16c+avx512vnni",
        })
    }
}

/// The kernel dispatch table: which implementation every call uses, fixed at construction.
///
/// Invariant (what makes the `unsafe` SIMD calls sound): a `Kernels` whose path is
/// [`KernelPath::Avx2`] exists only if the running CPU reported AVX2, FMA and F16C, one whose
/// path is [`KernelPath::Avx2Vnni`] only if it also reported AVX512F, AVX512BW, AVX512VL and
/// VNNI; the field is private and only [`Kernels::with_path`] (and `detect`, through it)
/// builds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    path: KernelPath,
    prefetch: Prefetch,
}

/// The cache level the 512-bit packed matmul prefetches its weights into (each panel stream
/// a few KiB ahead of its reads). A setting of speed only: the results are the same bits
/// either way. L1 by default; `MICROLLM_PREFETCH=l1|l2` ([`Kernels::from_env`]) picks one
/// for measurements.
///
/// Measured (2 threads, `microllm bench -p 0 -n 128`, the two alternating): on an Intel Xeon
/// (2026-12-07) Gemma 3 decode 110 / 107 tok/s with L1, 106 / 103 with L2, SmolLM2 372 / 359
/// against 365 / 354; on an AMD EPYC (Zen 5), with the earlier next-tile prefetch, L1 gave
/// SmolLM2 379 tok/s against 352 and Gemma 3 165 against 155.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Prefetch {
    /// `prefetcht0`: into L1.
    #[default]
    L1,
    /// `prefetcht1`: into L2.
    L2,
}

impl Prefetch {
    /// From a `MICROLLM_PREFETCH`-style setting: `l1`, `l2`, or `auto` / empty (the default).
    pub fn from_setting(value: &str) -> Result<Self, KernelError> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::default()),
            "l1" => Ok(Prefetch::L1),
            "l2" => Ok(Prefetch::L2),
            _ => Err(KernelError::BadPrefetchEnv {
                value: value.to_string(),
            }),
        }
    }
}

impl fmt::Display for Prefetch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Prefetch::L1 => "l1",
            Prefetch::L2 => "l2",
        })
    }
}

fn vnni_available() -> Result<(), String> {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::avx2_packed::vnni_detected() {
            Ok(())
        } else {
            Err(
                "this CPU lacks AVX2, FMA, F16C, AVX512F, AVX512BW, AVX512VL or AVX512-VNNI"
                    .to_string(),
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err("not an x86-64 CPU".to_string())
    }
}

fn avx2_available() -> Result<(), String> {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::avx2_fma_f16c_detected() {
            Ok(())
        } else {
            Err("this CPU lacks AVX2, FMA or F16C".to_string())
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err("not an x86-64 CPU".to_string())
    }
}

/// Route a call to the scalar reference or the AVX2 module.
macro_rules! dispatch {
    ($self:ident, scalar => $scalar:expr, avx2 => $avx2:expr $(,)?) => {
        match $self.path {
            KernelPath::Scalar => $scalar,
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a Kernels with the Avx2 or Avx2Vnni path is only built after detecting
            // AVX2, FMA and F16C, Avx2Vnni also AVX-512F (the invariant on `Kernels`), which
            // the calls that take AVX-512 variants ask for with `path == Avx2Vnni`.
            KernelPath::Avx2 | KernelPath::Avx2Vnni => unsafe { $avx2 },
            #[cfg(not(target_arch = "x86_64"))]
            KernelPath::Avx2 | KernelPath::Avx2Vnni => {
                unreachable!("the SIMD paths are never built off x86-64")
            }
        }
    };
}

/// The checks shared by the matmuls: panics (with `what`) if a slice is too short for the
/// shape; `None` for an empty product; else the bytes of weights and activations and the
/// floats of output the call uses.
fn gemm_sizes(
    what: &str,
    w: &[u8],
    w_row: usize,
    n_rows: usize,
    act: &[u8],
    a_row: usize,
    n_cols: usize,
    out: &[f32],
    out_stride: usize,
) -> Option<(usize, usize, usize)> {
    let w_need = n_rows.checked_mul(w_row).expect("weight size overflows");
    let a_need = input_sizes(what, w, w_need, act, a_row, n_cols);
    let out_need = out_size(what, n_rows, n_cols, out, out_stride)?;
    Some((w_need, a_need, out_need))
}

/// The input half of [`gemm_sizes`]: panics unless `w` holds `w_need` bytes and `act` holds
/// `n_cols` rows of `a_row`; returns the activation bytes used.
fn input_sizes(
    what: &str,
    w: &[u8],
    w_need: usize,
    act: &[u8],
    a_row: usize,
    n_cols: usize,
) -> usize {
    let a_need = n_cols
        .checked_mul(a_row)
        .expect("activation size overflows");
    assert!(
        w.len() >= w_need,
        "{what}: weights have {} bytes, need {w_need}",
        w.len()
    );
    assert!(
        act.len() >= a_need,
        "{what}: activations have {} bytes, need {a_need}",
        act.len()
    );
    a_need
}

/// The output half of [`gemm_sizes`]: `None` for an empty product, else the floats of `out`
/// used (panics if short, or if columns would overlap).
fn out_size(
    what: &str,
    n_rows: usize,
    n_cols: usize,
    out: &[f32],
    out_stride: usize,
) -> Option<usize> {
    if n_rows == 0 || n_cols == 0 {
        return None;
    }
    assert!(
        n_cols == 1 || out_stride >= n_rows,
        "{what}: out_stride {out_stride} < n_rows {n_rows} would overlap columns"
    );
    let out_need = (n_cols - 1)
        .checked_mul(out_stride)
        .and_then(|v| v.checked_add(n_rows))
        .expect("output size overflows");
    assert!(
        out.len() >= out_need,
        "{what}: out has {} floats, need {out_need}",
        out.len()
    );
    Some(out_need)
}

/// Asks for the cache lines of `data` to be brought into the L2 cache (a hint: nothing is
/// read, nothing can fault; a no-op off x86-64).
#[inline]
pub fn prefetch_l2<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let p = data.as_ptr().cast::<i8>();
        let mut at = 0;
        while at < std::mem::size_of_val(data) {
            // SAFETY: SSE is part of the x86-64 baseline; a prefetch reads nothing and never
            // faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(at)) };
            at += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// `dst[..v.len()] = v`, with the usual 8 values (one panel) as a fixed-size copy: a
/// `copy_from_slice` of unknown length is a `memmove` call per panel, 4% of a batched step.
#[inline(always)]
pub fn put_rows(dst: &mut [f32], v: &[f32]) {
    if let Ok(s) = <&[f32; 8]>::try_from(v) {
        let d: &mut [f32; 8] = (&mut dst[..8]).try_into().expect("8 floats");
        *d = *s;
    } else {
        dst[..v.len()].copy_from_slice(v);
    }
}

impl Kernels {
    /// The best path this CPU supports.
    pub fn detect() -> Self {
        let path = if vnni_available().is_ok() {
            KernelPath::Avx2Vnni
        } else if avx2_available().is_ok() {
            KernelPath::Avx2
        } else {
            KernelPath::Scalar
        };
        Kernels::of(path)
    }

    /// A table for `path` with the default [`Prefetch`]; callers check the CPU first.
    fn of(path: KernelPath) -> Self {
        Kernels {
            path,
            prefetch: Prefetch::default(),
        }
    }

    /// A specific path; `Err` if this CPU cannot run it.
    pub fn with_path(p: KernelPath) -> Result<Self, KernelError> {
        match p {
            KernelPath::Scalar => Ok(Kernels::of(p)),
            KernelPath::Avx2 | KernelPath::Avx2Vnni => {
                let check = if p == KernelPath::Avx2 {
                    avx2_available()
                } else {
                    vnni_available()
                };
                match check {
                    Ok(()) => Ok(Kernels::of(p)),
                    Err(reason) => Err(KernelError::PathUnavailable { path: p, reason }),
                }
            }
        }
    }

    /// From `MICROLLM_KERNELS` = `scalar` | `avx2` | `avx2vnni` | `auto` (unset or empty = `auto`).
    /// Only binaries and tests should call this; libraries take a `Kernels` from their caller.
    /// `MICROLLM_PREFETCH` = `l1` | `l2` | `auto` sets [`Prefetch`] (unset or `auto` = L1).
    pub fn from_env() -> Result<Self, KernelError> {
        let k = match std::env::var("MICROLLM_KERNELS") {
            Ok(v) => Self::from_setting(&v)?,
            Err(std::env::VarError::NotPresent) => Self::detect(),
            Err(std::env::VarError::NotUnicode(v)) => {
                return Err(KernelError::BadEnv {
                    value: v.to_string_lossy().into_owned(),
                })
            }
        };
        match std::env::var("MICROLLM_PREFETCH") {
            Ok(v) => Ok(k.with_prefetch(Prefetch::from_setting(&v)?)),
            Err(std::env::VarError::NotPresent) => Ok(k),
            Err(std::env::VarError::NotUnicode(v)) => Err(KernelError::BadPrefetchEnv {
                value: v.to_string_lossy().into_owned(),
            }),
        }
    }

    /// The same table with the packed matmul's prefetches going to `prefetch`.
    pub fn with_prefetch(self, prefetch: Prefetch) -> Self {
        Kernels { prefetch, ..self }
    }

    /// The cache level the packed matmul prefetches into (see [`Prefetch`]).
    pub fn prefetch(&self) -> Prefetch {
        self.prefetch
    }

    /// Parse a `MICROLLM_KERNELS`-style setting (`scalar`, `avx2`, `auto`, or empty = auto).
    pub fn from_setting(value: &str) -> Result<Self, KernelError> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::detect()),
            "scalar" => Self::with_path(KernelPath::Scalar),
            "avx2" => Self::with_path(KernelPath::Avx2),
            "avx2vnni" | "vnni" => Self::with_path(KernelPath::Avx2Vnni),
            _ => Err(KernelError::BadEnv {
                value: value.to_string(),
            }),
        }
    }

    /// The path in use.
    pub fn path(&self) -> KernelPath {
        self.path
    }

    /// Whether `w_ty` can be used as a weight in [`Kernels::vec_dot`]/[`Kernels::gemm`].
    pub fn supports(&self, w_ty: GgmlType) -> bool {
        self.vec_dot_type(w_ty).is_some()
    }

    /// The activation type weights of `w_ty` are dotted with; `None` if unsupported.
    pub fn vec_dot_type(&self, w_ty: GgmlType) -> Option<GgmlType> {
        Fmt::of(w_ty).and_then(Fmt::vec_dot_fmt).map(Fmt::ggml)
    }

    /// Like [`Kernels::vec_dot_type`], as a `Result` with a helpful error for model loading.
    pub fn check_weight_type(&self, w_ty: GgmlType) -> Result<GgmlType, KernelError> {
        self.vec_dot_type(w_ty)
            .ok_or_else(|| KernelError::Unsupported {
                ty: w_ty.name(),
                supported: SUPPORTED_WEIGHTS.to_string(),
            })
    }

    /// Quantize or convert `x` into `out` (exactly the row size of `x.len()` elements of
    /// `ty`). Weight formats follow ggml's reference quantizers (`llama-quantize` without an
    /// importance matrix; see [`Kernels::quantize_row_weighted`] for one). The AVX2 path
    /// speeds up Q8_0/Q8_1/Q8_K (activations), F16 and BF16, with the same
    /// bytes as the reference for finite input (for NaN/Inf the bytes are unspecified and may
    /// differ between paths, but nothing is read or written out of bounds).
    pub fn quantize_row(&self, ty: GgmlType, x: &[f32], out: &mut [u8]) -> Result<(), KernelError> {
        let f = reference::check_row(ty, x.len(), out.len(), "quantize_row output bytes")?;
        dispatch!(self,
            scalar => reference::quantize_row(ty, x, out),
            avx2 => {
                if x86::avx2::quantize_row(f, x, out) {
                    Ok(())
                } else {
                    reference::quantize_row(ty, x, out)
                }
            },
        )
    }

    /// Quantize one matrix row `x` as `llama-quantize` does, optionally under an importance
    /// matrix (`importance`: one weight per element of the row); see
    /// [`reference::quantize_row_weighted`]. The same bytes on every path.
    pub fn quantize_row_weighted(
        &self,
        ty: GgmlType,
        x: &[f32],
        importance: Option<&[f32]>,
        out: &mut [u8],
    ) -> Result<(), KernelError> {
        match importance {
            None => self.quantize_row(ty, x, out),
            Some(_) => reference::quantize_row_weighted(ty, x, importance, out),
        }
    }

    /// Quantize an *activation* row for the matmuls: like [`Kernels::quantize_row`] but Q8_0 and
    /// Q8_1 round as ggml-cpu does (see [`reference::quantize_act_q8`]); Q8_K (for K-quant
    /// weights) is ggml's `quantize_row_q8_K_ref`, which ggml-cpu's x86 build also uses. The
    /// same bytes on every path.
    pub fn quantize_activation(
        &self,
        ty: GgmlType,
        x: &[f32],
        out: &mut [u8],
    ) -> Result<(), KernelError> {
        let f = reference::check_row(ty, x.len(), out.len(), "quantize_activation output bytes")?;
        dispatch!(self,
            scalar => reference::quantize_act_row(ty, x, out),
            avx2 => {
                if x86::avx2::quantize_act_row(f, x, out) {
                    Ok(())
                } else {
                    reference::quantize_act_row(ty, x, out)
                }
            },
        )
    }

    /// Dequantize or convert `x` (exactly the row size of `out.len()` elements of `ty`).
    pub fn dequantize_row(
        &self,
        ty: GgmlType,
        x: &[u8],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let f = reference::check_row(ty, out.len(), x.len(), "dequantize_row input bytes")?;
        dispatch!(self,
            scalar => reference::dequantize_row(ty, x, out),
            avx2 => {
                x86::avx2::dequantize_row(f, x, out);
                Ok(())
            },
        )
    }

    /// Dot product of one weight row (`n` elements of `w_ty`) with one activation row (in
    /// `vec_dot_type(w_ty)`). Only the first row-size bytes of each slice are read.
    ///
    /// # Panics
    /// If `w_ty` is unsupported, `n` is not a multiple of its block size, or a slice is short.
    pub fn vec_dot(&self, w_ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> f32 {
        let s = DotShape::new(w_ty, n);
        assert!(
            w.len() >= s.w_row,
            "vec_dot: weight row has {} bytes, need {}",
            w.len(),
            s.w_row
        );
        assert!(
            act.len() >= s.a_row,
            "vec_dot: activation has {} bytes, need {}",
            act.len(),
            s.a_row
        );
        dispatch!(self,
            scalar => reference::vec_dot(w_ty, n, w, act),
            avx2 => x86::avx2::vec_dot(s.w, n, &w[..s.w_row], &act[..s.a_row]),
        )
    }

    /// `out[c * out_stride + r] = dot(w row r, act column c)` for `r < n_rows`, `c < n_cols`.
    ///
    /// `w` holds `n_rows` rows of `row_size(w_ty, k)` bytes; `act` holds `n_cols` vectors of
    /// `row_size(vec_dot_type(w_ty), k)` bytes (extra bytes in either are ignored), as written
    /// by [`Kernels::quantize_activation`] (8-bit activation values must be in -127..=127,
    /// which the quantizers guarantee; -128 gives a wrong sum on the AVX2 path). Decode is
    /// `n_cols == 1` (then `out_stride` is unused); prefill passes many columns.
    ///
    /// Results are those of llama.cpp's x86 AVX2 build for a matmul of `n_cols` columns. For
    /// the legacy and float formats each output is bit-identical to [`Kernels::vec_dot`] on
    /// the same row and column, whatever the tiling. For the K-quants llama.cpp's float
    /// accumulation order depends on the batch (see [`reference::KOrder`]): Q4_K columns
    /// `0 .. n_cols - n_cols % 4` follow the repacked 4-column gemm and the rest the gemv;
    /// Q2_K/Q3_K/Q5_K/Q6_K follow `vec_dot` below 8 columns and the tiled matmul from 8 on. So
    /// pass the whole batch as `n_cols` (split work by rows, not columns) and expect
    /// `gemm(.., n_cols = 1, ..)` — not a loop of `vec_dot` — to equal `vec_dot` for them. On
    /// each path the result does not depend on how the rows are split.
    ///
    /// # Panics
    /// If `w_ty` is unsupported, `k` is not a multiple of its block size, a slice is short, or
    /// `out_stride < n_rows` with more than one column.
    pub fn gemm(
        &self,
        w_ty: GgmlType,
        k: usize,
        w: &[u8],
        n_rows: usize,
        act: &[u8],
        n_cols: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let s = DotShape::new(w_ty, k);
        let Some((w_need, a_need, out_need)) = gemm_sizes(
            "gemm", w, s.w_row, n_rows, act, s.a_row, n_cols, out, out_stride,
        ) else {
            return;
        };
        let (w, act, out) = (&w[..w_need], &act[..a_need], &mut out[..out_need]);
        dispatch!(self,
            scalar => reference::gemm(w_ty, k, w, n_rows, act, n_cols, out, out_stride),
            avx2 => x86::avx2::gemm(s.w, k, w, s.w_row, n_rows, act, s.a_row, n_cols, out, out_stride),
        )
    }

    /// Whether `w_ty` has a panel matmul ([`Kernels::gemm_panel`]).
    pub fn panel_supports(&self, w_ty: GgmlType) -> bool {
        Fmt::of(w_ty).and_then(panel::PanelShape::of).is_some()
    }

    /// Quantizes one activation row (`x.len()` a multiple of 32) into the panel layout
    /// (`out.len() == panel::act_row_bytes(x.len())`). The same bytes on every path.
    pub fn quantize_panel_act(&self, x: &[f32], out: &mut [u8]) -> Result<(), KernelError> {
        if !x.len().is_multiple_of(blocks::QK) {
            return Err(KernelError::BadLength {
                what: "panel activation row (a multiple of 32 elements)",
                expected: x.len().next_multiple_of(blocks::QK),
                got: x.len(),
            });
        }
        if out.len() != panel::act_row_bytes(x.len()) {
            return Err(KernelError::BadLength {
                what: "panel activation bytes",
                expected: panel::act_row_bytes(x.len()),
                got: out.len(),
            });
        }
        dispatch!(self,
            scalar => panel::quantize_act_ref(x, out),
            avx2 => x86::avx2_panel::quantize_act(x, out),
        );
        Ok(())
    }

    /// The panel matmul, microllm's fast path for batched matmuls (see [`panel`]):
    /// `out[c * out_stride + r] = dot(w row r, act column c)` with `act` holding `n_cols`
    /// rows written by [`Kernels::quantize_panel_act`]. Not bit-identical to llama.cpp (the
    /// float order differs, and K-quant activations have finer scales); [`Kernels::gemm`]
    /// is. The result does not depend on how rows are split across calls or on `n_cols`.
    ///
    /// # Panics
    /// If `w_ty` has no panel kernel, `k` is not a multiple of its block size, a slice is
    /// short, or `out_stride < n_rows` with more than one column.
    pub fn gemm_panel(
        &self,
        w_ty: GgmlType,
        k: usize,
        w: &[u8],
        n_rows: usize,
        act: &[u8],
        n_cols: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let f = Fmt::of(w_ty)
            .filter(|f| panel::PanelShape::of(*f).is_some())
            .unwrap_or_else(|| panic!("gemm_panel: no panel kernel for {}", w_ty.name()));
        let s = DotShape::new(w_ty, k);
        let a_row = panel::act_row_bytes(k);
        let Some((w_need, a_need, out_need)) = gemm_sizes(
            "gemm_panel",
            w,
            s.w_row,
            n_rows,
            act,
            a_row,
            n_cols,
            out,
            out_stride,
        ) else {
            return;
        };
        let (w, act, out) = (&w[..w_need], &act[..a_need], &mut out[..out_need]);
        dispatch!(self,
            scalar => panel::gemm_ref(f, k, w, s.w_row, n_rows, act, n_cols, out, out_stride),
            avx2 => x86::avx2_panel::gemm(f, k, w, s.w_row, n_rows, act, n_cols, out, out_stride),
        )
    }

    /// Whether weights of `w_ty` can be packed ([`Kernels::pack`]).
    pub fn pack_supports(&self, w_ty: GgmlType) -> bool {
        Fmt::of(w_ty).is_some_and(packed::supports)
    }

    /// Bytes of `n_rows` rows of `k` elements of `w_ty` packed (see [`packed`]); `None` if
    /// the format has no packed layout or `k` is not a multiple of 32.
    pub fn packed_len(&self, w_ty: GgmlType, k: usize, n_rows: usize) -> Option<usize> {
        let f = Fmt::of(w_ty).filter(|f| packed::supports(*f))?;
        k.is_multiple_of(packed::block(f))
            .then(|| packed::packed_len(f, k, n_rows))
    }

    /// Packs rows `0..n_rows` of `w` (format `w_ty`, `k` elements each) into `out`
    /// (`packed_len` bytes; rows are padded to a multiple of 8 with zeros). Returns `false`,
    /// leaving `out` unusable, when a scale or offset is not exactly an f16 (the matrix then
    /// stays on the panel path). The same bytes on every path.
    ///
    /// # Panics
    /// If the format cannot be packed or a slice is short.
    pub fn pack(&self, w_ty: GgmlType, k: usize, w: &[u8], n_rows: usize, out: &mut [u8]) -> bool {
        let len = self
            .packed_len(w_ty, k, n_rows)
            .unwrap_or_else(|| panic!("pack: {} rows of {k} cannot be packed", w_ty.name()));
        let f = Fmt::of(w_ty).expect("checked by packed_len");
        let w_row = DotShape::new(w_ty, k).w_row;
        assert!(w.len() >= n_rows * w_row, "pack: weights too short");
        assert!(
            out.len() >= len,
            "pack: output has {} bytes, need {len}",
            out.len()
        );
        dispatch!(self,
            scalar => packed::pack_ref(f, k, w, w_row, n_rows, out),
            avx2 => x86::avx2_packed::pack(f, k, w, w_row, n_rows, out),
        )
    }

    /// The packed matmul: [`Kernels::gemm_panel`]'s results, bit for bit, from weights packed
    /// by [`Kernels::pack`] (`packed` starts at a row that is a multiple of 16 — Q8_0 pairs
    /// its 8-row panels, so a call must not start between the two of a pair — and holds
    /// `n_rows` rows). `act` as for `gemm_panel`.
    ///
    /// # Panics
    /// If `w_ty` cannot be packed, `k` is not a multiple of 32, a slice is short, or
    /// `out_stride < n_rows` with more than one column.
    pub fn gemm_packed(
        &self,
        w_ty: GgmlType,
        k: usize,
        packed: &[u8],
        n_rows: usize,
        act: &[u8],
        n_cols: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        // The packed bytes and activations are checked by gemm_packed_into.
        if out_size("gemm_packed", n_rows, n_cols, out, out_stride).is_none() {
            return;
        }
        self.gemm_packed_into(w_ty, k, packed, n_rows, act, n_cols, &mut |c, r, v| {
            put_rows(&mut out[c * out_stride + r..], v)
        });
    }

    /// [`Kernels::gemm_packed`] handing its outputs to `sink(column, first_row, values)`
    /// (consecutive rows, at most 8 at a time, each output exactly once) instead of writing
    /// a slice: for callers whose output is not one strided slice (rows of several tokens
    /// owned by different threads).
    ///
    /// # Panics
    /// If `w_ty` cannot be packed, `k` is not a multiple of 32, or a slice is short.
    pub fn gemm_packed_into(
        &self,
        w_ty: GgmlType,
        k: usize,
        packed: &[u8],
        n_rows: usize,
        act: &[u8],
        n_cols: usize,
        sink: &mut dyn FnMut(usize, usize, &[f32]),
    ) {
        let len = self
            .packed_len(w_ty, k, n_rows)
            .unwrap_or_else(|| panic!("gemm_packed: {} rows of {k} are not packed", w_ty.name()));
        let f = Fmt::of(w_ty).expect("checked by packed_len");
        let a_need = input_sizes(
            "gemm_packed",
            packed,
            len,
            act,
            panel::act_row_bytes(k),
            n_cols,
        );
        if n_rows == 0 || n_cols == 0 {
            return;
        }
        let (packed, act) = (&packed[..len], &act[..a_need]);
        match self.path {
            KernelPath::Scalar => packed::gemm_ref(f, k, packed, n_rows, act, n_cols, sink),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the Avx2 path exists only with AVX2, FMA and F16C detected, Avx2Vnni
            // only with AVX512F, AVX512BW, AVX512VL and VNNI as well (the invariant on
            // `Kernels`).
            KernelPath::Avx2 | KernelPath::Avx2Vnni => unsafe {
                x86::avx2_packed::gemm(
                    f,
                    k,
                    packed,
                    n_rows,
                    act,
                    n_cols,
                    sink,
                    self.path == KernelPath::Avx2Vnni,
                    self.prefetch == Prefetch::L2,
                )
            },
            #[cfg(not(target_arch = "x86_64"))]
            KernelPath::Avx2 | KernelPath::Avx2Vnni => {
                unreachable!("the SIMD paths are never built off x86-64")
            }
        }
    }

    /// The wrapping sum of `data`'s little-endian u64 words (whole words; trailing bytes
    /// ignored), read as fast as this path can: what a memory read bandwidth probe times.
    pub fn stream_sum(&self, data: &[u8]) -> u64 {
        dispatch!(self, scalar => reference::stream_sum(data), avx2 => x86::avx2::stream_sum(data))
    }

    /// `sum(a[i] * b[i])`.
    pub fn dot_f32(&self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot_f32: lengths differ");
        dispatch!(self, scalar => reference::dot_f32(a, b), avx2 => x86::avx2::dot_f32(a, b))
    }

    /// Attention of one query over cached f16 keys/values with llama.cpp's flash-attention
    /// numerics (see [`reference::attention_f16`]); `out` gets the `out.len()`-wide result.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_f16(
        &self,
        q16: &[f16],
        keys: &[f16],
        k_stride: usize,
        values: &[f16],
        v_stride: usize,
        n_kv: usize,
        scale: f32,
        softcap: f32,
        out: &mut [f32],
    ) {
        dispatch!(self,
            scalar => reference::attention_f16(q16, keys, k_stride, values, v_stride, n_kv, scale, softcap, out),
            avx2 => x86::avx2::attention_f16(q16, keys, k_stride, values, v_stride, n_kv, scale, softcap, out),
        )
    }

    /// Attention of several query rows sharing one KV head (microllm's fast path; see
    /// [`reference::attention_rows`] for the exact definition): `q` holds `last.len()` rows
    /// of `dk` f32, row `r` attends to keys `first..=last[r]` of `keys`/`values` (f16 rows
    /// `k_stride`/`v_stride` apart; `first = last[r] + 1 - window` when `window > 0`, else
    /// 0), and `out` gets `last.len()` rows of `dv`. Keys and values are converted once per
    /// tile for all the rows; not bit-identical to llama.cpp (see
    /// [`Kernels::attention_f16`] for that).
    ///
    /// # Panics
    /// If a slice is too short for the rows, keys or values it must hold.
    pub fn attention_rows(
        &self,
        q: &[f32],
        dk: usize,
        last: &[u32],
        window: usize,
        keys: &[f16],
        k_stride: usize,
        values: &[f16],
        v_stride: usize,
        scale: f32,
        softcap: f32,
        out: &mut [f32],
        dv: usize,
    ) {
        self.attention_rows_with(
            q, dk, last, window, keys, k_stride, values, v_stride, scale, softcap, out, dv, false,
        )
    }

    /// [`Kernels::attention_rows`] for continuous batching: the same definition, computed so
    /// that every row's result depends only on its own query, `last` and the keys and values
    /// it sees — bit-identical whatever the other rows of the call and however a prompt's
    /// rows are split between calls (row-wise dot products, key tiles at fixed positions).
    /// A little slower than [`Kernels::attention_rows`] for many rows, as fast for few.
    ///
    /// # Panics
    /// As [`Kernels::attention_rows`].
    pub fn attention_rows_invariant(
        &self,
        q: &[f32],
        dk: usize,
        last: &[u32],
        window: usize,
        keys: &[f16],
        k_stride: usize,
        values: &[f16],
        v_stride: usize,
        scale: f32,
        softcap: f32,
        out: &mut [f32],
        dv: usize,
    ) {
        self.attention_rows_with(
            q, dk, last, window, keys, k_stride, values, v_stride, scale, softcap, out, dv, true,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_rows_with(
        &self,
        q: &[f32],
        dk: usize,
        last: &[u32],
        window: usize,
        keys: &[f16],
        k_stride: usize,
        values: &[f16],
        v_stride: usize,
        scale: f32,
        softcap: f32,
        out: &mut [f32],
        dv: usize,
        rowwise: bool,
    ) {
        let n = last.len();
        assert!(q.len() >= n * dk, "attention_rows: q too short");
        assert!(out.len() >= n * dv, "attention_rows: out too short");
        if let Some(&hi) = last.iter().max() {
            let hi = hi as usize;
            assert!(
                keys.len() >= hi * k_stride + dk,
                "attention_rows: keys too short"
            );
            assert!(
                values.len() >= hi * v_stride + dv,
                "attention_rows: values too short"
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = rowwise;
        let simd = dk.is_multiple_of(8) && dv.is_multiple_of(16) && dk > 0;
        dispatch!(self,
            scalar => reference::attention_rows(q, dk, last, window, keys, k_stride, values, v_stride, scale, softcap, out, dv),
            avx2 => if simd {
                x86::avx2_attn::attention_rows(q, dk, last, window, keys, k_stride, values, v_stride, scale, softcap, out, dv, rowwise, self.path == KernelPath::Avx2Vnni)
            } else {
                reference::attention_rows(q, dk, last, window, keys, k_stride, values, v_stride, scale, softcap, out, dv)
            },
        )
    }

    /// Grows the calling thread's buffers of [`Kernels::attention_rows`] and
    /// [`Kernels::attention_rows_part`] for heads up to `dk`/`dv` wide, so that later calls on
    /// this thread do not allocate (run it once on every thread that will call them).
    pub fn reserve_attention(&self, dk: usize, dv: usize) {
        #[cfg(target_arch = "x86_64")]
        if matches!(self.path, KernelPath::Avx2 | KernelPath::Avx2Vnni) {
            x86::avx2_attn::reserve(dk, dv);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (dk, dv);
    }

    /// One part of [`Kernels::attention_rows`] when the keys are split (flash-decoding; see
    /// [`reference::attention_rows_part`]): only keys `keys_from..keys_to` are seen, `out`
    /// gets the rows' softmax-weighted sums of values before the division, and `ml` (2 floats
    /// per row) their score maximum and sum of exponentials. [`Kernels::attention_merge`]
    /// combines the parts.
    ///
    /// # Panics
    /// If a slice is too short for the rows, keys or values it must hold.
    pub fn attention_rows_part(
        &self,
        q: &[f32],
        dk: usize,
        last: &[u32],
        window: usize,
        keys: &[f16],
        k_stride: usize,
        values: &[f16],
        v_stride: usize,
        scale: f32,
        softcap: f32,
        keys_from: usize,
        keys_to: usize,
        out: &mut [f32],
        dv: usize,
        ml: &mut [f32],
    ) {
        let n = last.len();
        assert!(q.len() >= n * dk, "attention_rows_part: q too short");
        assert!(out.len() >= n * dv, "attention_rows_part: out too short");
        assert!(ml.len() >= 2 * n, "attention_rows_part: ml too short");
        // The last key any row sees.
        let hi = last
            .iter()
            .map(|&l| l as usize)
            .filter(|&l| l >= keys_from)
            .max();
        if let Some(hi) = hi.map(|h| h.min(keys_to.saturating_sub(1))) {
            assert!(
                keys.len() >= hi * k_stride + dk,
                "attention_rows_part: keys too short"
            );
            assert!(
                values.len() >= hi * v_stride + dv,
                "attention_rows_part: values too short"
            );
        }
        let simd = dk.is_multiple_of(8) && dv.is_multiple_of(16) && dk > 0;
        dispatch!(self,
            scalar => reference::attention_rows_part(q, dk, last, window, keys, k_stride, values, v_stride, scale, softcap, keys_from, keys_to, out, dv, ml),
            avx2 => if simd {
                x86::avx2_attn::attention_rows_part(q, dk, last, window, keys, k_stride, values, v_stride, scale, softcap, keys_from, keys_to, out, dv, ml, self.path == KernelPath::Avx2Vnni)
            } else {
                reference::attention_rows_part(q, dk, last, window, keys, k_stride, values, v_stride, scale, softcap, keys_from, keys_to, out, dv, ml)
            },
        )
    }

    /// Merges the parts of [`Kernels::attention_rows_part`] over disjoint key ranges into
    /// `out` (`n_rows` rows of `dv`): see [`reference::attention_merge`] for the layout of
    /// `parts` and the formula. Every path runs the scalar version (a few hundred floats).
    ///
    /// # Panics
    /// If `parts` is not whole parts of `n_rows * (dv + 2)` floats or `out` is too short.
    pub fn attention_merge(&self, parts: &[f32], n_rows: usize, dv: usize, out: &mut [f32]) {
        let stride = n_rows * (dv + 2);
        assert!(
            stride > 0 && parts.len().is_multiple_of(stride),
            "attention_merge: parts must be whole parts"
        );
        assert!(out.len() >= n_rows * dv, "attention_merge: out too short");
        reference::attention_merge(parts, n_rows, dv, out)
    }

    /// GeGLU in place: `gate[i] = gelu_tanh(gate[i]) * up[i]`, through ggml's f16 GELU table
    /// (see [`reference::geglu`]).
    pub fn geglu(&self, gate: &mut [f32], up: &[f32]) {
        dispatch!(self,
            scalar => reference::geglu(gate, up),
            avx2 => x86::avx2::geglu(gate, up),
        )
    }

    /// Rotary position embedding of one row in place (see [`reference::rope`]): every
    /// `head_dim`-wide head of `x` has its first `2 * cos.len()` dimensions rotated; pairs
    /// `(2i, 2i + 1)`, or `(i, i + cos.len())` with `neox`. Bit-identical on every path.
    ///
    /// # Panics
    /// If `sin` is shorter than `cos` or the pairs do not fit a head.
    pub fn rope(&self, x: &mut [f32], head_dim: usize, neox: bool, cos: &[f32], sin: &[f32]) {
        assert!(
            sin.len() >= cos.len() && 2 * cos.len() <= head_dim,
            "rope: {} angles do not fit heads of {head_dim}",
            cos.len()
        );
        dispatch!(self,
            scalar => reference::rope(x, head_dim, neox, cos, sin),
            avx2 => x86::avx2::rope(x, head_dim, neox, cos, sin),
        )
    }

    /// SwiGLU in place: `gate[i] = silu(gate[i]) * up[i]`, with ggml-cpu's vectorized `exp`
    /// (see [`reference::expf_vec`]) so the result matches llama.cpp bit for bit.
    pub fn swiglu(&self, gate: &mut [f32], up: &[f32]) {
        dispatch!(self,
            scalar => reference::swiglu(gate, up),
            avx2 => x86::avx2::swiglu(gate, up),
        )
    }

    /// Dot product of two f16 vectors in ggml's accumulation order (see
    /// [`reference::dot_f16`]): bit-identical on every path.
    pub fn dot_f16(&self, a: &[f16], b: &[f16]) -> f32 {
        dispatch!(self,
            scalar => reference::dot_f16(a, b),
            avx2 => x86::avx2::dot_f16(a, b),
        )
    }

    /// `sum(a[i] * b[i])` with `a` in f16 (e.g. a KV-cache row).
    pub fn dot_f16_f32(&self, a: &[f16], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot_f16_f32: lengths differ");
        dispatch!(self, scalar => reference::dot_f16_f32(a, b), avx2 => x86::avx2::dot_f16_f32(a, b))
    }

    /// `y += a * x`.
    pub fn axpy_f32(&self, y: &mut [f32], a: f32, x: &[f32]) {
        assert_eq!(y.len(), x.len(), "axpy_f32: lengths differ");
        dispatch!(self, scalar => reference::axpy_f32(y, a, x), avx2 => x86::avx2::axpy_f32(y, a, x))
    }

    /// `y += a * x` with `x` in f16.
    pub fn axpy_f16(&self, y: &mut [f32], a: f32, x: &[f16]) {
        assert_eq!(y.len(), x.len(), "axpy_f16: lengths differ");
        dispatch!(self, scalar => reference::axpy_f16(y, a, x), avx2 => x86::avx2::axpy_f16(y, a, x))
    }

    /// f32 -> f16, round to nearest even (bit-identical on every path).
    pub fn f32_to_f16(&self, src: &[f32], dst: &mut [f16]) {
        assert_eq!(src.len(), dst.len(), "f32_to_f16: lengths differ");
        dispatch!(self, scalar => reference::f32_to_f16(src, dst), avx2 => x86::avx2::f32_to_f16(src, dst))
    }

    /// f16 -> f32 (exact on every path).
    pub fn f16_to_f32(&self, src: &[f16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "f16_to_f32: lengths differ");
        dispatch!(self, scalar => reference::f16_to_f32(src, dst), avx2 => x86::avx2::f16_to_f32(src, dst))
    }
}

impl Default for Kernels {
    fn default() -> Self {
        Self::detect()
    }
}

//! The tensor formats this crate implements, with their sizes, mapped from `GgmlType`.
//!
//! `GgmlType` covers every ggml type; `Fmt` is the closed subset we have kernels for, so the
//! kernels can `match` exhaustively and the compiler checks every format has every kernel.

use crate::GgmlType;

// ggml's type names, verbatim.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fmt {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
}

/// Weight types with a dot-product kernel, for error messages.
pub(crate) const SUPPORTED_WEIGHTS: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";
/// Types quantize_row/dequantize_row accept, for error messages.
pub(crate) const SUPPORTED_ROWS: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

impl Fmt {
    pub(crate) fn of(ty: GgmlType) -> Option<Fmt> {
        Some(match ty {
            GgmlType::F32 => Fmt::F32,
            GgmlType::F16 => Fmt::F16,
            GgmlType::BF16 => Fmt::BF16,
            GgmlType::Q4_0 => Fmt::Q4_0,
            GgmlType::Q4_1 => Fmt::Q4_1,
            GgmlType::Q5_0 => Fmt::Q5_0,
            GgmlType::Q5_1 => Fmt::Q5_1,
            GgmlType::Q8_0 => Fmt::Q8_0,
            GgmlType::Q8_1 => Fmt::Q8_1,
            GgmlType::Q2_K => Fmt::Q2_K,
            GgmlType::Q3_K => Fmt::Q3_K,
            GgmlType::Q4_K => Fmt::Q4_K,
            GgmlType::Q5_K => Fmt::Q5_K,
            GgmlType::Q6_K => Fmt::Q6_K,
            GgmlType::Q8_K => Fmt::Q8_K,
            _ => return None,
        })
    }

    pub(crate) fn ggml(self) -> GgmlType {
        match self {
            Fmt::F32 => GgmlType::F32,
            Fmt::F16 => GgmlType::F16,
            Fmt::BF16 => GgmlType::BF16,
            Fmt::Q4_0 => GgmlType::Q4_0,
            Fmt::Q4_1 => GgmlType::Q4_1,
            Fmt::Q5_0 => GgmlType::Q5_0,
            Fmt::Q5_1 => GgmlType::Q5_1,
            Fmt::Q8_0 => GgmlType::Q8_0,
            Fmt::Q8_1 => GgmlType::Q8_1,
            Fmt::Q2_K => GgmlType::Q2_K,
            Fmt::Q3_K => GgmlType::Q3_K,
            Fmt::Q4_K => GgmlType::Q4_K,
            Fmt::Q5_K => GgmlType::Q5_K,
            Fmt::Q6_K => GgmlType::Q6_K,
            Fmt::Q8_K => GgmlType::Q8_K,
        }
    }

    /// Elements per block (1 for the float formats).
    pub(crate) const fn block_elems(self) -> usize {
        match self {
            Fmt::F32 | Fmt::F16 | Fmt::BF16 => 1,
            Fmt::Q2_K | Fmt::Q3_K | Fmt::Q4_K | Fmt::Q5_K | Fmt::Q6_K | Fmt::Q8_K => 256,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub(crate) const fn block_bytes(self) -> usize {
        match self {
            Fmt::F32 => 4,
            Fmt::F16 | Fmt::BF16 => 2,
            Fmt::Q4_0 => 18,
            Fmt::Q4_1 => 20,
            Fmt::Q5_0 => 22,
            Fmt::Q5_1 => 24,
            Fmt::Q8_0 => 34,
            Fmt::Q8_1 => 36,
            Fmt::Q2_K => 84,
            Fmt::Q3_K => 110,
            Fmt::Q4_K => 144,
            Fmt::Q5_K => 176,
            Fmt::Q6_K => 210,
            Fmt::Q8_K => 292,
        }
    }

    /// Whether this is a K-quant weight format (256-element super-blocks, Q8_K activations).
    pub(crate) const fn is_k_weight(self) -> bool {
        matches!(
            self,
            Fmt::Q2_K | Fmt::Q3_K | Fmt::Q4_K | Fmt::Q5_K | Fmt::Q6_K
        )
    }

    /// Bytes of a row of `n` elements; `None` if `n` is not a whole number of blocks or the
    /// size overflows.
    pub(crate) fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// The activation format a weight format is dotted with (ggml's `vec_dot_type`, except
    /// that float weights take f32 activations). `None` if it is not a weight format.
    pub(crate) fn vec_dot_fmt(self) -> Option<Fmt> {
        match self {
            Fmt::F32 | Fmt::F16 | Fmt::BF16 => Some(Fmt::F32),
            Fmt::Q4_0 | Fmt::Q5_0 | Fmt::Q8_0 => Some(Fmt::Q8_0),
            Fmt::Q4_1 | Fmt::Q5_1 => Some(Fmt::Q8_1),
            Fmt::Q2_K | Fmt::Q3_K | Fmt::Q4_K | Fmt::Q5_K | Fmt::Q6_K => Some(Fmt::Q8_K),
            Fmt::Q8_1 | Fmt::Q8_K => None,
        }
    }
}

/// Shapes of a dot/gemm call, checked once; panics (programmer error) when they do not fit.
pub(crate) struct DotShape {
    pub w: Fmt,
    pub w_row: usize,
    pub a_row: usize,
}

impl DotShape {
    #[track_caller]
    pub(crate) fn new(w_ty: GgmlType, k: usize) -> DotShape {
        let w = match Fmt::of(w_ty) {
            Some(f) if f.vec_dot_fmt().is_some() => f,
            _ => panic!(
                "microllm-kernels: no dot kernel for weight type {} (supported: {SUPPORTED_WEIGHTS}); \
                 check Kernels::supports() when loading the model",
                w_ty.name()
            ),
        };
        let a = w.vec_dot_fmt().unwrap_or(Fmt::F32);
        let (Some(w_row), Some(a_row)) = (w.row_bytes(k), a.row_bytes(k)) else {
            panic!(
                "microllm-kernels: row length {k} is not a multiple of the {} block size {}",
                w_ty.name(),
                w.block_elems()
            )
        };
        DotShape { w, w_row, a_row }
    }
}

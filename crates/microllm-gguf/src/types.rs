//! ggml tensor element types: numeric ids as stored in GGUF, names, block geometry.

/// A ggml tensor type, with the numeric id ggml stores in GGUF tensor infos.
///
/// Ids 4 and 5 (old Q4_2/Q4_3), 31..=33 (Q4_0_4_4 etc.) and 36..=38 (IQ4_NL_4_4 etc.) were
/// removed from ggml; files carrying them are rejected as unknown types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
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
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// Super-block size of the k-quants and i-quants.
const QK_K: usize = 256;

/// (type, ggml id, name, elements per block, bytes per block).
///
/// Block sizes follow ggml's `type_traits` table (ggml-common.h block structs).
const TABLE: [(GgmlType, u32, &str, usize, usize); 32] = {
    use GgmlType::*;
    [
        (F32, 0, "F32", 1, 4),
        (F16, 1, "F16", 1, 2),
        (Q4_0, 2, "Q4_0", 32, 2 + 16),
        (Q4_1, 3, "Q4_1", 32, 2 + 2 + 16),
        (Q5_0, 6, "Q5_0", 32, 2 + 4 + 16),
        (Q5_1, 7, "Q5_1", 32, 2 + 2 + 4 + 16),
        (Q8_0, 8, "Q8_0", 32, 2 + 32),
        (Q8_1, 9, "Q8_1", 32, 2 + 2 + 32),
        (Q2_K, 10, "Q2_K", QK_K, QK_K / 16 + QK_K / 4 + 2 + 2),
        (Q3_K, 11, "Q3_K", QK_K, QK_K / 8 + QK_K / 4 + 12 + 2),
        (Q4_K, 12, "Q4_K", QK_K, 2 + 2 + 12 + QK_K / 2),
        (Q5_K, 13, "Q5_K", QK_K, 2 + 2 + 12 + QK_K / 8 + QK_K / 2),
        (Q6_K, 14, "Q6_K", QK_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2),
        (Q8_K, 15, "Q8_K", QK_K, 4 + QK_K + QK_K / 16 * 2),
        (IQ2_XXS, 16, "IQ2_XXS", QK_K, 2 + QK_K / 4),
        (IQ2_XS, 17, "IQ2_XS", QK_K, 2 + QK_K / 4 + QK_K / 32),
        (IQ3_XXS, 18, "IQ3_XXS", QK_K, 2 + QK_K / 4 + QK_K / 8),
        (IQ1_S, 19, "IQ1_S", QK_K, 2 + QK_K / 8 + QK_K / 16),
        (IQ4_NL, 20, "IQ4_NL", 32, 2 + 16),
        (
            IQ3_S,
            21,
            "IQ3_S",
            QK_K,
            2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4,
        ),
        (IQ2_S, 22, "IQ2_S", QK_K, 2 + QK_K / 4 + QK_K / 16),
        (IQ4_XS, 23, "IQ4_XS", QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
        (I8, 24, "I8", 1, 1),
        (I16, 25, "I16", 1, 2),
        (I32, 26, "I32", 1, 4),
        (I64, 27, "I64", 1, 8),
        (F64, 28, "F64", 1, 8),
        (IQ1_M, 29, "IQ1_M", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
        (BF16, 30, "BF16", 1, 2),
        (TQ1_0, 34, "TQ1_0", QK_K, 2 + 4 * 13),
        (TQ2_0, 35, "TQ2_0", QK_K, 2 + QK_K / 4),
        (MXFP4, 39, "MXFP4", 32, 1 + 16),
    ]
};

impl GgmlType {
    /// Every type this crate knows, in id order.
    pub const ALL: [GgmlType; 32] = {
        let mut out = [GgmlType::F32; 32];
        let mut i = 0;
        while i < TABLE.len() {
            out[i] = TABLE[i].0;
            i += 1;
        }
        out
    };

    fn entry(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        // The table is in declaration order, so the discriminant indexes it directly.
        &TABLE[self as usize]
    }

    /// The type with ggml id `id`, or `None` for ids ggml never had or removed.
    pub fn from_id(id: u32) -> Option<Self> {
        TABLE.iter().find(|e| e.1 == id).map(|e| e.0)
    }

    /// ggml's numeric id (`enum ggml_type`), as stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        self.entry().1
    }

    /// ggml's name for the type: "F32", "Q4_K", "BF16", ...
    pub fn name(self) -> &'static str {
        self.entry().2
    }

    /// The type named `s`, case-insensitively ("q4_k" and "Q4_K" both work).
    pub fn from_name(s: &str) -> Option<Self> {
        TABLE
            .iter()
            .find(|e| e.2.eq_ignore_ascii_case(s.trim()))
            .map(|e| e.0)
    }

    /// Elements per block (1 for plain scalar types, 32 or 256 for quantized ones).
    pub fn block_size(self) -> usize {
        self.entry().3
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.entry().4
    }

    /// True for block-quantized types (block size > 1).
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes taken by `n_elements` elements, or `None` if `n_elements` is not a multiple of
    /// the block size or the byte count overflows `u64`.
    pub fn row_size(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The name of a llama.cpp `general.file_type` value (`LLAMA_FTYPE_*`), the label a quantized
/// file is known by ("Q4_K_M"), if it is one of the common ones.
pub fn file_type_name(ft: u32) -> Option<&'static str> {
    Some(match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_in_declaration_order() {
        for (i, e) in TABLE.iter().enumerate() {
            assert_eq!(e.0 as usize, i, "{} out of order", e.2);
            assert_eq!(GgmlType::from_id(e.1), Some(e.0));
            assert_eq!(GgmlType::from_name(&e.2.to_lowercase()), Some(e.0));
        }
    }

    #[test]
    fn sizes_match_ggml() {
        use GgmlType::*;
        let expect = [
            (Q4_0, 18),
            (Q4_1, 20),
            (Q5_0, 22),
            (Q5_1, 24),
            (Q8_0, 34),
            (Q8_1, 36),
            (Q2_K, 84),
            (Q3_K, 110),
            (Q4_K, 144),
            (Q5_K, 176),
            (Q6_K, 210),
            (Q8_K, 292),
            (IQ2_XXS, 66),
            (IQ2_XS, 74),
            (IQ3_XXS, 98),
            (IQ1_S, 50),
            (IQ4_NL, 18),
            (IQ3_S, 110),
            (IQ2_S, 82),
            (IQ4_XS, 136),
            (IQ1_M, 56),
            (TQ1_0, 54),
            (TQ2_0, 66),
            (MXFP4, 17),
        ];
        for (t, size) in expect {
            assert_eq!(t.type_size(), size, "{t}");
        }
        assert_eq!(Q4_K.row_size(576), None);
        assert_eq!(Q4_1.row_size(576), Some(18 * 20));
        assert_eq!(F32.row_size(u64::MAX), None);
        assert_eq!(MXFP4.id(), 39);
        assert_eq!(BF16.id(), 30);
        assert_eq!(GgmlType::from_id(4), None);
    }
}

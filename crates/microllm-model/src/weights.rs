//! Typed weights: views into the mapped GGUF, checked once at load for name, shape and type.

use microllm_gguf::{GgmlType, GgufFile, TensorInfo};
use microllm_kernels::Kernels;

use crate::config::Config;
use crate::ModelError;

/// A 2-D weight matrix of any supported format, stored row-major as GGUF does: `n_rows`
/// rows (output features) of `n_cols` elements (input features).
#[derive(Clone, Debug)]
pub struct QMatrix {
    pub ty: GgmlType,
    pub n_rows: usize,
    pub n_cols: usize,
    /// Bytes per row in `ty`.
    pub row_bytes: usize,
    info: TensorInfo,
    /// The rows repacked at load for the packed matmul (`Kernels::pack`), if they were.
    pub(crate) packed: Option<crate::pack::PackedSlice>,
    /// For a format with no packed layout: the file's bytes copied into the packing arena
    /// (huge pages), if they were; [`QMatrix::data`] then reads them there.
    pub(crate) copy: Option<crate::pack::PackedSlice>,
}

impl QMatrix {
    /// Rows `r0..r0+n_rows` of this matrix as a matrix of their own (a view of the same
    /// bytes): how fused tensors (Phi-3's attn_qkv, ffn_up holding gate and up) are split.
    pub(crate) fn rows(&self, r0: usize, n_rows: usize) -> QMatrix {
        let mut info = self.info.clone();
        info.offset += (r0 * self.row_bytes) as u64;
        info.n_bytes = (n_rows * self.row_bytes) as u64;
        info.dims = vec![self.n_cols as u64, n_rows as u64];
        QMatrix {
            ty: self.ty,
            n_rows,
            n_cols: self.n_cols,
            row_bytes: self.row_bytes,
            info,
            packed: None,
            copy: None,
        }
    }

    /// The raw bytes (all rows): the copy in the packing arena if there is one, else inside
    /// `file`.
    #[inline]
    pub fn data<'a>(&'a self, file: &'a GgufFile) -> &'a [u8] {
        match &self.copy {
            Some(c) => c,
            None => file.tensor_data(&self.info),
        }
    }
    pub fn name(&self) -> &str {
        &self.info.name
    }
    pub fn n_bytes(&self) -> u64 {
        self.info.n_bytes
    }
    /// The packed copy of the rows (see `microllm_kernels::packed`), if the model made one.
    pub fn packed(&self) -> Option<&[u8]> {
        self.packed.as_deref()
    }
    /// The packed bytes from row `r0` (a multiple of 8, the panel height) on.
    pub(crate) fn packed_from(&self, r0: usize) -> Option<&[u8]> {
        use microllm_kernels::panel::PANEL_ROWS;
        let p = self.packed()?;
        // Packed Q8_0 panels are paired: a call starts at an even one (the pool's pieces do).
        debug_assert_eq!(r0 % (2 * PANEL_ROWS), 0);
        Some(&p[r0 / PANEL_ROWS * (p.len() / self.n_rows.div_ceil(PANEL_ROWS))..])
    }
    pub(crate) fn info(&self) -> &TensorInfo {
        &self.info
    }
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,  // (n_embd)              blk.{i}.attn_norm.weight
    pub wq: QMatrix,          // (q_dim, n_embd)       blk.{i}.attn_q.weight
    pub wk: QMatrix,          // (k_dim, n_embd)       blk.{i}.attn_k.weight
    pub wv: QMatrix,          // (v_dim, n_embd)       blk.{i}.attn_v.weight
    pub bq: Option<Vec<f32>>, // (q_dim)               blk.{i}.attn_q.bias (qwen2)
    pub bk: Option<Vec<f32>>, // (k_dim)               blk.{i}.attn_k.bias
    pub bv: Option<Vec<f32>>, // (v_dim)               blk.{i}.attn_v.bias
    pub q_norm: Option<Vec<f32>>, // (head_dim)        blk.{i}.attn_q_norm.weight (gemma3)
    pub k_norm: Option<Vec<f32>>, // (head_dim)        blk.{i}.attn_k_norm.weight (gemma3)
    pub wo: QMatrix,          // (n_embd, n_head*head_dim_v) blk.{i}.attn_output.weight
    pub attn_post_norm: Option<Vec<f32>>, // (n_embd)  blk.{i}.post_attention_norm.weight (gemma)
    pub ffn_norm: Vec<f32>,   // (n_embd)              blk.{i}.ffn_norm.weight
    pub w_gate: QMatrix,      // (n_ff, n_embd)        blk.{i}.ffn_gate.weight
    pub w_up: QMatrix,        // (n_ff, n_embd)        blk.{i}.ffn_up.weight
    pub w_down: QMatrix,      // (n_embd, n_ff)        blk.{i}.ffn_down.weight
    pub ffn_post_norm: Option<Vec<f32>>, // (n_embd)   blk.{i}.post_ffw_norm.weight (gemma)
}

#[derive(Clone, Debug)]
pub struct Weights {
    pub token_embd: QMatrix, // (n_vocab, n_embd)  token_embd.weight
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>, // (n_embd)           output_norm.weight
    /// The output projection; the token embedding when the model ties them.
    pub output: QMatrix, // (n_vocab, n_embd)  output.weight | token_embd.weight
    pub tied_output: bool,
    /// Per-frequency divisors for llama3-style RoPE scaling.
    pub rope_freqs: Option<Vec<f32>>, // (n_rot/2)        rope_freqs.weight
}

/// Loads tensors by name with shape and type checks.
pub(crate) struct Loader<'f> {
    pub file: &'f GgufFile,
    pub kernels: &'f Kernels,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo, ModelError> {
        self.file
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    pub fn has(&self, name: &str) -> bool {
        self.file.tensor(name).is_some()
    }

    /// A matrix with `n_rows` rows of `n_cols` (ggml dims `[n_cols, n_rows]`).
    pub fn matrix(&self, name: &str, n_rows: usize, n_cols: usize) -> Result<QMatrix, ModelError> {
        let info = self.info(name)?;
        let dims_ok =
            info.dims.len() == 2 && info.dims[0] == n_cols as u64 && info.dims[1] == n_rows as u64;
        if !dims_ok {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: vec![n_cols as u64, n_rows as u64],
                got: info.dims.clone(),
            });
        }
        if !self.kernels.supports(info.ty) {
            return Err(ModelError::UnsupportedType {
                tensor: name.to_string(),
                ty: info.ty.name().to_string(),
                supported: supported_types(self.kernels),
            });
        }
        let row_bytes = info
            .ty
            .row_size(n_cols as u64)
            .ok_or_else(|| ModelError::TensorShape {
                name: name.to_string(),
                expected: vec![n_cols as u64, n_rows as u64],
                got: info.dims.clone(),
            })? as usize;
        Ok(QMatrix {
            ty: info.ty,
            n_rows,
            n_cols,
            row_bytes,
            info: info.clone(),
            packed: None,
            copy: None,
        })
    }

    /// A 1-D vector of `n` values (F32, F16 or BF16 in the file), copied to f32.
    pub fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
        let info = self.info(name)?;
        if info.dims.len() != 1 || info.dims[0] != n as u64 {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: vec![n as u64],
                got: info.dims.clone(),
            });
        }
        let mut out = vec![0.0f32; n];
        self.kernels
            .dequantize_row(info.ty, self.file.tensor_data(info), &mut out)
            .map_err(|_| ModelError::UnsupportedType {
                tensor: name.to_string(),
                ty: info.ty.name().to_string(),
                supported: supported_types(self.kernels),
            })?;
        Ok(out)
    }

    pub fn opt_vector(&self, name: &str, n: usize) -> Result<Option<Vec<f32>>, ModelError> {
        if self.has(name) {
            self.vector(name, n).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// The tensor types this CPU's kernels can multiply, for error messages.
pub fn supported_types(kernels: &Kernels) -> String {
    ALL_TYPES
        .iter()
        .filter(|t| kernels.supports(**t))
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

const ALL_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

impl Weights {
    pub(crate) fn load(l: &Loader<'_>, c: &Config) -> Result<Self, ModelError> {
        let token_embd = l.matrix("token_embd.weight", c.n_vocab, c.n_embd)?;
        let gemma = matches!(c.arch, crate::Arch::Gemma2 | crate::Arch::Gemma3);
        // Gemma's post-norms are required there and absent elsewhere.
        let post = |l: &Loader<'_>, name: &str| -> Result<Option<Vec<f32>>, ModelError> {
            if gemma {
                l.vector(name, c.n_embd).map(Some)
            } else {
                Ok(None)
            }
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            // Q/K/V and gate/up are separate tensors, or fused ones split into row ranges.
            let (wq, wk, wv) = if l.has(&p("attn_qkv.weight")) {
                let qkv = l.matrix(
                    &p("attn_qkv.weight"),
                    c.q_dim() + c.k_dim() + c.v_dim(),
                    c.n_embd,
                )?;
                (
                    qkv.rows(0, c.q_dim()),
                    qkv.rows(c.q_dim(), c.k_dim()),
                    qkv.rows(c.q_dim() + c.k_dim(), c.v_dim()),
                )
            } else {
                (
                    l.matrix(&p("attn_q.weight"), c.q_dim(), c.n_embd)?,
                    l.matrix(&p("attn_k.weight"), c.k_dim(), c.n_embd)?,
                    l.matrix(&p("attn_v.weight"), c.v_dim(), c.n_embd)?,
                )
            };
            let (w_gate, w_up) = if l.has(&p("ffn_gate.weight")) {
                (
                    l.matrix(&p("ffn_gate.weight"), c.n_ff, c.n_embd)?,
                    l.matrix(&p("ffn_up.weight"), c.n_ff, c.n_embd)?,
                )
            } else {
                // ffn_up holds [gate; up] (silu of the first half times the second).
                let fused = l.matrix(&p("ffn_up.weight"), 2 * c.n_ff, c.n_embd)?;
                (fused.rows(0, c.n_ff), fused.rows(c.n_ff, c.n_ff))
            };
            layers.push(LayerWeights {
                attn_norm: l.vector(&p("attn_norm.weight"), c.n_embd)?,
                wq,
                wk,
                wv,
                bq: l.opt_vector(&p("attn_q.bias"), c.q_dim())?,
                bk: l.opt_vector(&p("attn_k.bias"), c.k_dim())?,
                bv: l.opt_vector(&p("attn_v.bias"), c.v_dim())?,
                q_norm: l.opt_vector(&p("attn_q_norm.weight"), c.head_dim)?,
                k_norm: l.opt_vector(&p("attn_k_norm.weight"), c.head_dim)?,
                wo: l.matrix(&p("attn_output.weight"), c.n_embd, c.n_head * c.head_dim_v)?,
                attn_post_norm: post(l, &p("post_attention_norm.weight"))?,
                ffn_norm: l.vector(&p("ffn_norm.weight"), c.n_embd)?,
                w_gate,
                w_up,
                w_down: l.matrix(&p("ffn_down.weight"), c.n_embd, c.n_ff)?,
                ffn_post_norm: post(l, &p("post_ffw_norm.weight"))?,
            });
        }
        let output_norm = l.vector("output_norm.weight", c.n_embd)?;
        let (output, tied_output) = if l.has("output.weight") {
            (l.matrix("output.weight", c.n_vocab, c.n_embd)?, false)
        } else {
            (token_embd.clone(), true)
        };
        // llama3-style factors, or Phi-3's short-context factors (we run within the original
        // context, where llama.cpp uses the short ones).
        let rope_freqs = match l.opt_vector("rope_freqs.weight", c.rope.n_rot / 2)? {
            Some(f) => Some(f),
            None => l.opt_vector("rope_factors_short.weight", c.rope.n_rot / 2)?,
        };
        Ok(Weights {
            token_embd,
            layers,
            output_norm,
            output,
            tied_output,
            rope_freqs,
        })
    }
}

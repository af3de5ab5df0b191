//! Tiny random models: specs, their weights as f32, and GGUF files built from them.

use std::borrow::Cow;
use std::path::Path;

use microllm_gguf::{GgmlType, GgufError, GgufWriter, MetaValue, Metadata};

use crate::rng::SplitMix64;
use crate::vocab::{tiny_gpt2_vocab, CHATML_TEMPLATE, ENDOFTEXT_ID, IM_END_ID, IM_START_ID};

/// The architecture a tiny model imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TinyArch {
    /// `general.architecture = "llama"`, like SmolLM2.
    Llama,
    /// `general.architecture = "qwen2"`: Q/K/V biases, `n_head * head_dim == n_embd`.
    Qwen2,
    /// A classic Mistral-7B-style model. llama.cpp has no "mistral" architecture for it: its
    /// converter maps `MistralForCausalLM` to `"llama"` (`mistral3`/`mistral4` are different,
    /// newer models), so the file says `"llama"`. What sets it apart is the optional
    /// `llama.attention.sliding_window` key (which llama.cpp's llama graph ignores) and the
    /// `llama-bpe` pre-tokenizer.
    Mistral,
}

impl TinyArch {
    /// The `general.architecture` value written to the file (also the metadata key prefix).
    pub fn gguf_arch(self) -> &'static str {
        match self {
            TinyArch::Llama | TinyArch::Mistral => "llama",
            TinyArch::Qwen2 => "qwen2",
        }
    }

    /// The `tokenizer.ggml.pre` value written to the file.
    pub fn tokenizer_pre(self) -> &'static str {
        match self {
            TinyArch::Llama => "smollm",
            TinyArch::Qwen2 => "qwen2",
            TinyArch::Mistral => "llama-bpe",
        }
    }

    /// Whether attention Q/K/V have bias tensors.
    pub fn qkv_bias(self) -> bool {
        self == TinyArch::Qwen2
    }
}

/// Shape and content of a tiny random model.
#[derive(Clone, Debug, PartialEq)]
pub struct TinySpec {
    pub arch: TinyArch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_ctx: usize,
    /// Type of the 2-D weight matrices (norms and biases are always F32, as llama.cpp does).
    /// F32, F16 and BF16 are written directly; other types need
    /// [`tiny_model_bytes_with`] and an encoder (e.g. from microllm-kernels).
    pub weight_type: GgmlType,
    /// No `output.weight`: the output projection reuses `token_embd.weight`.
    pub tied_output: bool,
    /// Seed of all random weights; each tensor draws from its own stream named after it.
    pub seed: u64,
    /// Written as `{arch}.attention.sliding_window` when set.
    pub sliding_window: Option<u32>,
}

impl TinySpec {
    fn base(arch: TinyArch) -> Self {
        TinySpec {
            arch,
            n_layer: 2,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            n_ctx: 256,
            weight_type: GgmlType::F32,
            tied_output: true,
            seed: 0x5eed,
            sliding_window: None,
        }
    }

    /// SmolLM2-like: llama architecture, tied output.
    pub fn llama() -> Self {
        Self::base(TinyArch::Llama)
    }

    /// Qwen2-like: Q/K/V biases, tied output.
    pub fn qwen2() -> Self {
        Self::base(TinyArch::Qwen2)
    }

    /// Mistral-7B-like: untied output and a 64-token sliding window (smaller than n_ctx, so
    /// tests that run past 64 positions exercise it).
    pub fn mistral() -> Self {
        TinySpec {
            tied_output: false,
            sliding_window: Some(64),
            ..Self::base(TinyArch::Mistral)
        }
    }

    /// Per-head dimension: `n_embd / n_head`.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Vocabulary size of [`tiny_gpt2_vocab`].
    pub fn n_vocab(&self) -> usize {
        tiny_gpt2_vocab().0.len()
    }

    /// Checks the shape; the error says which constraint fails.
    pub fn validate(&self) -> Result<(), String> {
        let s = self;
        if s.n_layer == 0 || s.n_embd == 0 || s.n_head == 0 || s.n_head_kv == 0 || s.n_ff == 0 {
            return Err(format!("all sizes must be nonzero: {s:?}"));
        }
        if s.n_embd % s.n_head != 0 {
            return Err(format!(
                "n_embd {} is not a multiple of n_head {}",
                s.n_embd, s.n_head
            ));
        }
        if s.n_head % s.n_head_kv != 0 {
            return Err(format!(
                "n_head {} is not a multiple of n_head_kv {}",
                s.n_head, s.n_head_kv
            ));
        }
        if s.head_dim() % 2 != 0 {
            return Err(format!("head_dim {} must be even for RoPE", s.head_dim()));
        }
        Ok(())
    }
}

/// One tensor of a tiny model with its values as f32.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyTensor {
    /// GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// ggml order: `dims[0]` is the row length (input features).
    pub dims: Vec<u64>,
    /// Type the tensor is stored as.
    pub ty: GgmlType,
    /// Row-major values (`dims[0]` contiguous). For F16/BF16 they are already rounded to what
    /// the file stores; for quantized types they are the values before quantization.
    pub values: Vec<f32>,
}

/// Standard deviation of a weight matrix's entries: 0.5/sqrt(fan_in), kept in [0.02, 0.1],
/// so that with unit-RMS inputs each output has RMS about 0.5 and nothing explodes.
fn matrix_std(fan_in: usize) -> f32 {
    (0.5 / (fan_in as f32).sqrt()).clamp(0.02, 0.1)
}

/// All tensors of the model described by `spec`, in file order, with deterministic values.
///
/// # Panics
/// If `spec` fails [`TinySpec::validate`].
pub fn tiny_tensors(spec: &TinySpec) -> Vec<TinyTensor> {
    if let Err(e) = spec.validate() {
        panic!("invalid TinySpec: {e}");
    }
    let n_vocab = spec.n_vocab();
    let (e, hd) = (spec.n_embd, spec.head_dim());
    let (q_dim, kv_dim) = (spec.n_head * hd, spec.n_head_kv * hd);
    let mut out = Vec::new();

    let matrix = |name: String, n_in: usize, n_out: usize, std: f32| {
        let mut rng = SplitMix64::for_stream(spec.seed, &name);
        let values = (0..n_in * n_out).map(|_| rng.normal() * std).collect();
        TinyTensor {
            name,
            dims: vec![n_in as u64, n_out as u64],
            ty: spec.weight_type,
            values,
        }
    };
    let vector = |name: String, n: usize, kind: VecKind| {
        let mut rng = SplitMix64::for_stream(spec.seed, &name);
        let values = (0..n)
            .map(|_| match kind {
                VecKind::Norm => 1.0 + rng.uniform_in(-0.1, 0.1),
                VecKind::Bias => rng.normal() * 0.05,
            })
            .collect();
        TinyTensor {
            name,
            dims: vec![n as u64],
            ty: GgmlType::F32,
            values,
        }
    };

    out.push(matrix("token_embd.weight".into(), e, n_vocab, 0.1));
    for i in 0..spec.n_layer {
        let b = |s: &str| format!("blk.{i}.{s}");
        out.push(vector(b("attn_norm.weight"), e, VecKind::Norm));
        out.push(matrix(b("attn_q.weight"), e, q_dim, matrix_std(e)));
        if spec.arch.qkv_bias() {
            out.push(vector(b("attn_q.bias"), q_dim, VecKind::Bias));
        }
        out.push(matrix(b("attn_k.weight"), e, kv_dim, matrix_std(e)));
        if spec.arch.qkv_bias() {
            out.push(vector(b("attn_k.bias"), kv_dim, VecKind::Bias));
        }
        out.push(matrix(b("attn_v.weight"), e, kv_dim, matrix_std(e)));
        if spec.arch.qkv_bias() {
            out.push(vector(b("attn_v.bias"), kv_dim, VecKind::Bias));
        }
        out.push(matrix(b("attn_output.weight"), q_dim, e, matrix_std(q_dim)));
        out.push(vector(b("ffn_norm.weight"), e, VecKind::Norm));
        out.push(matrix(b("ffn_gate.weight"), e, spec.n_ff, matrix_std(e)));
        out.push(matrix(b("ffn_up.weight"), e, spec.n_ff, matrix_std(e)));
        out.push(matrix(
            b("ffn_down.weight"),
            spec.n_ff,
            e,
            matrix_std(spec.n_ff),
        ));
    }
    out.push(vector("output_norm.weight".into(), e, VecKind::Norm));
    if !spec.tied_output {
        out.push(matrix("output.weight".into(), e, n_vocab, 0.1));
    }

    // Make the f32 values exactly what the file will hold for the float types.
    for t in &mut out {
        match t.ty {
            GgmlType::F16 => t
                .values
                .iter_mut()
                .for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
            GgmlType::BF16 => t
                .values
                .iter_mut()
                .for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
            _ => {}
        }
    }
    out
}

#[derive(Clone, Copy)]
enum VecKind {
    Norm,
    Bias,
}

/// The metadata of the model described by `spec`, keyed like a llama.cpp conversion.
pub fn tiny_metadata(spec: &TinySpec) -> Metadata {
    let arch = spec.arch.gguf_arch();
    let k = |s: &str| format!("{arch}.{s}");
    let u32v = |x: usize| MetaValue::U32(x as u32);
    let (tokens, merges, types) = tiny_gpt2_vocab();

    let mut m = Metadata::new();
    m.insert("general.architecture", arch.into());
    m.insert("general.type", "model".into());
    m.insert(
        "general.name",
        format!(
            "Tiny random {:?} (microllm-testkit, seed {})",
            spec.arch, spec.seed
        )
        .into(),
    );
    m.insert(k("block_count"), u32v(spec.n_layer));
    m.insert(k("context_length"), u32v(spec.n_ctx));
    m.insert(k("embedding_length"), u32v(spec.n_embd));
    m.insert(k("feed_forward_length"), u32v(spec.n_ff));
    m.insert(k("attention.head_count"), u32v(spec.n_head));
    m.insert(k("attention.head_count_kv"), u32v(spec.n_head_kv));
    m.insert(k("rope.freq_base"), MetaValue::F32(10000.0));
    m.insert(k("attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-5));
    if let Some(w) = spec.sliding_window {
        m.insert(k("attention.sliding_window"), MetaValue::U32(w));
    }
    if let Some(ft) = file_type(spec.weight_type) {
        m.insert("general.file_type", MetaValue::U32(ft));
    }
    if spec.weight_type.is_quantized() {
        m.insert("general.quantization_version", MetaValue::U32(2));
    }
    m.insert(k("vocab_size"), u32v(tokens.len()));
    m.insert(k("rope.dimension_count"), u32v(spec.head_dim()));
    m.insert("tokenizer.ggml.add_space_prefix", MetaValue::Bool(false));
    m.insert("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));
    m.insert("tokenizer.ggml.model", "gpt2".into());
    m.insert("tokenizer.ggml.pre", spec.arch.tokenizer_pre().into());
    m.insert("tokenizer.ggml.tokens", tokens.into());
    m.insert("tokenizer.ggml.token_type", types.into());
    m.insert("tokenizer.ggml.merges", merges.into());
    m.insert("tokenizer.ggml.bos_token_id", MetaValue::U32(IM_START_ID));
    m.insert("tokenizer.ggml.eos_token_id", MetaValue::U32(IM_END_ID));
    m.insert(
        "tokenizer.ggml.unknown_token_id",
        MetaValue::U32(ENDOFTEXT_ID),
    );
    m.insert("tokenizer.ggml.padding_token_id", MetaValue::U32(IM_END_ID));
    m.insert("tokenizer.chat_template", CHATML_TEMPLATE.into());
    m
}

fn encode_float(t: &TinyTensor) -> Vec<u8> {
    match t.ty {
        GgmlType::F32 => t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => t
            .values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => t
            .values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        other => panic!(
            "tiny_model_bytes cannot encode {other} weights itself; call tiny_model_bytes_with \
             and pass an encoder (e.g. a quantize_ref from microllm-kernels)"
        ),
    }
}

/// A complete, valid GGUF file for `spec`.
///
/// # Panics
/// If `spec` is invalid or `spec.weight_type` is not F32, F16 or BF16
/// (use [`tiny_model_bytes_with`] for quantized types).
pub fn tiny_model_bytes(spec: &TinySpec) -> Vec<u8> {
    to_bytes_or_panic(spec, None)
}

/// Like [`tiny_model_bytes`], with `encode(ty, dims, values) -> bytes` called for every tensor
/// whose type is not F32/F16/BF16 (i.e. the quantized weight matrices). The bytes must be
/// exactly `ty.row_size(dims[0]) * n_rows` long; row lengths (n_embd, n_ff, head sizes)
/// must then be multiples of the type's block size.
///
/// # Panics
/// If `spec` is invalid or `encode` returns the wrong number of bytes.
pub fn tiny_model_bytes_with(spec: &TinySpec, encode: &EncodeFn) -> Vec<u8> {
    to_bytes_or_panic(spec, Some(encode))
}

/// Writes [`tiny_model_bytes`]`(spec)` to `path` (atomically: temp file + rename).
///
/// # Panics
/// As [`tiny_model_bytes`].
pub fn write_tiny_model(spec: &TinySpec, path: &Path) -> std::io::Result<()> {
    let w = writer_or_panic(spec, None);
    w.write_file(path).map_err(|e| match e {
        GgufError::Io { source, .. } => source,
        other => std::io::Error::other(other),
    })
}

/// Encodes f32 values (row-major, `dims[0]` contiguous) into tensor bytes of a given type.
pub type EncodeFn = dyn Fn(GgmlType, &[u64], &[f32]) -> Vec<u8>;

type Encoder<'e> = Option<&'e EncodeFn>;

fn to_bytes_or_panic(spec: &TinySpec, encode: Encoder<'_>) -> Vec<u8> {
    match writer_or_panic(spec, encode).to_bytes() {
        Ok(b) => b,
        Err(e) => panic!("writing tiny model {:?} failed: {e}", spec.arch),
    }
}

fn writer_or_panic(spec: &TinySpec, encode: Encoder<'_>) -> GgufWriter<'static> {
    match writer(spec, encode) {
        Ok(w) => w,
        Err(e) => panic!("building tiny model {:?} failed: {e}", spec.arch),
    }
}

/// llama.cpp's `general.file_type` (`enum llama_ftype`) for a model whose matrices are `ty`.
fn file_type(ty: GgmlType) -> Option<u32> {
    use GgmlType::*;
    Some(match ty {
        F32 => 0,
        F16 => 1,
        Q4_0 => 2,
        Q4_1 => 3,
        Q8_0 => 7,
        Q5_0 => 8,
        Q5_1 => 9,
        Q2_K => 10,
        Q3_K => 12,
        Q4_K => 15,
        Q5_K => 17,
        Q6_K => 18,
        BF16 => 32,
        _ => return None,
    })
}

fn writer(spec: &TinySpec, encode: Encoder<'_>) -> Result<GgufWriter<'static>, GgufError> {
    let mut w = GgufWriter::new();
    *w.metadata_mut() = tiny_metadata(spec);
    for t in tiny_tensors(spec) {
        let bytes = match (t.ty, encode) {
            (GgmlType::F32 | GgmlType::F16 | GgmlType::BF16, _) | (_, None) => encode_float(&t),
            (ty, Some(enc)) => enc(ty, &t.dims, &t.values),
        };
        w.add_tensor(&t.name, &t.dims, t.ty, Cow::Owned(bytes))?;
    }
    Ok(w)
}

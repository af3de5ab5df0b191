//! Tiny random models: specs, their weights as f32, and GGUF files built from them.

use std::borrow::Cow;
use std::path::Path;

use microllm_gguf::{GgmlType, GgufError, GgufWriter, MetaValue, Metadata};

use crate::rng::SplitMix64;
use crate::vocab::{
    phi3_added_token_id, tiny_gpt2_vocab, tiny_phi3_vocab, tiny_spm_vocab, CHATML_TEMPLATE,
    ENDOFTEXT_ID, IM_END_ID, IM_START_ID, PHI3_BOS_ID, PHI3_EOS_ID, PHI3_TEMPLATE, PHI3_UNK_ID,
    SPM_BOS_ID, SPM_EOS_ID, SPM_PAD_ID, SPM_UNK_ID,
};

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
    /// `general.architecture = "gemma2"`: post-attention/post-FFN norms, GeGLU, attention and
    /// final-logit soft-capping, sliding window on every other layer, explicit head size.
    Gemma2,
    /// `general.architecture = "gemma3"`: Gemma 2 without attention soft-capping, plus
    /// per-head Q/K norms and 5 local : 1 global layers with their own RoPE bases.
    Gemma3,
    /// `general.architecture = "phi3"`: fused `attn_qkv` and `ffn_up` = [gate; up], NeoX RoPE,
    /// optionally Phi-3.5's long-context RoPE factors.
    Phi3,
}

impl TinyArch {
    /// The `general.architecture` value written to the file (also the metadata key prefix).
    pub fn gguf_arch(self) -> &'static str {
        match self {
            TinyArch::Llama | TinyArch::Mistral => "llama",
            TinyArch::Qwen2 => "qwen2",
            TinyArch::Gemma2 => "gemma2",
            TinyArch::Gemma3 => "gemma3",
            TinyArch::Phi3 => "phi3",
        }
    }

    /// The `tokenizer.ggml.pre` value written to the file.
    pub fn tokenizer_pre(self) -> &'static str {
        match self {
            TinyArch::Llama => "smollm",
            TinyArch::Qwen2 => "qwen2",
            TinyArch::Mistral => "llama-bpe",
            TinyArch::Gemma2 | TinyArch::Gemma3 | TinyArch::Phi3 => "default",
        }
    }

    /// Whether attention Q/K/V have bias tensors.
    pub fn qkv_bias(self) -> bool {
        self == TinyArch::Qwen2
    }

    /// Gemma 2 or 3: post-norms around attention and FFN, GeGLU.
    pub fn is_gemma(self) -> bool {
        matches!(self, TinyArch::Gemma2 | TinyArch::Gemma3)
    }

    /// Whether Q/K/V are one fused `attn_qkv` tensor and `ffn_up` holds [gate; up] (Phi-3).
    pub fn fused(self) -> bool {
        self == TinyArch::Phi3
    }

    /// Llama, Qwen2 and Mistral: the original testkit layout (kept byte for byte).
    fn is_llama_family(self) -> bool {
        matches!(self, TinyArch::Llama | TinyArch::Qwen2 | TinyArch::Mistral)
    }
}

/// Which tokenizer a tiny model carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TinyVocab {
    /// [`crate::tiny_gpt2_vocab`]: byte-level BPE (`tokenizer.ggml.model = "gpt2"`), ChatML
    /// specials and template, like SmolLM2.
    Gpt2,
    /// [`crate::tiny_spm_vocab`]: SentencePiece-style (`tokenizer.ggml.model = "llama"`) with
    /// scores and `<0xXX>` byte tokens, BOS added, no space prefix, like Gemma.
    Spm,
    /// [`crate::tiny_phi3_vocab`]: SentencePiece-style in Llama 2 / Phi-3's layout (`<unk>`,
    /// `<s>`, `</s>`, added `<|endoftext|>`, `<|user|>`, ... tokens), Phi-3's chat template,
    /// no BOS added, the default space prefix.
    Phi3,
}

/// Phi-3.5-style long-context RoPE: `rope_factors_long.weight` / `rope_factors_short.weight`
/// (n_rot/2 divisors of the rotary frequencies each), the original training context that
/// decides between them, and the cos/sin multiplier `rope.scaling.attn_factor`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LongRope {
    /// `rope.scaling.original_context_length`: llama.cpp uses the short factors while its
    /// context is at most this, the long ones beyond.
    pub n_ctx_orig: usize,
    /// `rope.scaling.attn_factor`.
    pub attn_factor: f32,
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
    /// Per-head width of Q/K/V, written as `attention.key_length` and `value_length` (Gemma,
    /// whose heads are not n_embd / n_head wide). `None`: n_embd / n_head, no keys.
    pub key_length: Option<usize>,
    /// `attention.layer_norm_rms_epsilon`.
    pub rms_eps: f32,
    /// `rope.freq_base`; `None` leaves the key out (Gemma 2 files: llama.cpp's default 10000).
    pub rope_base: Option<f32>,
    /// `rope.freq_base_swa` (Gemma: the base of the sliding-window layers) when set.
    pub rope_base_swa: Option<f32>,
    /// `attn_logit_softcapping` (Gemma 2) when set.
    pub attn_softcap: Option<f32>,
    /// `final_logit_softcapping` (Gemma 2) when set.
    pub final_softcap: Option<f32>,
    /// Phi-3.5-style RoPE factors and attention factor (Phi-3 only).
    pub long_rope: Option<LongRope>,
    /// The tokenizer written to the file.
    pub vocab: TinyVocab,
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
            key_length: None,
            rms_eps: 1e-5,
            rope_base: Some(10000.0),
            rope_base_swa: None,
            attn_softcap: None,
            final_softcap: None,
            long_rope: None,
            vocab: TinyVocab::Gpt2,
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

    /// Gemma-2-2B-like in miniature: 2 layers (sliding-window, then global), heads of 32 wide
    /// with n_embd 64 (so q_dim 128 != n_embd, as Gemma's key_length makes possible), a 4-token
    /// window so that a short sequence crosses it, and soft-caps far below Gemma 2's 50 / 30
    /// so that they bend these small activations measurably. SentencePiece vocabulary, no
    /// `rope.freq_base` key (as real Gemma 2 files). Tied output.
    pub fn gemma2() -> Self {
        TinySpec {
            key_length: Some(32),
            rms_eps: 1e-6,
            rope_base: None,
            sliding_window: Some(4),
            attn_softcap: Some(1.0),
            final_softcap: Some(2.0),
            vocab: TinyVocab::Spm,
            ..Self::base(TinyArch::Gemma2)
        }
    }

    /// Gemma-3-270M-like in miniature: 6 layers (5 sliding-window + 1 global, llama.cpp's
    /// default pattern), one KV head, heads of 32 wide with n_embd 64, per-head Q/K norms,
    /// RoPE base 1e6 for global layers and the default 10000 for local ones (no
    /// `rope.freq_base_swa` key, as the real 270M file), a 4-token window, no soft-capping.
    /// SentencePiece vocabulary, tied output.
    pub fn gemma3() -> Self {
        TinySpec {
            n_layer: 6,
            n_head_kv: 1,
            key_length: Some(32),
            rms_eps: 1e-6,
            rope_base: Some(1_000_000.0),
            sliding_window: Some(4),
            vocab: TinyVocab::Spm,
            ..Self::base(TinyArch::Gemma3)
        }
    }

    /// Phi-3.5-mini-like in miniature: fused QKV and gate/up tensors, GQA, untied output,
    /// long-context RoPE factors with a trained context 8x the original one (so the file
    /// carries `rope.scaling.attn_factor` = sqrt(1 + ln 8 / ln 1024), as the converter writes
    /// it), and a `sliding_window` key that llama.cpp ignores for Phi-3. Phi-3's
    /// SentencePiece layout and chat tokens.
    pub fn phi3() -> Self {
        let scale = 8.0f32;
        let n_ctx_orig = 1024;
        TinySpec {
            n_ctx: 8 * n_ctx_orig,
            tied_output: false,
            sliding_window: Some(4),
            long_rope: Some(LongRope {
                n_ctx_orig,
                attn_factor: (1.0 + scale.ln() / (n_ctx_orig as f32).ln()).sqrt(),
            }),
            vocab: TinyVocab::Phi3,
            ..Self::base(TinyArch::Phi3)
        }
    }

    /// A spec by name: an architecture (`llama`, `qwen2`, `mistral`, `gemma2`, `gemma3`,
    /// `phi3`), optionally followed by `-` and a weight type (`gemma3-q8_0`, `llama-f16`).
    pub fn named(name: &str) -> Option<Self> {
        let (arch, ty) = match name.split_once('-') {
            Some((a, t)) => (a, Some(t)),
            None => (name, None),
        };
        let mut spec = match arch {
            "llama" => Self::llama(),
            "qwen2" => Self::qwen2(),
            "mistral" => Self::mistral(),
            "gemma2" => Self::gemma2(),
            "gemma3" => Self::gemma3(),
            "phi3" => Self::phi3(),
            _ => return None,
        };
        if let Some(t) = ty {
            spec.weight_type = GgmlType::ALL
                .into_iter()
                .find(|g| g.name().eq_ignore_ascii_case(t))?;
        }
        Some(spec)
    }

    /// Per-head dimension: `key_length`, else `n_embd / n_head`.
    pub fn head_dim(&self) -> usize {
        self.key_length.unwrap_or(self.n_embd / self.n_head.max(1))
    }

    /// Vocabulary size of the spec's tokenizer.
    pub fn n_vocab(&self) -> usize {
        match self.vocab {
            TinyVocab::Gpt2 => tiny_gpt2_vocab().0.len(),
            TinyVocab::Spm => tiny_spm_vocab().0.len(),
            TinyVocab::Phi3 => tiny_phi3_vocab().0.len(),
        }
    }

    /// Checks the shape; the error says which constraint fails.
    pub fn validate(&self) -> Result<(), String> {
        let s = self;
        if s.n_layer == 0 || s.n_embd == 0 || s.n_head == 0 || s.n_head_kv == 0 || s.n_ff == 0 {
            return Err(format!("all sizes must be nonzero: {s:?}"));
        }
        if s.key_length.is_none() && !s.n_embd.is_multiple_of(s.n_head) {
            return Err(format!(
                "n_embd {} is not a multiple of n_head {}",
                s.n_embd, s.n_head
            ));
        }
        if !s.n_head.is_multiple_of(s.n_head_kv) {
            return Err(format!(
                "n_head {} is not a multiple of n_head_kv {}",
                s.n_head, s.n_head_kv
            ));
        }
        if !s.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", s.head_dim()));
        }
        if s.arch.fused() && s.n_head * s.head_dim() != s.n_embd {
            return Err(format!(
                "phi3 needs n_head * head_dim == n_embd (its attn_output is n_embd x n_embd): {s:?}"
            ));
        }
        if s.long_rope.is_some() && s.arch != TinyArch::Phi3 {
            return Err("long_rope is a Phi-3 feature".into());
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
                VecKind::RopeShort => rng.uniform_in(1.0, 1.5),
                VecKind::RopeLong => rng.uniform_in(1.0, 40.0),
            })
            .collect();
        TinyTensor {
            name,
            dims: vec![n as u64],
            ty: GgmlType::F32,
            values,
        }
    };

    if spec.long_rope.is_some() {
        let n = spec.head_dim() / 2;
        // Phi-3.5's factors: short ones near 1, long ones growing to tens.
        out.push(vector(
            "rope_factors_long.weight".into(),
            n,
            VecKind::RopeLong,
        ));
        out.push(vector(
            "rope_factors_short.weight".into(),
            n,
            VecKind::RopeShort,
        ));
    }
    out.push(matrix("token_embd.weight".into(), e, n_vocab, 0.1));
    for i in 0..spec.n_layer {
        let b = |s: &str| format!("blk.{i}.{s}");
        out.push(vector(b("attn_norm.weight"), e, VecKind::Norm));
        if spec.arch.fused() {
            out.push(matrix(
                b("attn_qkv.weight"),
                e,
                q_dim + 2 * kv_dim,
                matrix_std(e),
            ));
        } else {
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
        }
        if spec.arch == TinyArch::Gemma3 {
            out.push(vector(b("attn_q_norm.weight"), hd, VecKind::Norm));
            out.push(vector(b("attn_k_norm.weight"), hd, VecKind::Norm));
        }
        out.push(matrix(b("attn_output.weight"), q_dim, e, matrix_std(q_dim)));
        if spec.arch.is_gemma() {
            out.push(vector(b("post_attention_norm.weight"), e, VecKind::Norm));
        }
        out.push(vector(b("ffn_norm.weight"), e, VecKind::Norm));
        if spec.arch.fused() {
            // [gate; up]: rows 0..n_ff are the gate, n_ff..2*n_ff the up projection.
            out.push(matrix(b("ffn_up.weight"), e, 2 * spec.n_ff, matrix_std(e)));
        } else {
            out.push(matrix(b("ffn_gate.weight"), e, spec.n_ff, matrix_std(e)));
            out.push(matrix(b("ffn_up.weight"), e, spec.n_ff, matrix_std(e)));
        }
        out.push(matrix(
            b("ffn_down.weight"),
            spec.n_ff,
            e,
            matrix_std(spec.n_ff),
        ));
        if spec.arch.is_gemma() {
            out.push(vector(b("post_ffw_norm.weight"), e, VecKind::Norm));
        }
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
    RopeShort,
    RopeLong,
}

/// The metadata of the model described by `spec`, keyed like a llama.cpp conversion of the
/// architecture it imitates (the same keys its converter writes, in a similar order).
pub fn tiny_metadata(spec: &TinySpec) -> Metadata {
    let arch = spec.arch.gguf_arch();
    let k = |s: &str| format!("{arch}.{s}");
    let u32v = |x: usize| MetaValue::U32(x as u32);

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
    if let Some(lr) = spec.long_rope {
        m.insert(
            k("rope.scaling.original_context_length"),
            u32v(lr.n_ctx_orig),
        );
    }
    m.insert(k("embedding_length"), u32v(spec.n_embd));
    m.insert(k("feed_forward_length"), u32v(spec.n_ff));
    m.insert(k("attention.head_count"), u32v(spec.n_head));
    m.insert(k("attention.head_count_kv"), u32v(spec.n_head_kv));
    if let Some(kl) = spec.key_length {
        m.insert(k("attention.key_length"), u32v(kl));
        m.insert(k("attention.value_length"), u32v(kl));
    }
    if let Some(base) = spec.rope_base {
        m.insert(k("rope.freq_base"), MetaValue::F32(base));
    }
    if let Some(base) = spec.rope_base_swa {
        m.insert(k("rope.freq_base_swa"), MetaValue::F32(base));
    }
    m.insert(
        k("attention.layer_norm_rms_epsilon"),
        MetaValue::F32(spec.rms_eps),
    );
    if let Some(w) = spec.sliding_window {
        m.insert(k("attention.sliding_window"), MetaValue::U32(w));
    }
    if let Some(cap) = spec.attn_softcap {
        m.insert(k("attn_logit_softcapping"), MetaValue::F32(cap));
    }
    if let Some(cap) = spec.final_softcap {
        m.insert(k("final_logit_softcapping"), MetaValue::F32(cap));
    }
    if let Some(lr) = spec.long_rope {
        m.insert(
            k("rope.scaling.attn_factor"),
            MetaValue::F32(lr.attn_factor),
        );
    }
    if let Some(ft) = file_type(spec.weight_type) {
        m.insert("general.file_type", MetaValue::U32(ft));
    }
    if spec.weight_type.is_quantized() {
        m.insert("general.quantization_version", MetaValue::U32(2));
    }
    // The llama-family converters write these two; Gemma's do not (n_rot defaults to the
    // head size); Phi-3's writes the rotary dimension count.
    if spec.arch.is_llama_family() {
        m.insert(k("vocab_size"), u32v(spec.n_vocab()));
    }
    if spec.arch.is_llama_family() || spec.arch.fused() {
        m.insert(k("rope.dimension_count"), u32v(spec.head_dim()));
    }
    match spec.vocab {
        TinyVocab::Gpt2 => insert_gpt2_tokenizer(&mut m, spec),
        TinyVocab::Spm => insert_spm_tokenizer(&mut m, spec),
        TinyVocab::Phi3 => insert_phi3_tokenizer(&mut m, spec),
    }
    m
}

fn insert_gpt2_tokenizer(m: &mut Metadata, spec: &TinySpec) {
    let (tokens, merges, types) = tiny_gpt2_vocab();
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
}

/// As Gemma's conversions: SentencePiece model, scores, types, BOS added, no space prefix.
fn insert_spm_tokenizer(m: &mut Metadata, spec: &TinySpec) {
    let (tokens, scores, types) = tiny_spm_vocab();
    m.insert("tokenizer.ggml.model", "llama".into());
    m.insert("tokenizer.ggml.pre", spec.arch.tokenizer_pre().into());
    m.insert("tokenizer.ggml.tokens", tokens.into());
    m.insert("tokenizer.ggml.scores", scores.into());
    m.insert("tokenizer.ggml.token_type", types.into());
    m.insert("tokenizer.ggml.bos_token_id", MetaValue::U32(SPM_BOS_ID));
    m.insert("tokenizer.ggml.eos_token_id", MetaValue::U32(SPM_EOS_ID));
    m.insert(
        "tokenizer.ggml.unknown_token_id",
        MetaValue::U32(SPM_UNK_ID),
    );
    m.insert(
        "tokenizer.ggml.padding_token_id",
        MetaValue::U32(SPM_PAD_ID),
    );
    m.insert("tokenizer.ggml.add_bos_token", MetaValue::Bool(true));
    m.insert("tokenizer.ggml.add_eos_token", MetaValue::Bool(false));
    m.insert("tokenizer.ggml.add_space_prefix", MetaValue::Bool(false));
}

/// As Phi-3's conversions: SentencePiece model, chat tokens, `<|endoftext|>` as EOS and padding.
fn insert_phi3_tokenizer(m: &mut Metadata, spec: &TinySpec) {
    let (tokens, scores, types) = tiny_phi3_vocab();
    let eot = phi3_added_token_id("<|endoftext|>").unwrap_or(PHI3_EOS_ID);
    m.insert("tokenizer.ggml.model", "llama".into());
    m.insert("tokenizer.ggml.pre", spec.arch.tokenizer_pre().into());
    m.insert("tokenizer.ggml.tokens", tokens.into());
    m.insert("tokenizer.ggml.scores", scores.into());
    m.insert("tokenizer.ggml.token_type", types.into());
    m.insert("tokenizer.ggml.bos_token_id", MetaValue::U32(PHI3_BOS_ID));
    m.insert("tokenizer.ggml.eos_token_id", MetaValue::U32(eot));
    m.insert(
        "tokenizer.ggml.unknown_token_id",
        MetaValue::U32(PHI3_UNK_ID),
    );
    m.insert("tokenizer.ggml.padding_token_id", MetaValue::U32(eot));
    m.insert("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));
    m.insert("tokenizer.ggml.add_eos_token", MetaValue::Bool(false));
    m.insert("tokenizer.chat_template", PHI3_TEMPLATE.into());
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

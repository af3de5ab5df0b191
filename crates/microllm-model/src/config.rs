//! Hyper-parameters read from GGUF metadata, with every architecture difference spelled out as
//! an explicit field (never a string match on the architecture inside the maths).

use microllm_gguf::Metadata;

use crate::ModelError;

/// The architectures this build can run (the `general.architecture` value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Arch {
    /// Every supported `general.architecture` value, for error messages and `inspect`.
    pub const SUPPORTED: &'static [&'static str] =
        &["llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "mistral" => Some(Arch::Mistral),
            "gemma2" => Some(Arch::Gemma2),
            "gemma3" => Some(Arch::Gemma3),
            "phi3" => Some(Arch::Phi3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }

    /// How this architecture's GGUF conversion lays out the rotary pairs.
    fn rope_style(self) -> RopeStyle {
        match self {
            // The llama converter permutes Q/K rows so that pairs are adjacent.
            Arch::Llama | Arch::Mistral => RopeStyle::Normal,
            Arch::Qwen2 | Arch::Gemma2 | Arch::Gemma3 | Arch::Phi3 => RopeStyle::Neox,
        }
    }
}

/// Which dimensions RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)` (GPT-J style, llama's GGUF layout).
    Normal,
    /// Pairs `(i, i + n_rot/2)` (GPT-NeoX style).
    Neox,
}

/// Context-extension scaling of the rotary frequencies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (`rope.scaling.type = linear`).
    Linear {
        factor: f32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub style: RopeStyle,
    /// `rope.freq_base`.
    pub base: f32,
    /// Rotated dimensions per head (`rope.dimension_count`, default head_dim).
    pub n_rot: usize,
    pub scaling: RopeScaling,
    /// Multiplies cos/sin (`rope.scaling.attn_factor`, Phi-3 long-context models; 1 = none).
    pub attn_factor: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub name: Option<String>,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Per-head width of Q and K (`attention.key_length`, default n_embd / n_head).
    pub head_dim: usize,
    /// Per-head width of V (`attention.value_length`, default head_dim).
    pub head_dim_v: usize,
    /// Trained context length (`context_length`).
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope: RopeConfig,
    /// Sliding-window attention span in tokens.
    pub sliding_window: Option<usize>,
    /// Per layer: whether the sliding window applies (all layers for Mistral; Gemma
    /// interleaves local and global layers).
    pub swa_layers: Vec<bool>,
    /// RoPE base of the sliding-window layers when it differs (Gemma 3's local layers).
    pub rope_base_swa: Option<f32>,
    /// Input embeddings are multiplied by this (Gemma: sqrt(n_embd)).
    pub embed_scale: Option<f32>,
    /// Queries are multiplied by this before attention (Gemma); the attention itself then
    /// uses `kq_scale`.
    pub q_scale: Option<f32>,
    /// Scale of the attention scores inside attention (1/sqrt(head_dim) for Llama).
    pub kq_scale: f32,
    /// Attention-score soft-capping (Gemma 2): `cap * tanh(score / cap)`.
    pub attn_softcap: Option<f32>,
    /// Final-logit soft-capping (Gemma 2).
    pub final_softcap: Option<f32>,
    /// The FFN's gate activation.
    pub ffn_act: FfnAct,
}

/// The gated FFN's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnAct {
    /// SwiGLU (Llama family).
    Silu,
    /// GeGLU with the tanh GELU (Gemma).
    GeluTanh,
}

/// Caps on hyper-parameters: a hostile file must not make us allocate terabytes.
const MAX_DIM: usize = 1 << 20;
const MAX_LAYERS: usize = 1024;
const MAX_HEADS: usize = 4096;
const MAX_CTX: usize = 1 << 24;

impl Config {
    /// Reads the hyper-parameters. `n_vocab_tensor` is the vocabulary size implied by the
    /// token embedding's shape (used when `{arch}.vocab_size` is absent).
    pub fn from_metadata(md: &Metadata, n_vocab_tensor: Option<usize>) -> Result<Self, ModelError> {
        let arch_name = md
            .get_str("general.architecture")?
            .ok_or(ModelError::MissingKey("general.architecture".into()))?;
        let arch = Arch::from_name(arch_name).ok_or_else(|| ModelError::UnsupportedArch {
            arch: arch_name.to_string(),
            supported: Arch::SUPPORTED.join(", "),
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str, max: usize| -> Result<usize, ModelError> {
            let full = key(k);
            let v = md
                .get_u64(&full)?
                .ok_or_else(|| ModelError::MissingKey(full.clone()))?;
            check_range(&full, v, 1, max)
        };
        let opt = |k: &str, max: usize| -> Result<Option<usize>, ModelError> {
            let full = key(k);
            match md.get_u64(&full)? {
                Some(v) => Ok(Some(check_range(&full, v, 1, max)?)),
                None => Ok(None),
            }
        };

        let n_embd = req("embedding_length", MAX_DIM)?;
        let n_layer = req("block_count", MAX_LAYERS)?;
        let n_ff = req("feed_forward_length", MAX_DIM)?;
        let n_head = req("attention.head_count", MAX_HEADS)?;
        let n_head_kv = opt("attention.head_count_kv", MAX_HEADS)?.unwrap_or(n_head);
        let n_ctx_train = req("context_length", MAX_CTX)?;
        if n_head % n_head_kv != 0 {
            return Err(ModelError::BadConfig(format!(
                "attention.head_count ({n_head}) is not a multiple of attention.head_count_kv ({n_head_kv})"
            )));
        }
        let head_dim = match opt("attention.key_length", MAX_DIM)? {
            Some(v) => v,
            None => {
                if n_embd % n_head != 0 {
                    return Err(ModelError::BadConfig(format!(
                        "embedding_length ({n_embd}) is not a multiple of attention.head_count ({n_head})"
                    )));
                }
                n_embd / n_head
            }
        };
        let head_dim_v = opt("attention.value_length", MAX_DIM)?.unwrap_or(head_dim);
        let n_rot = opt("rope.dimension_count", MAX_DIM)?.unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(ModelError::BadConfig(format!(
                "rope.dimension_count ({n_rot}) must be even and at most the head size ({head_dim})"
            )));
        }
        let n_vocab = match opt("vocab_size", MAX_DIM * 4)? {
            Some(v) => v,
            None => n_vocab_tensor.ok_or_else(|| ModelError::MissingKey(key("vocab_size")))?,
        };
        let rms_eps = md
            .get_f32(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
            return Err(ModelError::BadConfig(format!(
                "attention.layer_norm_rms_epsilon = {rms_eps} is out of range (0, 1)"
            )));
        }
        let base = md.get_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        if !(base.is_finite() && base > 1.0) {
            return Err(ModelError::BadConfig(format!(
                "rope.freq_base = {base} must be a finite number above 1"
            )));
        }
        let scaling = match md.get_str(&key("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => {
                let factor = md.get_f32(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(ModelError::BadConfig(format!(
                        "rope.scaling.factor = {factor} must be positive"
                    )));
                }
                RopeScaling::Linear { factor }
            }
            Some(other) => {
                return Err(ModelError::BadConfig(format!(
                    "rope.scaling.type '{other}' is not supported (supported: none, linear; llama3 \
                     scaling is read from the rope_freqs.weight tensor)"
                )))
            }
        };
        // llama.cpp disables Phi-3's sliding window (its converters store it inconsistently);
        // we follow, so that results match.
        let sliding_window = match arch {
            Arch::Phi3 => None,
            _ => opt("attention.sliding_window", MAX_CTX)?,
        };
        let gemma = matches!(arch, Arch::Gemma2 | Arch::Gemma3);
        // Which layers use the window: an explicit per-layer pattern if the file has one,
        // else the architecture's default (llama.cpp's): Gemma 3 makes every 6th layer global,
        // Gemma 2 every 2nd; Mistral applies the window everywhere.
        let swa_layers = match sliding_window {
            None => vec![false; n_layer],
            Some(_) => {
                let key_pat = key("attention.sliding_window_pattern");
                let default_period = match arch {
                    Arch::Gemma3 => 6,
                    Arch::Gemma2 => 2,
                    _ => 0,
                };
                match md.get(&key_pat) {
                    Some(microllm_gguf::MetaValue::Array(_)) => {
                        let pat = md.get_u32_array_lossless(&key_pat)?.unwrap_or_default();
                        if pat.len() != n_layer {
                            return Err(ModelError::BadConfig(format!(
                                "{key_pat} has {} entries for {n_layer} layers",
                                pat.len()
                            )));
                        }
                        pat.into_iter().map(|v| v != 0).collect()
                    }
                    _ => {
                        let period = md.get_u32(&key_pat)?.map_or(default_period, |p| p as usize);
                        (0..n_layer)
                            .map(|il| period == 0 || il % period < period - 1)
                            .collect()
                    }
                }
            }
        };
        let rope_base_swa = if gemma && sliding_window.is_some() {
            Some(md.get_f32(&key("rope.freq_base_swa"))?.unwrap_or(10_000.0))
        } else {
            None
        };
        let softcap = |k: &str| -> Result<Option<f32>, ModelError> {
            Ok(md.get_f32(&key(k))?.filter(|v| *v != 0.0))
        };
        // Gemma and Phi-3 scale queries by 1/sqrt(head_dim) before attention (llama.cpp applies
        // it as a separate op, so the attention's own scale is 1).
        let (q_scale, kq_scale) = if gemma || arch == Arch::Phi3 {
            (Some(1.0 / (head_dim as f32).sqrt()), 1.0)
        } else {
            (None, 1.0 / (head_dim as f32).sqrt())
        };
        Ok(Config {
            arch,
            name: md.get_str("general.name")?.map(str::to_string),
            n_vocab,
            n_embd,
            n_layer,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            head_dim_v,
            n_ctx_train,
            rms_eps,
            rope: RopeConfig {
                style: arch.rope_style(),
                base,
                n_rot,
                scaling,
                attn_factor: md
                    .get_f32(&key("rope.scaling.attn_factor"))?
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .unwrap_or(1.0),
            },
            sliding_window,
            swa_layers,
            rope_base_swa,
            embed_scale: gemma.then(|| (n_embd as f32).sqrt()),
            q_scale,
            kq_scale,
            attn_softcap: if arch == Arch::Gemma2 {
                softcap("attn_logit_softcapping")?
            } else {
                None
            },
            final_softcap: if gemma {
                softcap("final_logit_softcapping")?
            } else {
                None
            },
            ffn_act: if gemma {
                FfnAct::GeluTanh
            } else {
                FfnAct::Silu
            },
        })
    }

    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    /// Width of the concatenated key heads.
    pub fn k_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
    /// Width of the concatenated value heads.
    pub fn v_dim(&self) -> usize {
        self.n_head_kv * self.head_dim_v
    }
}

fn check_range(key: &str, v: u64, min: usize, max: usize) -> Result<usize, ModelError> {
    if v < min as u64 || v > max as u64 {
        return Err(ModelError::BadConfig(format!(
            "{key} = {v} is out of range [{min}, {max}]"
        )));
    }
    Ok(v as usize)
}

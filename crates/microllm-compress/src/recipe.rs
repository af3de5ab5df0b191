//! Which ggml type every tensor gets: llama.cpp's `llama-quantize` recipes.
//!
//! The decisions follow `src/llama-quant.cpp` (llama.cpp 0.3.36): `tensor_allows_quantization`
//! (only 2-D+ tensors named `*weight`, never norms, MoE routers or positional embeddings),
//! `llama_tensor_get_type_impl` (the mixes: more bits for `attn_v` and `ffn_down` in the
//! layers `use_more_bits` picks, the output / tied token embedding at Q6_K or Q8_0 …) and
//! `tensor_type_fallback` (rows not a multiple of 256: Q2_K/Q3_K → Q4_0, Q4_K → Q5_0,
//! Q5_K → Q5_1, Q6_K → Q8_0; a 32-block type that still does not fit → F16). The per-layer
//! counters run over the tensors in llama.cpp's order (layer number, then name).
//!
//! Not reproduced, because microllm runs none of these models: the Falcon, 70B and
//! mixture-of-experts special cases, and the IQ file types (whose formats this build lacks).

use microllm_gguf::{GgmlType, GgufFile};
use regex::Regex;

use crate::CompressError;

/// A target file type: what `microllm quantize IN OUT TYPE` is asked for, and what it writes
/// as `general.file_type` (llama.cpp's `enum llama_ftype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2_K,
    Q3_K_S,
    Q3_K_M,
    Q3_K_L,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
}

/// (file type, name, llama_ftype id, default tensor type).
const FILE_TYPES: [(FileType, &str, u32, GgmlType); 17] = {
    use FileType as F;
    use GgmlType as G;
    [
        (F::F32, "F32", 0, G::F32),
        (F::F16, "F16", 1, G::F16),
        (F::BF16, "BF16", 32, G::BF16),
        (F::Q8_0, "Q8_0", 7, G::Q8_0),
        (F::Q4_0, "Q4_0", 2, G::Q4_0),
        (F::Q4_1, "Q4_1", 3, G::Q4_1),
        (F::Q5_0, "Q5_0", 8, G::Q5_0),
        (F::Q5_1, "Q5_1", 9, G::Q5_1),
        (F::Q2_K, "Q2_K", 10, G::Q2_K),
        (F::Q3_K_S, "Q3_K_S", 11, G::Q3_K),
        (F::Q3_K_M, "Q3_K_M", 12, G::Q3_K),
        (F::Q3_K_L, "Q3_K_L", 13, G::Q3_K),
        (F::Q4_K_S, "Q4_K_S", 14, G::Q4_K),
        (F::Q4_K_M, "Q4_K_M", 15, G::Q4_K),
        (F::Q5_K_S, "Q5_K_S", 16, G::Q5_K),
        (F::Q5_K_M, "Q5_K_M", 17, G::Q5_K),
        (F::Q6_K, "Q6_K", 18, G::Q6_K),
    ]
};

/// llama-quantize's short names for the medium mixes.
const ALIASES: [(&str, FileType); 3] = [
    ("Q3_K", FileType::Q3_K_M),
    ("Q4_K", FileType::Q4_K_M),
    ("Q5_K", FileType::Q5_K_M),
];

impl FileType {
    fn entry(self) -> &'static (FileType, &'static str, u32, GgmlType) {
        FILE_TYPES
            .iter()
            .find(|e| e.0 == self)
            .expect("every FileType is in FILE_TYPES")
    }

    /// Parses a type name, case-insensitively. `Q3_K`, `Q4_K` and `Q5_K` mean the `_M` mixes,
    /// as in llama-quantize.
    pub fn parse(s: &str) -> Result<Self, CompressError> {
        let up = s.trim().to_ascii_uppercase();
        if let Some(e) = FILE_TYPES.iter().find(|e| e.1 == up) {
            return Ok(e.0);
        }
        if let Some(a) = ALIASES.iter().find(|a| a.0 == up) {
            return Ok(a.1);
        }
        Err(CompressError::UnknownType {
            got: s.to_string(),
            supported: Self::supported_list(),
        })
    }

    /// "F32, F16, …, Q6_K (Q3_K/Q4_K/Q5_K = the _M mixes)".
    pub fn supported_list() -> String {
        let names: Vec<&str> = FILE_TYPES.iter().map(|e| e.1).collect();
        format!("{} (Q3_K, Q4_K, Q5_K = the _M mixes)", names.join(", "))
    }

    pub fn name(self) -> &'static str {
        self.entry().1
    }

    /// llama.cpp's `general.file_type` value.
    pub fn llama_ftype(self) -> u32 {
        self.entry().2
    }

    /// The type of a tensor the recipe does not single out.
    pub fn default_type(self) -> GgmlType {
        self.entry().3
    }
}

impl std::fmt::Display for FileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A `--tensor-type PATTERN=TYPE` rule: tensors whose name contains a match of the regular
/// expression get `ty` (first matching rule wins), before the shape fallback.
#[derive(Clone, Debug)]
pub struct Override {
    pub pattern: Regex,
    pub ty: GgmlType,
}

/// Tensor types an override may name (the ones this build can write).
pub const WRITABLE: [GgmlType; 13] = {
    use GgmlType::*;
    [
        F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
    ]
};

impl Override {
    /// Parses `PATTERN=TYPE` (TYPE a tensor type such as `Q8_0`, `Q6_K`, `F16`).
    pub fn parse(spec: &str) -> Result<Self, CompressError> {
        let bad = |reason: String| CompressError::BadOverride {
            spec: spec.to_string(),
            reason,
        };
        let (pat, ty) = spec
            .rsplit_once('=')
            .ok_or_else(|| bad("there is no '='".into()))?;
        if pat.is_empty() {
            return Err(bad("the pattern is empty".into()));
        }
        let ty = GgmlType::from_name(ty.trim())
            .filter(|t| WRITABLE.contains(t))
            .ok_or_else(|| {
                let names: Vec<&str> = WRITABLE.iter().map(|t| t.name()).collect();
                bad(format!(
                    "unknown or unsupported tensor type {:?} (supported: {})",
                    ty,
                    names.join(", ")
                ))
            })?;
        let pattern =
            Regex::new(pat).map_err(|e| bad(format!("invalid regular expression: {e}")))?;
        Ok(Override { pattern, ty })
    }
}

/// What happens to one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorPlan {
    pub name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub from: GgmlType,
    pub to: GgmlType,
}

impl TensorPlan {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Options of a plan beyond the file type.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// `--tensor-type` rules, first match wins.
    pub overrides: Vec<Override>,
    /// Every quantizable tensor gets the default type (llama-quantize `--pure`); the shape
    /// fallback still applies.
    pub pure: bool,
    /// An importance matrix will be used (changes the Q4_0/Q5_0 recipe for early ffn_down).
    pub has_imatrix: bool,
}

/// A complete plan and the warnings worth telling the user.
#[derive(Clone, Debug)]
pub struct Plan {
    pub ftype: FileType,
    /// In the order of the source file.
    pub tensors: Vec<TensorPlan>,
    pub warnings: Vec<String>,
}

impl Plan {
    /// Whether some tensor is already quantized and will be re-quantized to another type
    /// (allowed, but the result is worse than quantizing from the original weights).
    pub fn requantizes(&self) -> Vec<&TensorPlan> {
        self.tensors
            .iter()
            .filter(|t| t.from.is_quantized() && t.from != t.to)
            .collect()
    }
}

/// llama.cpp's `tensor_allows_quantization`, for the tensors of the models microllm runs
/// (and the common non-weight tensors of others).
pub fn allows_quantization(name: &str, n_dims: usize) -> bool {
    if n_dims < 2 || !name.ends_with("weight") {
        return false;
    }
    const NEVER: [&str; 12] = [
        "_norm.weight",
        "ffn_gate_inp.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "attn_rel_b.weight",
        ".position_embd",
        ".rel_pos",
        ".patch_embd",
        "time_mix_",
    ];
    if NEVER.iter().any(|s| name.contains(s)) {
        return false;
    }
    !matches!(name, "position_embd.weight" | "token_types.weight")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnKvB,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    use Category::*;
    if name == "output.weight" {
        return Output;
    }
    if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        return TokenEmbd;
    }
    let table: [(&str, Category); 9] = [
        ("attn_qkv.weight", AttnQkv),
        ("attn_kv_b.weight", AttnKvB),
        ("attn_v.weight", AttnV),
        ("attn_k.weight", AttnK),
        ("attn_q.weight", AttnQ),
        ("attn_output.weight", AttnOutput),
        ("ffn_up", FfnUp),
        ("ffn_gate", FfnGate),
        ("ffn_down", FfnDown),
    ];
    table
        .iter()
        .find(|(s, _)| name.contains(s))
        .map_or(Other, |&(_, c)| c)
}

fn is_attn_v(c: Category) -> bool {
    matches!(c, Category::AttnV | Category::AttnQkv | Category::AttnKvB)
}

/// llama.cpp's layer choice for the extra bits of the _M mixes: the first and last eighth of
/// the layers, and every third layer in between.
pub fn use_more_bits(i_layer: i64, n_layers: i64) -> bool {
    i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2
}

/// The layer number in `blk.N.…`, or -1 (llama.cpp sorts tensors by it, then by name).
fn layer_of(name: &str) -> i64 {
    name.strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<i64>().ok())
        .unwrap_or(-1)
}

struct Counters {
    n_attn_v: i64,
    i_attn_v: i64,
    n_layer: i64,
    i_ffn_down: i64,
    tied: bool,
    n_gqa: u32,
}

/// The mix decision (`llama_tensor_get_type_impl`) for one quantizable tensor.
fn mix_type(
    ft: FileType,
    ty: GgmlType,
    cat: Category,
    n_cols: u64,
    q: &mut Counters,
    has_imatrix: bool,
) -> GgmlType {
    use FileType as F;
    use GgmlType as G;
    let mut new = ty;
    if cat == Category::Output || (q.tied && cat == Category::TokenEmbd) {
        let block = ty.block_size() as u64;
        if !n_cols.is_multiple_of(block) {
            new = G::Q8_0;
        } else if new != G::Q8_0 {
            new = G::Q6_K;
        }
    } else if cat == Category::TokenEmbd {
        // Unchanged for the file types supported here.
    } else if is_attn_v(cat) {
        let (i, n) = (q.i_attn_v, q.n_attn_v);
        match ft {
            F::Q2_K => new = if q.n_gqa >= 4 { G::Q4_K } else { G::Q3_K },
            F::Q3_K_M => new = if i < 2 { G::Q5_K } else { G::Q4_K },
            F::Q3_K_L => new = G::Q5_K,
            F::Q4_K_M | F::Q5_K_M if use_more_bits(i, n) => new = G::Q6_K,
            F::Q4_K_S if i < 4 => new = G::Q5_K,
            _ => {}
        }
        q.i_attn_v += 1;
    } else if cat == Category::FfnDown {
        let (i, n) = (q.i_ffn_down, q.n_layer);
        match ft {
            F::Q2_K => new = G::Q3_K,
            F::Q3_K_M => new = if i < n / 16 { G::Q5_K } else { G::Q4_K },
            F::Q3_K_L => new = G::Q5_K,
            F::Q4_K_M if use_more_bits(i, n) => new = G::Q6_K,
            F::Q5_K_M if use_more_bits(i, n) => new = G::Q6_K,
            F::Q4_K_S if i < n / 8 => new = G::Q5_K,
            F::Q4_0 if has_imatrix && i < n / 8 => new = G::Q4_1,
            F::Q5_0 if has_imatrix && i < n / 8 => new = G::Q5_1,
            _ => {}
        }
        q.i_ffn_down += 1;
    } else if cat == Category::AttnOutput {
        match ft {
            F::Q2_K => new = G::Q3_K,
            F::Q3_K_M => new = G::Q4_K,
            F::Q3_K_L => new = G::Q5_K,
            _ => {}
        }
    }
    new
}

/// `tensor_type_fallback`: a type whose block does not divide the row length is replaced.
/// Returns the type and, when it changed, a warning.
fn fallback(name: &str, n_cols: u64, ty: GgmlType) -> (GgmlType, Option<String>) {
    use GgmlType as G;
    let block = ty.block_size() as u64;
    if n_cols.is_multiple_of(block) {
        return (ty, None);
    }
    let mut to = match ty {
        G::Q2_K | G::Q3_K => G::Q4_0,
        G::Q4_K => G::Q5_0,
        G::Q5_K => G::Q5_1,
        G::Q6_K => G::Q8_0,
        other => other,
    };
    if !n_cols.is_multiple_of(to.block_size() as u64) {
        to = G::F16;
    }
    (
        to,
        Some(format!(
            "{name}: rows of {n_cols} are not a multiple of {block} (needed by {ty}), falling back to {to}"
        )),
    )
}

/// Plans the conversion of every tensor of `file` to file type `ft`.
pub fn plan(file: &GgufFile, ft: FileType, opts: &PlanOptions) -> Result<Plan, CompressError> {
    let md = file.metadata();
    let arch = file
        .architecture()
        .ok_or_else(|| {
            CompressError::NotAModel(
                "the file has no general.architecture (an importance matrix or \
                 another GGUF?); give a model file"
                    .into(),
            )
        })?
        .to_string();
    let key = |k: &str| format!("{arch}.{k}");
    let n_layer = md.get_u32(&key("block_count")).ok().flatten().unwrap_or(0) as i64;
    let n_head = md
        .get_u32(&key("attention.head_count"))
        .ok()
        .flatten()
        .unwrap_or(1);
    let n_head_kv = md
        .get_u32(&key("attention.head_count_kv"))
        .ok()
        .flatten()
        .unwrap_or(n_head)
        .max(1);
    let tensors = file.tensors();
    let mut q = Counters {
        n_attn_v: tensors
            .iter()
            .filter(|t| is_attn_v(category(&t.name)))
            .count() as i64,
        i_attn_v: 0,
        n_layer,
        i_ffn_down: 0,
        tied: !tensors
            .iter()
            .any(|t| category(&t.name) == Category::Output),
        n_gqa: n_head / n_head_kv,
    };
    // llama.cpp visits the tensors ordered by layer number, then name; the counters above
    // depend on that order.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (na, nb) = (&tensors[a].name, &tensors[b].name);
        (layer_of(na), na).cmp(&(layer_of(nb), nb))
    });
    let default = ft.default_type();
    let mut to = vec![GgmlType::F32; tensors.len()];
    let mut warnings = Vec::new();
    for &i in &order {
        let t = &tensors[i];
        let n_cols = t.dims.first().copied().unwrap_or(0);
        if !allows_quantization(&t.name, t.dims.len()) {
            to[i] = t.ty;
            continue;
        }
        let mut new = default;
        if default.is_quantized() {
            let manual = opts.overrides.iter().find(|o| o.pattern.is_match(&t.name));
            if let Some(o) = manual {
                new = o.ty;
            } else if !opts.pure {
                new = mix_type(ft, new, category(&t.name), n_cols, &mut q, opts.has_imatrix);
            }
            let (ty, warn) = fallback(&t.name, n_cols, new);
            new = ty;
            warnings.extend(warn);
        }
        to[i] = new;
    }
    let tensors = tensors
        .iter()
        .zip(to)
        .map(|(t, to)| TensorPlan {
            name: t.name.clone(),
            dims: t.dims.clone(),
            from: t.ty,
            to,
        })
        .collect();
    Ok(Plan {
        ftype: ft,
        tensors,
        warnings,
    })
}

/// The plan of `microllm dequantize`: every tensor stored in another type than F32 becomes
/// `to` (F32 or F16); F32 tensors stay F32.
pub fn dequantize_plan(file: &GgufFile, to: FileType) -> Result<Plan, CompressError> {
    if !matches!(to, FileType::F32 | FileType::F16) {
        return Err(CompressError::UnknownType {
            got: to.name().to_string(),
            supported: "F32, F16".to_string(),
        });
    }
    let target = to.default_type();
    let tensors = file
        .tensors()
        .iter()
        .map(|t| TensorPlan {
            name: t.name.clone(),
            dims: t.dims.clone(),
            from: t.ty,
            to: if t.ty == GgmlType::F32 { t.ty } else { target },
        })
        .collect();
    Ok(Plan {
        ftype: to,
        tensors,
        warnings: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_and_aliases() {
        assert_eq!(FileType::parse("q4_k_m").unwrap(), FileType::Q4_K_M);
        assert_eq!(FileType::parse("Q4_K").unwrap(), FileType::Q4_K_M);
        assert_eq!(FileType::parse("bf16").unwrap(), FileType::BF16);
        let e = FileType::parse("Q7_X").unwrap_err().to_string();
        assert!(e.contains("Q7_X") && e.contains("Q4_K_M"), "{e}");
        assert_eq!(FileType::Q4_K_M.llama_ftype(), 15);
        assert_eq!(FileType::Q8_0.llama_ftype(), 7);
    }

    #[test]
    fn more_bits_layers_match_llama_cpp_for_30_layers() {
        // SmolLM2 (30 layers): n/8 = 3, 7n/8 = 26.
        let picked: Vec<i64> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(
            picked,
            vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
        );
    }

    #[test]
    fn fallbacks() {
        assert_eq!(fallback("x", 576, GgmlType::Q4_K).0, GgmlType::Q5_0);
        assert_eq!(fallback("x", 576, GgmlType::Q5_K).0, GgmlType::Q5_1);
        assert_eq!(fallback("x", 576, GgmlType::Q6_K).0, GgmlType::Q8_0);
        assert_eq!(fallback("x", 576, GgmlType::Q3_K).0, GgmlType::Q4_0);
        assert_eq!(fallback("x", 48, GgmlType::Q4_K).0, GgmlType::F16);
        assert_eq!(fallback("x", 1536, GgmlType::Q4_K), (GgmlType::Q4_K, None));
    }

    #[test]
    fn overrides_parse_and_refuse() {
        let o = Override::parse("attn_v=q8_0").unwrap();
        assert_eq!(o.ty, GgmlType::Q8_0);
        assert!(o.pattern.is_match("blk.3.attn_v.weight"));
        assert!(Override::parse("attn_v").is_err());
        assert!(Override::parse("attn_v=IQ2_XS").is_err());
        assert!(Override::parse("(=Q8_0").is_err());
    }
}

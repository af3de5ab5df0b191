//! What a model is (read from its GGUF header) and whether it fits in memory.
//!
//! The fit check runs before a download or a load: memory = weights (the whole file, which is
//! memory-mapped and read at every token) + KV cache (f16 keys and values for every layer and
//! position of the context) + compute buffers (the engine's activations for one batch, the
//! logits, the attention scores, the tokenizer's tables and a fixed allowance), compared with
//! the memory the OS says is available (`MemAvailable`, or the cgroup limit when tighter).

use crate::catalog::{catalog, CatalogEntry};
use crate::error::StoreError;
use microllm_gguf::{GgufFile, Metadata};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Context used for estimates when none is given: like `microllm run`, min(4096, trained).
pub const DEFAULT_CTX: usize = 4096;

/// Tokens per forward call during prompt processing (the engine's default batch).
const N_BATCH: u64 = 512;

/// Fixed allowance for the program, thread stacks and allocator slack.
const FIXED_OVERHEAD: u64 = 32 << 20;

/// Rough bytes per vocabulary entry held by the tokenizer (token strings, two hash maps,
/// merges or scores).
const TOKENIZER_BYTES_PER_TOKEN: u64 = 160;

/// The hyper-parameters that size a model's memory, from its GGUF metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub n_layer: u64,
    pub n_embd: u64,
    pub n_ff: u64,
    pub n_head: u64,
    pub n_head_kv: u64,
    /// Per-head width of keys (`attention.key_length`, default n_embd / n_head).
    pub head_dim_k: u64,
    /// Per-head width of values (`attention.value_length`, default head_dim_k).
    pub head_dim_v: u64,
    pub n_vocab: u64,
    /// Trained context length.
    pub context_length: u64,
}

/// What the store records about a model's contents (in its manifest), read from the GGUF
/// header when the model is pulled or imported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `general.architecture`.
    pub architecture: Option<String>,
    /// `general.name`.
    pub name: Option<String>,
    /// Number of weights (sum of all tensors' elements).
    pub n_params: u64,
    /// `general.file_type` as llama.cpp names it (`Q4_K_M`), else the type holding the most
    /// bytes.
    pub quantization: String,
    /// `general.license`.
    pub license: Option<String>,
    /// `None` when the architecture's sizes are not in the header.
    pub shape: Option<ModelShape>,
}

impl ModelInfo {
    /// Reads a GGUF file's header (the file is memory-mapped, not read whole).
    pub fn read(path: &Path) -> Result<Self, StoreError> {
        let f = GgufFile::open(path).map_err(|e| StoreError::NotGguf {
            what: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self::from_gguf(&f))
    }

    /// The information in an opened GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Self {
        let md = f.metadata();
        let s = |k: &str| md.get_str(k).ok().flatten().map(str::to_string);
        let n_params = f.tensors().iter().map(|t| t.n_elements()).sum();
        let quantization = md
            .get_u32("general.file_type")
            .ok()
            .flatten()
            .and_then(microllm_gguf::file_type_name)
            .map(str::to_string)
            .unwrap_or_else(|| dominant_type(f));
        let n_vocab_tensor = f
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied());
        Self {
            architecture: f.architecture().map(str::to_string),
            name: s("general.name"),
            n_params,
            quantization,
            license: s("general.license"),
            shape: ModelShape::from_metadata(md, n_vocab_tensor),
        }
    }

    /// "135M", "1.24B".
    pub fn params_human(&self) -> String {
        human_params(self.n_params)
    }
}

impl ModelShape {
    /// Reads the sizes under `{general.architecture}.*`; `None` if a required one is absent.
    pub fn from_metadata(md: &Metadata, n_vocab_tensor: Option<u64>) -> Option<Self> {
        let arch = md.get_str("general.architecture").ok().flatten()?;
        let get = |k: &str| {
            md.get_u64(&format!("{arch}.{k}"))
                .ok()
                .flatten()
                .filter(|&v| v > 0)
        };
        let n_layer = get("block_count")?;
        let n_embd = get("embedding_length")?;
        let n_head = get("attention.head_count")?;
        let n_head_kv = get("attention.head_count_kv").unwrap_or(n_head);
        let head_dim_k = get("attention.key_length").unwrap_or(n_embd / n_head);
        let head_dim_v = get("attention.value_length").unwrap_or(head_dim_k);
        let n_vocab = get("vocab_size")
            .or_else(|| {
                md.get_array("tokenizer.ggml.tokens")
                    .ok()
                    .flatten()
                    .map(|a| a.len() as u64)
            })
            .or(n_vocab_tensor)
            .unwrap_or(0);
        Some(Self {
            n_layer,
            n_embd,
            n_ff: get("feed_forward_length").unwrap_or(4 * n_embd),
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            n_vocab,
            context_length: get("context_length").unwrap_or(DEFAULT_CTX as u64),
        })
    }

    /// The context `microllm run` uses by default: min(4096, trained).
    pub fn default_ctx(&self) -> usize {
        (self.context_length as usize).min(DEFAULT_CTX)
    }

    /// Bytes of f16 keys + values per token of context.
    pub fn kv_bytes_per_token(&self) -> u64 {
        self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v) * 2
    }
}

/// Estimated memory to run a model, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    /// The context the estimate is for.
    pub n_ctx: usize,
    /// The model file (memory-mapped; all of it is read at every token).
    pub weights: u64,
    /// f16 keys and values: n_layer * n_ctx * n_head_kv * (head_dim_k + head_dim_v) * 2.
    pub kv_cache: u64,
    /// Activations for one batch, logits, attention scores, tokenizer, fixed allowance.
    pub compute: u64,
    pub total: u64,
}

/// Estimates the memory to run a model of `file_size` bytes at a context of `n_ctx` tokens.
/// Without a shape (sizes not in the header) only the weights and the fixed allowance count.
pub fn estimate_memory(file_size: u64, shape: Option<&ModelShape>, n_ctx: usize) -> MemoryEstimate {
    let n_ctx_u = n_ctx.max(1) as u64;
    let (kv_cache, compute) = match shape {
        None => (0, FIXED_OVERHEAD),
        Some(s) => {
            let b = N_BATCH.min(n_ctx_u);
            let q = s.n_head * s.head_dim_k;
            let k = s.n_head_kv * s.head_dim_k;
            let v = s.n_head_kv * s.head_dim_v;
            let attn = s.n_head * s.head_dim_v;
            let widest = [s.n_embd, q, k, v, s.n_ff].into_iter().max().unwrap_or(0);
            // f32 activations: x, xn, q, k, v, attn, gate, up, rope cos+sin.
            let acts = 4 * b * (2 * s.n_embd + q + k + v + attn + 2 * s.n_ff + s.head_dim_k);
            // Quantized matmul inputs (at most ~1.1 bytes per element).
            let act_q = b * widest * 9 / 8;
            let scratch = 4 * (b * widest).max(s.n_vocab);
            let logits = 4 * s.n_vocab;
            let scores = 4 * n_ctx_u * s.n_head;
            let tokenizer = TOKENIZER_BYTES_PER_TOKEN * s.n_vocab;
            (
                s.kv_bytes_per_token() * n_ctx_u,
                acts + act_q + scratch + logits + scores + tokenizer + FIXED_OVERHEAD,
            )
        }
    };
    MemoryEstimate {
        n_ctx,
        weights: file_size,
        kv_cache,
        compute,
        total: file_size + kv_cache + compute,
    }
}

/// Memory available to this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AvailableMemory {
    pub bytes: u64,
    /// Where the number comes from (`MemAvailable`, `cgroup memory.max`).
    pub source: String,
}

/// `MemAvailable` from /proc/meminfo, or the room left under this process's cgroup memory
/// limit when that is smaller. `None` where neither can be read (not Linux).
pub fn available_memory() -> Option<AvailableMemory> {
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_meminfo(&t))
        .map(|bytes| AvailableMemory {
            bytes,
            source: "MemAvailable in /proc/meminfo".into(),
        });
    let cg = cgroup_available().map(|bytes| AvailableMemory {
        bytes,
        source: "room under the cgroup memory limit".into(),
    });
    match (mem, cg) {
        (Some(m), Some(c)) => Some(if c.bytes < m.bytes { c } else { m }),
        (m, c) => m.or(c),
    }
}

/// `MemAvailable:  123456 kB` -> bytes.
pub(crate) fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut it = line["MemAvailable:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    Some(match it.next() {
        Some("kB") | None => n.checked_mul(1024)?,
        Some(_) => return None,
    })
}

/// Room under the cgroup (v2, else v1) memory limit: limit - (usage - inactive page cache).
fn cgroup_available() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let own = read("/proc/self/cgroup")
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string()))
        })
        .unwrap_or_default();
    let mut dirs = vec![format!("/sys/fs/cgroup{own}")];
    if !own.is_empty() && own != "/" {
        dirs.push("/sys/fs/cgroup".into());
    }
    for d in dirs {
        let (Some(max), Some(cur)) = (
            read(&format!("{d}/memory.max")),
            read(&format!("{d}/memory.current")),
        ) else {
            continue;
        };
        let stat = read(&format!("{d}/memory.stat")).unwrap_or_default();
        if let Some(a) = cgroup_room(&max, &cur, &stat, "inactive_file") {
            return Some(a);
        }
    }
    let v1 = "/sys/fs/cgroup/memory";
    let (max, cur) = (
        read(&format!("{v1}/memory.limit_in_bytes"))?,
        read(&format!("{v1}/memory.usage_in_bytes"))?,
    );
    let stat = read(&format!("{v1}/memory.stat")).unwrap_or_default();
    cgroup_room(&max, &cur, &stat, "total_inactive_file")
}

/// limit - (usage - reclaimable); `None` when unlimited ("max", or v1's huge sentinel).
pub(crate) fn cgroup_room(max: &str, current: &str, stat: &str, reclaim_key: &str) -> Option<u64> {
    let limit: u64 = max.trim().parse().ok()?;
    if limit >= 1 << 60 {
        return None;
    }
    let used: u64 = current.trim().parse().ok()?;
    let reclaimable: u64 = stat
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == reclaim_key).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    Some(limit.saturating_sub(used.saturating_sub(reclaimable)))
}

/// Refuses (with the numbers and the options) if `est` does not fit in `available`.
/// `shape` lets the refusal say which smaller context would fit.
pub fn check_fit(
    model: &str,
    file_size: u64,
    shape: Option<&ModelShape>,
    est: &MemoryEstimate,
    available: &AvailableMemory,
) -> Result<(), StoreError> {
    if est.total <= available.bytes {
        return Ok(());
    }
    // Never suggest more than the model was trained for.
    let max_ctx = shape.and_then(|s| {
        largest_ctx(file_size, s, available.bytes, est.n_ctx)
            .map(|c| c.min(s.context_length as usize))
    });
    let smaller = catalog()
        .iter()
        .filter(|e| e.size < file_size)
        .filter(|e| {
            let s = e.shape;
            estimate_memory(e.size, Some(&s), s.default_ctx()).total <= available.bytes
        })
        .map(|e| format!("{}:{}", e.name, e.tag))
        .collect();
    Err(StoreError::DoesNotFit(Box::new(FitRefusal {
        model: model.to_string(),
        estimate: *est,
        available: available.bytes,
        available_source: available.source.clone(),
        max_ctx,
        smaller,
    })))
}

/// Why a model does not fit, with the numbers and the ways out (see [`check_fit`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FitRefusal {
    pub model: String,
    pub estimate: MemoryEstimate,
    pub available: u64,
    pub available_source: String,
    /// Largest context that would fit, if any.
    pub max_ctx: Option<usize>,
    /// Smaller catalog models that would fit at their default context.
    pub smaller: Vec<String>,
}

impl std::fmt::Display for FitRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = &self.estimate;
        let mut options = Vec::new();
        if let Some(c) = self.max_ctx {
            options.push(format!("a smaller context (--ctx {c} fits)"));
        }
        if self.smaller.is_empty() {
            options.push("a smaller quantization or model".to_string());
        } else {
            options.push(format!(
                "a smaller quantization or model ({} fits)",
                self.smaller.join(", ")
            ));
        }
        options.push("free some memory".to_string());
        let kv = if e.kv_cache == 0 {
            "KV cache not counted (the model's sizes are unknown before download)".to_string()
        } else {
            format!("KV cache {}", human_bytes(e.kv_cache))
        };
        write!(
            f,
            "{} needs about {} at a context of {} tokens (weights {} + {kv} + compute buffers {}), but only {} of memory is available ({}). Options: {}; or pass --force to try anyway",
            self.model,
            human_bytes(e.total),
            e.n_ctx,
            human_bytes(e.weights),
            human_bytes(e.compute),
            human_bytes(self.available),
            self.available_source,
            options.join(", ")
        )
    }
}

/// The largest context below `n_ctx` (a multiple of 256, at least 256) that fits.
fn largest_ctx(file_size: u64, s: &ModelShape, available: u64, n_ctx: usize) -> Option<usize> {
    let fits = |c: usize| estimate_memory(file_size, Some(s), c).total <= available;
    if !fits(256) {
        return None;
    }
    let (mut lo, mut hi) = (1usize, n_ctx / 256); // in units of 256; lo fits
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid * 256) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo * 256)
}

/// The largest catalog model (by parameters, then size) whose estimate at `n_ctx` (default:
/// each model's [`ModelShape::default_ctx`]) fits in `available` bytes.
pub fn pick_auto(available: u64, n_ctx: Option<usize>) -> Option<&'static CatalogEntry> {
    catalog()
        .iter()
        .filter(|e| {
            let s = e.shape;
            let ctx = n_ctx.unwrap_or_else(|| s.default_ctx());
            estimate_memory(e.size, Some(&s), ctx).total <= available
        })
        .max_by_key(|e| (e.params, e.size))
}

/// "97.8 MiB", "1.21 GiB".
pub fn human_bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let f = n as f64;
    if f >= 1024.0 * MIB {
        format!("{:.2} GiB", f / (1024.0 * MIB))
    } else if f >= MIB {
        format!("{:.1} MiB", f / MIB)
    } else if n >= 1024 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// "135M", "1.24B", "12.3K".
pub fn human_params(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2}B", n as f64 / 1e9)
    } else if n >= 1_000_000 {
        format!("{:.0}M", n as f64 / 1e6)
    } else {
        format!("{:.1}K", n as f64 / 1e3)
    }
}

/// The tensor type holding the most bytes.
fn dominant_type(f: &GgufFile) -> String {
    let mut by_type: std::collections::BTreeMap<&'static str, u64> = Default::default();
    for t in f.tensors() {
        *by_type.entry(t.ty.name()).or_default() += t.n_bytes;
    }
    by_type
        .into_iter()
        .max_by_key(|(_, b)| *b)
        .map(|(t, _)| t.to_string())
        .unwrap_or_else(|| "none".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> ModelShape {
        crate::catalog::find("smollm2-135m-instruct", None)
            .map(|e| e.shape)
            .unwrap()
    }

    #[test]
    fn kv_cache_formula() {
        let s = smollm();
        // 30 layers * 3 KV heads * (64 + 64) * 2 bytes = 23040 bytes per token.
        assert_eq!(s.kv_bytes_per_token(), 23_040);
        let e = estimate_memory(98_362_432, Some(&s), 8192);
        assert_eq!(e.kv_cache, 23_040 * 8192);
        assert_eq!(e.weights, 98_362_432);
        assert_eq!(e.total, e.weights + e.kv_cache + e.compute);
        assert!(e.compute > FIXED_OVERHEAD && e.compute < 100 << 20, "{e:?}");
        let none = estimate_memory(1000, None, 8192);
        assert_eq!((none.kv_cache, none.compute), (0, FIXED_OVERHEAD));
    }

    #[test]
    fn fit_refusal_has_numbers_and_options() {
        let s = smollm();
        let est = estimate_memory(98_362_432, Some(&s), 8192);
        let avail = AvailableMemory {
            bytes: 200 << 20,
            source: "test".into(),
        };
        let err = check_fit("smollm2", 98_362_432, Some(&s), &est, &avail).unwrap_err();
        let max_ctx = match &err {
            StoreError::DoesNotFit(r) => r.max_ctx.unwrap(),
            other => panic!("{other:?}"),
        };
        assert!((256..8192).contains(&max_ctx) && max_ctx % 256 == 0);
        assert!(estimate_memory(98_362_432, Some(&s), max_ctx).total <= 200 << 20);
        assert!(estimate_memory(98_362_432, Some(&s), max_ctx + 256).total > 200 << 20);
        let msg = err.to_string();
        for want in ["needs about", "KV cache", "200.0 MiB", "--ctx", "--force"] {
            assert!(msg.contains(want), "{want:?} not in {msg}");
        }
        // Asked beyond the trained context: the suggestion stops at the trained context.
        let big = estimate_memory(98_362_432, Some(&s), 1 << 20);
        let avail = AvailableMemory {
            bytes: 1 << 30,
            source: "test".into(),
        };
        match check_fit("smollm2", 98_362_432, Some(&s), &big, &avail).unwrap_err() {
            StoreError::DoesNotFit(r) => assert_eq!(r.max_ctx, Some(8192)),
            other => panic!("{other:?}"),
        }
        let roomy = AvailableMemory {
            bytes: 1 << 40,
            source: "test".into(),
        };
        check_fit("smollm2", 98_362_432, Some(&s), &est, &roomy).unwrap();
    }

    #[test]
    fn auto_picks_the_largest_that_fits() {
        assert_eq!(pick_auto(1 << 40, None).unwrap().name, "gemma3-270m");
        let small = crate::catalog::find("smollm2-135m-instruct", None).unwrap();
        let s = small.shape;
        let need = estimate_memory(small.size, Some(&s), s.default_ctx()).total;
        assert_eq!(pick_auto(need, None).unwrap().name, small.name);
        assert!(pick_auto(need - 1, None).is_none());
        assert!(pick_auto(10 << 20, None).is_none());
    }

    #[test]
    fn memory_sources() {
        let t = "MemTotal:       24684084 kB\nMemFree: 1 kB\nMemAvailable:   23919508 kB\n";
        assert_eq!(parse_meminfo(t), Some(23_919_508 * 1024));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
        assert_eq!(
            cgroup_room(
                "1000\n",
                "600\n",
                "anon 1\ninactive_file 100\n",
                "inactive_file"
            ),
            Some(500)
        );
        assert_eq!(cgroup_room("max\n", "600\n", "", "inactive_file"), None);
        assert_eq!(
            cgroup_room("9223372036854771712", "5", "", "total_inactive_file"),
            None
        );
        assert_eq!(cgroup_room("100", "600", "", "x"), Some(0));
        let a = available_memory();
        if cfg!(target_os = "linux") {
            assert!(a.unwrap().bytes > 0);
        }
    }

    #[test]
    fn humans() {
        assert_eq!(human_bytes(98_362_432), "93.8 MiB");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_params(134_515_008), "135M");
    }
}

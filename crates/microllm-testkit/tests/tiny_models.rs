//! Tiny models parse back with the expected tensors and metadata, are deterministic, and
//! (when a llama.cpp build is present) are accepted and run by llama.cpp.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use microllm_gguf::{GgmlType, GgufFile};
use microllm_testkit::*;

fn parse(spec: &TinySpec) -> GgufFile {
    GgufFile::from_bytes(tiny_model_bytes(spec)).unwrap()
}

fn expected_names(spec: &TinySpec) -> Vec<String> {
    let mut v = vec!["token_embd.weight".to_string()];
    for i in 0..spec.n_layer {
        let mut blk = vec!["attn_norm.weight", "attn_q.weight"];
        if spec.arch == TinyArch::Qwen2 {
            blk.push("attn_q.bias");
        }
        blk.push("attn_k.weight");
        if spec.arch == TinyArch::Qwen2 {
            blk.push("attn_k.bias");
        }
        blk.push("attn_v.weight");
        if spec.arch == TinyArch::Qwen2 {
            blk.push("attn_v.bias");
        }
        blk.extend(["attn_output.weight", "ffn_norm.weight", "ffn_gate.weight"]);
        blk.extend(["ffn_up.weight", "ffn_down.weight"]);
        v.extend(blk.iter().map(|s| format!("blk.{i}.{s}")));
    }
    v.push("output_norm.weight".into());
    if !spec.tied_output {
        v.push("output.weight".into());
    }
    v
}

fn check_model(spec: &TinySpec) {
    let f = parse(spec);
    let arch = spec.arch.gguf_arch();
    assert_eq!(f.architecture(), Some(arch));
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, expected_names(spec));

    let (e, hd, nv) = (
        spec.n_embd as u64,
        spec.head_dim() as u64,
        spec.n_vocab() as u64,
    );
    let (q, kv, ff) = (
        spec.n_head as u64 * hd,
        spec.n_head_kv as u64 * hd,
        spec.n_ff as u64,
    );
    let dims = |n: &str| f.tensor(n).unwrap().dims.clone();
    assert_eq!(dims("token_embd.weight"), [e, nv]);
    assert_eq!(dims("blk.0.attn_norm.weight"), [e]);
    assert_eq!(dims("blk.0.attn_q.weight"), [e, q]);
    assert_eq!(dims("blk.1.attn_k.weight"), [e, kv]);
    assert_eq!(dims("blk.1.attn_v.weight"), [e, kv]);
    assert_eq!(dims("blk.0.attn_output.weight"), [q, e]);
    assert_eq!(dims("blk.0.ffn_gate.weight"), [e, ff]);
    assert_eq!(dims("blk.0.ffn_up.weight"), [e, ff]);
    assert_eq!(dims("blk.0.ffn_down.weight"), [ff, e]);
    assert_eq!(dims("output_norm.weight"), [e]);
    if spec.arch == TinyArch::Qwen2 {
        assert_eq!(dims("blk.0.attn_q.bias"), [q]);
        assert_eq!(dims("blk.0.attn_k.bias"), [kv]);
        assert_eq!(dims("blk.0.attn_v.bias"), [kv]);
    }
    if !spec.tied_output {
        assert_eq!(dims("output.weight"), [e, nv]);
    }
    for t in f.tensors() {
        let want = if t.dims.len() == 2 {
            spec.weight_type
        } else {
            GgmlType::F32
        };
        assert_eq!(t.ty, want, "{}", t.name);
    }

    let m = f.metadata();
    let k = |s: &str| format!("{arch}.{s}");
    assert_eq!(
        m.get_u32(&k("block_count")).unwrap(),
        Some(spec.n_layer as u32)
    );
    assert_eq!(
        m.get_u32(&k("context_length")).unwrap(),
        Some(spec.n_ctx as u32)
    );
    assert_eq!(
        m.get_u32(&k("embedding_length")).unwrap(),
        Some(spec.n_embd as u32)
    );
    assert_eq!(
        m.get_u32(&k("feed_forward_length")).unwrap(),
        Some(spec.n_ff as u32)
    );
    assert_eq!(
        m.get_u32(&k("attention.head_count")).unwrap(),
        Some(spec.n_head as u32)
    );
    assert_eq!(
        m.get_u32(&k("attention.head_count_kv")).unwrap(),
        Some(spec.n_head_kv as u32)
    );
    assert_eq!(m.get_f32(&k("rope.freq_base")).unwrap(), Some(10000.0));
    assert_eq!(
        m.get_f32(&k("attention.layer_norm_rms_epsilon")).unwrap(),
        Some(1e-5)
    );
    assert_eq!(
        m.get_u32(&k("rope.dimension_count")).unwrap(),
        Some(hd as u32)
    );
    assert_eq!(m.get_u32(&k("vocab_size")).unwrap(), Some(nv as u32));
    assert_eq!(
        m.get_u32(&k("attention.sliding_window")).unwrap(),
        spec.sliding_window
    );
    assert!(m.get_str("general.name").unwrap().is_some());
    assert_eq!(m.get_str("tokenizer.ggml.model").unwrap(), Some("gpt2"));
    assert_eq!(
        m.get_str("tokenizer.ggml.pre").unwrap(),
        Some(spec.arch.tokenizer_pre())
    );
    let (tokens, merges, types) = tiny_gpt2_vocab();
    assert_eq!(
        m.get_str_array("tokenizer.ggml.tokens").unwrap(),
        Some(&tokens[..])
    );
    assert_eq!(
        m.get_str_array("tokenizer.ggml.merges").unwrap(),
        Some(&merges[..])
    );
    assert_eq!(
        m.get_i32_array("tokenizer.ggml.token_type").unwrap(),
        Some(&types[..])
    );
    assert_eq!(
        m.get_u32("tokenizer.ggml.bos_token_id").unwrap(),
        Some(IM_START_ID)
    );
    assert_eq!(
        m.get_u32("tokenizer.ggml.eos_token_id").unwrap(),
        Some(IM_END_ID)
    );
    assert_eq!(
        m.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
        Some(false)
    );
    assert!(m
        .get_str("tokenizer.chat_template")
        .unwrap()
        .unwrap()
        .contains("<|im_start|>"));

    // The stored bytes are exactly the values tiny_tensors reports.
    for t in tiny_tensors(spec) {
        let info = f.tensor(&t.name).unwrap();
        let data = f.tensor_data(info);
        let stored: Vec<f32> = match info.ty {
            GgmlType::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            GgmlType::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            GgmlType::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            other => panic!("unexpected {other}"),
        };
        assert_eq!(stored, t.values, "{}", t.name);
    }
}

#[test]
fn llama_parses_back() {
    check_model(&TinySpec::llama());
}

#[test]
fn qwen2_parses_back() {
    check_model(&TinySpec::qwen2());
}

#[test]
fn mistral_parses_back() {
    let spec = TinySpec::mistral();
    assert_eq!(spec.arch.gguf_arch(), "llama");
    assert!(!spec.tied_output);
    assert_eq!(spec.sliding_window, Some(64));
    check_model(&spec);
}

#[test]
fn other_shapes_and_float_types() {
    let mut s = TinySpec::llama();
    s.n_layer = 3;
    s.n_head = 8;
    s.n_head_kv = 1;
    s.n_embd = 128;
    s.n_ff = 96;
    s.tied_output = false;
    s.weight_type = GgmlType::F16;
    check_model(&s);
    let mut s = TinySpec::qwen2();
    s.weight_type = GgmlType::BF16;
    s.sliding_window = Some(16);
    check_model(&s);
}

#[test]
fn deterministic_and_seeded() {
    let a = tiny_model_bytes(&TinySpec::llama());
    assert_eq!(a, tiny_model_bytes(&TinySpec::llama()));
    let mut s = TinySpec::llama();
    s.seed += 1;
    assert_ne!(a, tiny_model_bytes(&s));
    // Per-tensor streams: adding a layer leaves existing tensors unchanged.
    let mut deeper = TinySpec::llama();
    deeper.n_layer = 3;
    let t2 = tiny_tensors(&TinySpec::llama());
    let t3 = tiny_tensors(&deeper);
    let find = |v: &[TinyTensor], n: &str| v.iter().find(|t| t.name == n).unwrap().values.clone();
    assert_eq!(
        find(&t2, "blk.1.ffn_up.weight"),
        find(&t3, "blk.1.ffn_up.weight")
    );
    assert_ne!(
        find(&t2, "blk.0.ffn_up.weight"),
        find(&t2, "blk.1.ffn_up.weight")
    );
    // Pinned values: the PRNG and the scaling must not drift silently between versions
    // (goldens computed from tiny models would all change).
    assert_eq!(find(&t2, "blk.0.attn_norm.weight")[0].to_bits(), 0x3f7e7156);
    assert_eq!(find(&t2, "token_embd.weight")[1].to_bits(), 0xbd3c084b);
    // SplitMix64's published first output for seed 0.
    assert_eq!(SplitMix64::new(0).next_u64(), 0xe220a8397b1dcdaf);
}

#[test]
fn weight_statistics_are_sane() {
    for t in tiny_tensors(&TinySpec::qwen2()) {
        let n = t.values.len() as f32;
        let mean = t.values.iter().sum::<f32>() / n;
        let std = (t
            .values
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum::<f32>()
            / n)
            .sqrt();
        assert!(t.values.iter().all(|v| v.is_finite()));
        if t.name.ends_with("norm.weight") {
            assert!(
                t.values.iter().all(|v| (0.9..=1.1).contains(v)),
                "{}",
                t.name
            );
        } else if t.name.ends_with(".bias") {
            assert!(std < 0.1, "{} std {std}", t.name);
        } else {
            assert!(mean.abs() < 0.02, "{} mean {mean}", t.name);
            assert!((0.015..=0.11).contains(&std), "{} std {std}", t.name);
        }
    }
}

#[test]
fn vocab_is_consistent() {
    let (tokens, merges, types) = tiny_gpt2_vocab();
    assert!((280..=320).contains(&tokens.len()), "{}", tokens.len());
    assert_eq!(tokens.len(), types.len());
    assert_eq!(tokens.len(), 3 + 256 + merges.len());
    assert_eq!(&tokens[..3], SPECIAL_TOKENS);
    assert_eq!(tokens[ENDOFTEXT_ID as usize], "<|endoftext|>");
    assert_eq!(tokens[IM_START_ID as usize], "<|im_start|>");
    assert_eq!(tokens[IM_END_ID as usize], "<|im_end|>");
    assert_eq!(&types[..3], [TOKEN_TYPE_CONTROL; 3]);
    assert!(types[3..].iter().all(|&t| t == TOKEN_TYPE_NORMAL));
    let unique: HashSet<&String> = tokens.iter().collect();
    assert_eq!(unique.len(), tokens.len(), "duplicate tokens");

    // Byte tokens: all 256 bytes, each one char, GPT-2 mapping.
    let order = gpt2_byte_order();
    let mut seen = [false; 256];
    for (i, &b) in order.iter().enumerate() {
        seen[b as usize] = true;
        let tok = &tokens[FIRST_BYTE_ID as usize + i];
        assert_eq!(tok.chars().count(), 1);
        assert_eq!(tok.chars().next().unwrap(), gpt2_byte_to_unicode(b));
    }
    assert!(seen.iter().all(|&s| s));
    assert_eq!(gpt2_byte_to_unicode(b' '), 'Ġ');
    assert_eq!(gpt2_byte_to_unicode(b'\n'), 'Ċ');
    assert_eq!(gpt2_byte_to_unicode(b'a'), 'a');
    assert_eq!(order[0], b'!');

    // Every merge joins two tokens that exist before it, producing the next token.
    let first_merge = FIRST_BYTE_ID as usize + 256;
    for (i, m) in merges.iter().enumerate() {
        let (l, r) = m.split_once(' ').unwrap();
        let known = &tokens[..first_merge + i];
        assert!(known.iter().any(|t| t == l), "merge {m}: {l} unknown");
        assert!(known.iter().any(|t| t == r), "merge {m}: {r} unknown");
        assert_eq!(tokens[first_merge + i], format!("{l}{r}"));
    }
    for common in ["Ġt", "he", "Ġthe", "Ġand", "ing", "Hello"] {
        assert!(tokens.iter().any(|t| t == common), "{common}");
    }
}

#[test]
fn quantized_weights_need_an_encoder() {
    let mut s = TinySpec::llama();
    s.weight_type = GgmlType::Q8_0;
    // A stand-in encoder: right size, zero blocks (real ones come from microllm-kernels).
    let enc = |ty: GgmlType, dims: &[u64], _v: &[f32]| {
        let n = ty.row_size(dims[0]).unwrap() * dims[1..].iter().product::<u64>();
        vec![0u8; n as usize]
    };
    let f = GgufFile::from_bytes(tiny_model_bytes_with(&s, &enc)).unwrap();
    assert_eq!(f.tensor("blk.0.attn_q.weight").unwrap().ty, GgmlType::Q8_0);
    assert_eq!(
        f.tensor("blk.0.attn_norm.weight").unwrap().ty,
        GgmlType::F32
    );
    assert_eq!(f.metadata().get_u32("general.file_type").unwrap(), Some(7));
    assert_eq!(
        f.metadata()
            .get_u32("general.quantization_version")
            .unwrap(),
        Some(2)
    );
    let r = std::panic::catch_unwind(|| tiny_model_bytes(&s));
    assert!(
        r.is_err(),
        "Q8_0 without an encoder must panic with a clear message"
    );
}

#[test]
fn invalid_spec_is_reported() {
    let mut s = TinySpec::llama();
    s.n_head_kv = 3;
    assert!(s.validate().unwrap_err().contains("n_head_kv"));
    s.n_head_kv = 2;
    s.n_embd = 60;
    assert!(s.validate().is_err());
}

#[test]
fn write_tiny_model_to_disk() {
    let path = std::env::temp_dir().join(format!("microllm-testkit-{}.gguf", std::process::id()));
    write_tiny_model(&TinySpec::mistral(), &path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(
        f.as_bytes(),
        tiny_model_bytes(&TinySpec::mistral()).as_slice()
    );
    drop(f);
    std::fs::remove_file(&path).unwrap();
    let err = write_tiny_model(&TinySpec::llama(), Path::new("/nonexistent-dir/x.gguf"));
    assert!(err.is_err());
}

// ---- llama.cpp acceptance (skipped when no llama.cpp build is present) ----

fn llama_bin(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("MICROLLM_LLAMA_CPP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from("/root/.cache/microllm-anchor/llama.cpp-0.3.36/build/bin")
        });
    let p = dir.join(name);
    if p.exists() {
        Some(p)
    } else {
        println!("SKIP: {} not found", p.display());
        None
    }
}

fn temp_model(spec: &TinySpec, tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "microllm-testkit-{tag}-{}.gguf",
        std::process::id()
    ));
    write_tiny_model(spec, &p).unwrap();
    p
}

fn ids_of(tokens: &[String], pieces: &[&str]) -> Vec<u32> {
    pieces
        .iter()
        .map(|p| tokens.iter().position(|t| t == p).unwrap() as u32)
        .collect()
}

#[test]
fn llama_cpp_tokenizes_tiny_models() {
    let Some(bin) = llama_bin("llama-tokenize") else {
        return;
    };
    let (tokens, _, _) = tiny_gpt2_vocab();
    // BPE by the merge ranks of tiny_gpt2_vocab; `<|im_start|>` is parsed as a special token.
    let want = ids_of(
        &tokens,
        &[
            "Hello",
            "Ġw",
            "or",
            "l",
            "d",
            ",",
            "Ġthe",
            "Ġ",
            "en",
            "d",
            "<|im_start|>",
            "u",
            "s",
            "er",
        ],
    );
    for (tag, spec) in [
        ("tok-llama", TinySpec::llama()),
        ("tok-qwen2", TinySpec::qwen2()),
        ("tok-mistral", TinySpec::mistral()),
    ] {
        let path = temp_model(&spec, tag);
        let out = Command::new(&bin)
            .arg("-m")
            .arg(&path)
            .args([
                "-p",
                "Hello world, the end<|im_start|>user",
                "--ids",
                "--log-disable",
            ])
            .output()
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout.lines().rev().find(|l| l.starts_with('[')).unwrap();
        let got: Vec<u32> = line
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|s| s.trim().parse().unwrap())
            .collect();
        assert_eq!(got, want, "{tag}");
    }
}

#[test]
fn llama_cpp_runs_tiny_models() {
    let Some(bin) = llama_bin("llama-simple") else {
        return;
    };
    for (tag, spec) in [
        ("run-llama", TinySpec::llama()),
        ("run-qwen2", TinySpec::qwen2()),
        ("run-mistral", TinySpec::mistral()),
        ("run-gemma2", TinySpec::gemma2()),
        ("run-gemma3", TinySpec::gemma3()),
        ("run-phi3", TinySpec::phi3()),
    ] {
        let path = temp_model(&spec, tag);
        let out = Command::new(&bin)
            .arg("-m")
            .arg(&path)
            .args(["-n", "4", "Hello world"])
            .output()
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{tag}: {stderr}");
        assert!(stderr.contains("decoded 4 tokens"), "{tag}: {stderr}");
    }
}

// ---- Gemma 2, Gemma 3, Phi-3 ----

/// Tensor names and ggml dims llama.cpp's loaders (src/models/<arch>.cpp) create.
fn expected_tensors(spec: &TinySpec) -> Vec<(String, Vec<u64>)> {
    let (e, hd, nv, ff) = (
        spec.n_embd as u64,
        spec.head_dim() as u64,
        spec.n_vocab() as u64,
        spec.n_ff as u64,
    );
    let (q, kv) = (spec.n_head as u64 * hd, spec.n_head_kv as u64 * hd);
    let mut v: Vec<(String, Vec<u64>)> = Vec::new();
    if spec.long_rope.is_some() {
        v.push(("rope_factors_long.weight".into(), vec![hd / 2]));
        v.push(("rope_factors_short.weight".into(), vec![hd / 2]));
    }
    v.push(("token_embd.weight".into(), vec![e, nv]));
    for i in 0..spec.n_layer {
        let mut blk: Vec<(&str, Vec<u64>)> = vec![("attn_norm.weight", vec![e])];
        match spec.arch {
            TinyArch::Phi3 => blk.push(("attn_qkv.weight", vec![e, q + 2 * kv])),
            _ => {
                blk.push(("attn_q.weight", vec![e, q]));
                blk.push(("attn_k.weight", vec![e, kv]));
                blk.push(("attn_v.weight", vec![e, kv]));
            }
        }
        if spec.arch == TinyArch::Gemma3 {
            blk.push(("attn_q_norm.weight", vec![hd]));
            blk.push(("attn_k_norm.weight", vec![hd]));
        }
        blk.push(("attn_output.weight", vec![q, e]));
        if spec.arch.is_gemma() {
            blk.push(("post_attention_norm.weight", vec![e]));
        }
        blk.push(("ffn_norm.weight", vec![e]));
        if spec.arch == TinyArch::Phi3 {
            blk.push(("ffn_up.weight", vec![e, 2 * ff]));
        } else {
            blk.push(("ffn_gate.weight", vec![e, ff]));
            blk.push(("ffn_up.weight", vec![e, ff]));
        }
        blk.push(("ffn_down.weight", vec![ff, e]));
        if spec.arch.is_gemma() {
            blk.push(("post_ffw_norm.weight", vec![e]));
        }
        v.extend(blk.into_iter().map(|(n, d)| (format!("blk.{i}.{n}"), d)));
    }
    v.push(("output_norm.weight".into(), vec![e]));
    if !spec.tied_output {
        v.push(("output.weight".into(), vec![e, nv]));
    }
    v
}

fn check_tensors(spec: &TinySpec) {
    let f = parse(spec);
    let got: Vec<(String, Vec<u64>)> = f
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone()))
        .collect();
    assert_eq!(got, expected_tensors(spec), "{:?}", spec.arch);
    for t in tiny_tensors(spec) {
        let info = f.tensor(&t.name).unwrap();
        let stored: Vec<f32> = f
            .tensor_data(info)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(stored, t.values, "{}", t.name);
    }
}

#[test]
fn gemma2_layout_and_metadata() {
    let spec = TinySpec::gemma2();
    check_tensors(&spec);
    let f = parse(&spec);
    let m = f.metadata();
    assert_eq!(f.architecture(), Some("gemma2"));
    assert_eq!(m.get_u32("gemma2.attention.key_length").unwrap(), Some(32));
    assert_eq!(
        m.get_u32("gemma2.attention.value_length").unwrap(),
        Some(32)
    );
    assert_eq!(
        m.get_u32("gemma2.attention.sliding_window").unwrap(),
        Some(4)
    );
    assert_eq!(
        m.get_f32("gemma2.attn_logit_softcapping").unwrap(),
        Some(1.0)
    );
    assert_eq!(
        m.get_f32("gemma2.final_logit_softcapping").unwrap(),
        Some(2.0)
    );
    assert_eq!(
        m.get_f32("gemma2.attention.layer_norm_rms_epsilon")
            .unwrap(),
        Some(1e-6)
    );
    // As real Gemma 2 conversions: no rope keys, no vocab_size.
    assert!(m.get("gemma2.rope.freq_base").is_none());
    assert!(m.get("gemma2.rope.dimension_count").is_none());
    assert!(m.get("gemma2.vocab_size").is_none());
    assert_eq!(m.get_str("tokenizer.ggml.model").unwrap(), Some("llama"));
    assert_eq!(m.get_str("tokenizer.ggml.pre").unwrap(), Some("default"));
    assert_eq!(
        m.get_u32("tokenizer.ggml.bos_token_id").unwrap(),
        Some(SPM_BOS_ID)
    );
    assert_eq!(
        m.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
        Some(true)
    );
    let (tokens, scores, types) = tiny_spm_vocab();
    assert_eq!(
        m.get_str_array("tokenizer.ggml.tokens").unwrap(),
        Some(&tokens[..])
    );
    assert_eq!(
        m.get_f32_array("tokenizer.ggml.scores").unwrap(),
        Some(&scores[..])
    );
    assert_eq!(
        m.get_i32_array("tokenizer.ggml.token_type").unwrap(),
        Some(&types[..])
    );
}

#[test]
fn gemma3_layout_and_metadata() {
    let spec = TinySpec::gemma3();
    check_tensors(&spec);
    let f = parse(&spec);
    let m = f.metadata();
    assert_eq!(f.architecture(), Some("gemma3"));
    assert_eq!(m.get_u32("gemma3.block_count").unwrap(), Some(6));
    assert_eq!(
        m.get_u32("gemma3.attention.head_count_kv").unwrap(),
        Some(1)
    );
    assert_eq!(m.get_f32("gemma3.rope.freq_base").unwrap(), Some(1e6));
    // Like the real 270M file: no base for the local layers (llama.cpp's default 10000),
    // no soft-capping, no explicit window pattern (llama.cpp's default: every 6th global).
    assert!(m.get("gemma3.rope.freq_base_swa").is_none());
    assert!(m.get("gemma3.final_logit_softcapping").is_none());
    assert!(m.get("gemma3.attention.sliding_window_pattern").is_none());
    assert_eq!(
        m.get_u32("gemma3.attention.sliding_window").unwrap(),
        Some(4)
    );
}

#[test]
fn phi3_layout_and_metadata() {
    let spec = TinySpec::phi3();
    check_tensors(&spec);
    let f = parse(&spec);
    let m = f.metadata();
    assert_eq!(f.architecture(), Some("phi3"));
    assert_eq!(m.get_u32("phi3.context_length").unwrap(), Some(8192));
    assert_eq!(
        m.get_u32("phi3.rope.scaling.original_context_length")
            .unwrap(),
        Some(1024)
    );
    let af = m.get_f32("phi3.rope.scaling.attn_factor").unwrap().unwrap();
    assert!((af - (1.0f32 + 8f32.ln() / 1024f32.ln()).sqrt()).abs() < 1e-6);
    assert_eq!(m.get_u32("phi3.rope.dimension_count").unwrap(), Some(16));
    let t = tiny_tensors(&spec);
    let factors = |n: &str| t.iter().find(|x| x.name == n).unwrap().values.clone();
    assert!(factors("rope_factors_short.weight")
        .iter()
        .all(|v| (1.0..=1.5).contains(v)));
    assert!(factors("rope_factors_long.weight")
        .iter()
        .all(|v| (1.0..=40.0).contains(v)));
    // Phi-3's vocabulary layout: llama.cpp looks these up by text for Phi-3 models.
    let (tokens, _, types) = tiny_phi3_vocab();
    for special in [
        "<unk>",
        "<s>",
        "</s>",
        "<|endoftext|>",
        "<|end|>",
        "<|user|>",
    ] {
        assert!(tokens.iter().any(|t| t == special), "{special}");
    }
    assert_eq!(tokens[PHI3_BOS_ID as usize], "<s>");
    assert_eq!(types[PHI3_UNK_ID as usize], TOKEN_TYPE_UNKNOWN);
    assert_eq!(
        m.get_u32("tokenizer.ggml.eos_token_id").unwrap(),
        phi3_added_token_id("<|endoftext|>")
    );
    assert!(m
        .get_str("tokenizer.chat_template")
        .unwrap()
        .unwrap()
        .contains("<|assistant|>"));
}

#[test]
fn spm_vocabularies_are_consistent() {
    for (tokens, scores, types, first_byte) in [
        {
            let (a, b, c) = tiny_spm_vocab();
            (a, b, c, SPM_FIRST_BYTE_ID)
        },
        {
            let (a, b, c) = tiny_phi3_vocab();
            (a, b, c, PHI3_FIRST_BYTE_ID)
        },
    ] {
        assert!((300..=400).contains(&tokens.len()), "{}", tokens.len());
        assert_eq!(tokens.len(), scores.len());
        assert_eq!(tokens.len(), types.len());
        let unique: HashSet<&String> = tokens.iter().collect();
        assert_eq!(unique.len(), tokens.len(), "duplicate tokens");
        for b in 0..=255u32 {
            let id = (first_byte + b) as usize;
            assert_eq!(tokens[id], format!("<0x{b:02X}>"));
            assert_eq!(types[id], TOKEN_TYPE_BYTE);
        }
        // Every merged piece is the concatenation of two earlier pieces (SentencePiece BPE
        // merges pairs of adjacent symbols), and outscores the single characters.
        let pieces: Vec<usize> = (0..tokens.len())
            .filter(|&i| types[i] == TOKEN_TYPE_NORMAL)
            .collect();
        for &i in &pieces {
            let t = &tokens[i];
            if t.chars().count() == 1 {
                continue;
            }
            let splits = t.char_indices().skip(1).any(|(k, _)| {
                let known = |p: &str| pieces.iter().any(|&j| j != i && tokens[j] == p);
                known(&t[..k]) && known(&t[k..])
            });
            assert!(splits, "piece {t} is not a merge of two pieces");
            let best_char = pieces
                .iter()
                .filter(|&&j| tokens[j].chars().count() == 1)
                .map(|&j| scores[j])
                .fold(f32::MIN, f32::max);
            assert!(scores[i] > best_char, "{t}");
        }
        assert!(tokens.iter().any(|t| t == "▁the"));
    }
    assert_eq!(tiny_spm_vocab().0[..4], SPM_SPECIAL_TOKENS);
}

#[test]
fn named_specs() {
    for name in ["llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3"] {
        let spec = TinySpec::named(name).unwrap();
        assert!(spec.validate().is_ok(), "{name}");
    }
    assert_eq!(
        TinySpec::named("gemma3-q8_0").unwrap().weight_type,
        GgmlType::Q8_0
    );
    assert_eq!(
        TinySpec::named("llama-F16").unwrap().weight_type,
        GgmlType::F16
    );
    assert!(TinySpec::named("gpt9").is_none());
    assert!(TinySpec::named("llama-q9_9").is_none());
    let mut bad = TinySpec::phi3();
    bad.key_length = Some(32);
    assert!(bad.validate().unwrap_err().contains("n_head * head_dim"));
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

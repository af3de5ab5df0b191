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

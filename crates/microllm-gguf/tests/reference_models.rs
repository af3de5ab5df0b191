//! Parse the real reference models (skipped when absent). Expected values come from
//! /work/shared/reference/models.md (gguf-dump of the same files).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use microllm_gguf::{GgmlType, GgufFile, GgufWriter};

fn model(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("MICROLLM_REF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.cache/microllm-ref"));
    let p = dir.join(name);
    if p.exists() {
        Some(p)
    } else {
        println!("SKIP: reference model {} not found", p.display());
        None
    }
}

fn type_counts(f: &GgufFile) -> HashMap<GgmlType, usize> {
    let mut m = HashMap::new();
    for t in f.tensors() {
        *m.entry(t.ty).or_insert(0) += 1;
    }
    m
}

fn check_rewrite_identical(path: &Path, f: &GgufFile) {
    // Our writer lays files out as llama.cpp does, so re-emitting must reproduce the file.
    let bytes = GgufWriter::from_file(f).unwrap().to_bytes().unwrap();
    assert_eq!(bytes.len() as u64, f.file_size(), "{}", path.display());
    assert!(
        bytes == f.as_bytes(),
        "rewrite of {} differs",
        path.display()
    );
}

#[test]
fn smollm2_135m_q4_1() {
    let Some(path) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.file_size(), 98_362_432);
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(f.data_offset(), 1_785_664);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.architecture(), Some("llama"));
    let m = f.metadata();
    assert_eq!(m.get_u32("llama.block_count").unwrap(), Some(30));
    assert_eq!(m.get_u32("llama.embedding_length").unwrap(), Some(576));
    assert_eq!(m.get_u32("llama.feed_forward_length").unwrap(), Some(1536));
    assert_eq!(m.get_u32("llama.attention.head_count").unwrap(), Some(9));
    assert_eq!(m.get_u32("llama.attention.head_count_kv").unwrap(), Some(3));
    assert_eq!(m.get_u32("llama.context_length").unwrap(), Some(8192));
    assert_eq!(m.get_f32("llama.rope.freq_base").unwrap(), Some(100000.0));
    assert_eq!(m.get_str("tokenizer.ggml.model").unwrap(), Some("gpt2"));
    assert_eq!(m.get_str("tokenizer.ggml.pre").unwrap(), Some("smollm"));
    assert_eq!(
        m.get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap()
            .len(),
        49152
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

    let c = type_counts(&f);
    assert_eq!(c[&GgmlType::Q4_1], 210);
    assert_eq!(c[&GgmlType::Q8_0], 1);
    assert_eq!(c[&GgmlType::F32], 61);
    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!(
        (emb.ty, emb.dims.as_slice()),
        (GgmlType::Q8_0, &[576, 49152][..])
    );
    assert_eq!(f.tensor_data(emb).len(), 30_081_024);
    let q = f.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.ty, q.dims.as_slice()), (GgmlType::Q4_1, &[576, 576][..]));
    let k = f.tensor("blk.29.attn_k.weight").unwrap();
    assert_eq!((k.ty, k.dims.as_slice()), (GgmlType::Q4_1, &[576, 192][..]));
    assert_eq!(f.tensor("output_norm.weight").unwrap().ty, GgmlType::F32);
    assert!(
        f.tensor("output.weight").is_none(),
        "SmolLM2 ties its output"
    );
    let total: u64 = f.tensors().iter().map(|t| t.n_bytes).sum();
    assert_eq!(total, 96_576_768);
    check_rewrite_identical(&path, &f);
}

#[test]
fn gemma3_270m_q4_k_m() {
    let Some(path) = model("gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.file_size(), 253_113_024);
    assert_eq!(f.tensors().len(), 236);
    assert_eq!(f.data_offset(), 6_525_120);
    assert_eq!(f.architecture(), Some("gemma3"));
    let m = f.metadata();
    assert_eq!(m.get_u32("gemma3.block_count").unwrap(), Some(18));
    assert_eq!(m.get_u32("gemma3.embedding_length").unwrap(), Some(640));
    assert_eq!(
        m.get_u32("gemma3.attention.sliding_window").unwrap(),
        Some(512)
    );
    assert_eq!(m.get_str("tokenizer.ggml.model").unwrap(), Some("llama"));
    assert_eq!(
        m.get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap()
            .len(),
        262_144
    );
    assert_eq!(
        m.get_f32_array("tokenizer.ggml.scores")
            .unwrap()
            .unwrap()
            .len(),
        262_144
    );
    assert_eq!(
        m.get_i32_array("tokenizer.ggml.token_type")
            .unwrap()
            .unwrap()
            .len(),
        262_144
    );
    assert_eq!(
        m.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
        Some(true)
    );
    assert_eq!(m.get_u32("tokenizer.ggml.bos_token_id").unwrap(), Some(2));

    let c = type_counts(&f);
    assert_eq!(c[&GgmlType::Q8_0], 10);
    assert_eq!(c[&GgmlType::Q5_0], 81);
    assert_eq!(c[&GgmlType::Q4_K], 27);
    assert_eq!(c[&GgmlType::Q6_K], 9);
    assert_eq!(c[&GgmlType::F32], 109);
    assert_eq!(
        f.tensor("blk.0.ffn_down.weight").unwrap().ty,
        GgmlType::Q6_K
    );
    assert_eq!(
        f.tensor("blk.2.ffn_down.weight").unwrap().ty,
        GgmlType::Q4_K
    );
    assert_eq!(f.tensor("blk.2.attn_v.weight").unwrap().ty, GgmlType::Q5_0);
    assert_eq!(f.tensor("token_embd.weight").unwrap().dims, [640, 262_144]);
    let total: u64 = f.tensors().iter().map(|t| t.n_bytes).sum();
    assert_eq!(total, 246_587_904);
    check_rewrite_identical(&path, &f);
}

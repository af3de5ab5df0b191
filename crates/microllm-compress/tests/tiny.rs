//! Fast tests on tiny random models (microllm-testkit): every type quantizes and runs, the
//! recipes and overrides pick the expected types, dequantize round-trips, imatrix files
//! round-trip, pruning yields a loadable model, KLD of a model against itself is zero.

use std::path::{Path, PathBuf};

use microllm_compress::convert::{convert, ConvertOptions};
use microllm_compress::eval::kld;
use microllm_compress::imatrix::{collect, Imatrix};
use microllm_compress::prune::{block_scores, pick_blocks, prune};
use microllm_compress::recipe::{dequantize_plan, plan, FileType, Override, PlanOptions};
use microllm_compress::{check_distinct_paths, CompressError, NoProgress};
use microllm_gguf::{GgmlType, GgufFile};
use microllm_kernels::Kernels;
use microllm_model::{Logits, Model, ModelOptions, StateOptions};
use microllm_testkit::{write_tiny_model, TinySpec};

/// A llama-shaped tiny model whose rows are multiples of 256, so the K-quants apply without
/// fallback: n_embd 256, n_ff 512, 4 layers.
fn spec() -> TinySpec {
    let mut s = TinySpec::llama();
    s.n_layer = 4;
    s.n_embd = 256;
    s.n_head = 4;
    s.n_head_kv = 2;
    s.n_ff = 512;
    s
}

fn write_base(dir: &Path) -> PathBuf {
    let p = dir.join("base-f32.gguf");
    write_tiny_model(&spec(), &p).unwrap();
    p
}

fn opts() -> ConvertOptions<'static> {
    ConvertOptions {
        kernels: Kernels::detect(),
        n_threads: 2,
        imatrix: None,
        imatrix_file: None,
    }
}

fn quantize_to(src: &Path, dst: &Path, ft: FileType, popts: &PlanOptions, im: Option<&Imatrix>) {
    let file = GgufFile::open(src).unwrap();
    let p = plan(&file, ft, popts).unwrap();
    let mut o = opts();
    o.imatrix = im;
    let (w, _) = convert(&file, &p, &o, &NoProgress).unwrap();
    w.write_file(dst).unwrap();
}

fn load(p: &Path) -> Model {
    Model::load(
        p,
        ModelOptions {
            n_threads: 2,
            kernels: Kernels::detect(),
            pack: true,
        },
    )
    .unwrap()
}

fn tokens(n: usize, n_vocab: usize) -> Vec<u32> {
    let mut s = 0x1234_5678_9abc_def1u64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % n_vocab as u64) as u32
        })
        .collect()
}

fn last_logits(m: &Model, toks: &[u32]) -> Vec<f32> {
    let mut st = m
        .new_state(StateOptions {
            n_ctx: 64,
            n_batch: 64,
            ..StateOptions::default()
        })
        .unwrap();
    m.forward(&mut st, toks, Logits::Last).unwrap();
    st.logits().to_vec()
}

fn types_of(p: &Path) -> Vec<(String, GgmlType)> {
    let f = GgufFile::open(p).unwrap();
    f.tensors().iter().map(|t| (t.name.clone(), t.ty)).collect()
}

fn ty(types: &[(String, GgmlType)], name: &str) -> GgmlType {
    types.iter().find(|(n, _)| n == name).unwrap().1
}

#[test]
fn every_type_quantizes_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let base = write_base(dir.path());
    let bm = load(&base);
    let toks = tokens(12, bm.config.n_vocab);
    let reference = last_logits(&bm, &toks);
    let all = [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K",
        "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    ];
    for name in all {
        let ft = FileType::parse(name).unwrap();
        let out = dir.path().join(format!("m-{name}.gguf"));
        quantize_to(&base, &out, ft, &PlanOptions::default(), None);
        let f = GgufFile::open(&out).unwrap();
        assert_eq!(
            f.metadata().get_u32("general.file_type").unwrap(),
            Some(ft.llama_ftype()),
            "{name}"
        );
        // The tokenizer and template travel with the weights.
        for k in ["tokenizer.ggml.tokens", "tokenizer.chat_template"] {
            assert_eq!(
                f.metadata().get(k),
                GgufFile::open(&base).unwrap().metadata().get(k),
                "{name} {k}"
            );
        }
        let m = load(&out);
        let l = last_logits(&m, &toks);
        assert!(l.iter().all(|v| v.is_finite()), "{name}");
        let err = l
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = reference.iter().map(|v| v.abs()).fold(0f32, f32::max);
        // Loose bounds that still catch garbage (a wrong layout gives errors ~ scale).
        let bound = match name {
            "F32" => 0.0,
            "F16" | "BF16" | "Q8_0" => 0.05 * scale,
            _ => 0.6 * scale,
        };
        assert!(
            err <= bound,
            "{name}: max |Δlogit| {err} > {bound} (scale {scale})"
        );
    }
}

#[test]
fn recipes_pick_the_llama_cpp_types() {
    let dir = tempfile::tempdir().unwrap();
    let base = write_base(dir.path());
    let out = dir.path().join("q4km.gguf");
    quantize_to(&base, &out, FileType::Q4_K_M, &PlanOptions::default(), None);
    let t = types_of(&out);
    // 4 layers: llama.cpp's use_more_bits picks layers 2 and 3.
    let more: Vec<usize> = (0..4)
        .filter(|&i| microllm_compress::recipe::use_more_bits(i as i64, 4))
        .collect();
    for i in 0..4 {
        let want = if more.contains(&i) {
            GgmlType::Q6_K
        } else {
            GgmlType::Q4_K
        };
        assert_eq!(
            ty(&t, &format!("blk.{i}.attn_v.weight")),
            want,
            "attn_v {i}"
        );
        assert_eq!(
            ty(&t, &format!("blk.{i}.ffn_down.weight")),
            want,
            "ffn_down {i}"
        );
        assert_eq!(ty(&t, &format!("blk.{i}.attn_q.weight")), GgmlType::Q4_K);
        assert_eq!(ty(&t, &format!("blk.{i}.attn_norm.weight")), GgmlType::F32);
    }
    // Tied output: the token embedding gets the output's Q6_K.
    assert_eq!(ty(&t, "token_embd.weight"), GgmlType::Q6_K);

    // --tensor-type wins over the recipe; --pure gives the default type everywhere.
    let out2 = dir.path().join("q4_0-ovr.gguf");
    let popts = PlanOptions {
        overrides: vec![
            Override::parse("attn_v=Q8_0").unwrap(),
            Override::parse(r"blk\.1\.ffn_.*=F16").unwrap(),
        ],
        ..Default::default()
    };
    quantize_to(&base, &out2, FileType::Q4_0, &popts, None);
    let t = types_of(&out2);
    for i in 0..4 {
        assert_eq!(ty(&t, &format!("blk.{i}.attn_v.weight")), GgmlType::Q8_0);
    }
    assert_eq!(ty(&t, "blk.1.ffn_up.weight"), GgmlType::F16);
    assert_eq!(ty(&t, "blk.2.ffn_up.weight"), GgmlType::Q4_0);
    load(&out2);
}

#[test]
fn narrow_rows_fall_back_like_llama_cpp() {
    // The standard tiny model has 64-wide rows: K-quants cannot apply.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("narrow.gguf");
    write_tiny_model(&TinySpec::llama(), &base).unwrap();
    let file = GgufFile::open(&base).unwrap();
    let p = plan(&file, FileType::Q4_K_M, &PlanOptions::default()).unwrap();
    let q = p
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!(q.to, GgmlType::Q5_0);
    assert!(p.warnings.iter().any(|w| w.contains("falling back")));
    let p = plan(&file, FileType::Q2_K, &PlanOptions::default()).unwrap();
    let q = p
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!(q.to, GgmlType::Q4_0);
}

#[test]
fn dequantize_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let base = write_base(dir.path());
    let q = dir.path().join("q4_0.gguf");
    quantize_to(&base, &q, FileType::Q4_0, &PlanOptions::default(), None);
    let qf = GgufFile::open(&q).unwrap();
    for (ft, want) in [
        (FileType::F32, GgmlType::F32),
        (FileType::F16, GgmlType::F16),
    ] {
        let out = dir.path().join(format!("deq-{ft}.gguf"));
        let p = dequantize_plan(&qf, ft).unwrap();
        let (w, _) = convert(&qf, &p, &opts(), &NoProgress).unwrap();
        w.write_file(&out).unwrap();
        let df = GgufFile::open(&out).unwrap();
        let k = Kernels::detect();
        for t in qf.tensors() {
            let d = df.tensor(&t.name).unwrap();
            assert_eq!(d.dims, t.dims);
            if t.ty == GgmlType::F32 {
                assert_eq!(d.ty, GgmlType::F32);
                continue;
            }
            assert_eq!(d.ty, want, "{}", t.name);
            let n = t.n_elements() as usize;
            let mut a = vec![0f32; n];
            let mut b = vec![0f32; n];
            k.dequantize_row(t.ty, qf.tensor_data(t), &mut a).unwrap();
            k.dequantize_row(d.ty, df.tensor_data(d), &mut b).unwrap();
            if want == GgmlType::F32 {
                assert_eq!(a, b, "{}", t.name);
            } else {
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= x.abs() * 1e-3 + 1e-7,
                        "{}: {x} vs {y}",
                        t.name
                    );
                }
            }
        }
        // The dequantized F32 file requantized to Q4_0 gives the same bytes back.
        if ft == FileType::F32 {
            let back = dir.path().join("back.gguf");
            quantize_to(&out, &back, FileType::Q4_0, &PlanOptions::default(), None);
            let bf = GgufFile::open(&back).unwrap();
            for t in qf.tensors().iter().filter(|t| t.ty == GgmlType::Q4_0) {
                assert_eq!(
                    bf.tensor_bytes(&t.name).unwrap(),
                    qf.tensor_data(t),
                    "{}",
                    t.name
                );
            }
        }
        load(&out);
    }
    assert!(dequantize_plan(&qf, FileType::Q8_0).is_err());
}

#[test]
fn requantizing_is_reported_and_same_file_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = write_base(dir.path());
    let q8 = dir.path().join("q8.gguf");
    quantize_to(&base, &q8, FileType::Q8_0, &PlanOptions::default(), None);
    let f = GgufFile::open(&q8).unwrap();
    let p = plan(&f, FileType::Q4_0, &PlanOptions::default()).unwrap();
    assert!(!p.requantizes().is_empty());
    let p = plan(
        &GgufFile::open(&base).unwrap(),
        FileType::Q4_0,
        &PlanOptions::default(),
    )
    .unwrap();
    assert!(p.requantizes().is_empty());

    assert!(matches!(
        check_distinct_paths(&base, &base),
        Err(CompressError::SameFile { .. })
    ));
    let alias = dir.path().join(".").join("base-f32.gguf");
    assert!(check_distinct_paths(&base, &alias).is_err());
    assert!(check_distinct_paths(&base, &dir.path().join("new.gguf")).is_ok());
}

#[test]
fn imatrix_collects_round_trips_and_changes_the_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let base = write_base(dir.path());
    let m = load(&base);
    let toks = tokens(64, m.config.n_vocab);
    let im = collect(&m, &toks, None, 32, None, "random.txt", &NoProgress).unwrap();
    assert_eq!(im.chunk_count, 2);
    assert_eq!(im.entries.len(), 4 * 7, "q k v o gate up down per block");
    let e = &im.entries["blk.0.ffn_down.weight"];
    assert_eq!(e.sums.len(), 512);
    assert_eq!(e.count, 64);
    assert!(e.sums.iter().all(|&s| s >= 0.0) && e.sums.iter().any(|&s| s > 0.0));
    let p = dir.path().join("imatrix.gguf");
    im.save(&p).unwrap();
    let back = Imatrix::load(&p).unwrap();
    assert_eq!(
        back.entries.keys().collect::<Vec<_>>(),
        im.entries.keys().collect::<Vec<_>>()
    );
    assert_eq!(back.datasets, vec!["random.txt".to_string()]);
    for (k, v) in &im.entries {
        let b = &back.entries[k];
        assert_eq!(b.count, v.count);
        for (x, y) in v.sums.iter().zip(&b.sums) {
            assert!((x - y).abs() <= x.abs() * 1e-6, "{k}");
        }
    }
    // Wrong width refused; a model file is not an imatrix.
    assert!(back.importance("blk.0.ffn_down.weight", 256).is_err());
    assert!(Imatrix::load(&base).is_err());
    // … and an imatrix is not a model to quantize.
    let e = plan(
        &GgufFile::open(&p).unwrap(),
        FileType::Q8_0,
        &PlanOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("not a model"), "{e}");

    // Weighted quantization differs from the plain one for K-quants.
    let a = dir.path().join("plain.gguf");
    let b = dir.path().join("weighted.gguf");
    quantize_to(&base, &a, FileType::Q4_K_M, &PlanOptions::default(), None);
    let popts = PlanOptions {
        has_imatrix: true,
        ..Default::default()
    };
    quantize_to(&base, &b, FileType::Q4_K_M, &popts, Some(&back));
    let (fa, fb) = (GgufFile::open(&a).unwrap(), GgufFile::open(&b).unwrap());
    let name = "blk.1.attn_q.weight";
    assert_ne!(fa.tensor_bytes(name), fb.tensor_bytes(name));
    assert_eq!(
        fb.metadata()
            .get_u32("quantize.imatrix.chunks_count")
            .unwrap(),
        Some(2)
    );
    load(&b);
}

#[test]
fn prune_by_list_and_by_count() {
    let dir = tempfile::tempdir().unwrap();
    let base = write_base(dir.path());
    let bf = GgufFile::open(&base).unwrap();
    let (w, _) = prune(&bf, &[1, 2]).unwrap();
    let out = dir.path().join("pruned.gguf");
    w.write_file(&out).unwrap();
    let pf = GgufFile::open(&out).unwrap();
    assert_eq!(pf.metadata().get_u32("llama.block_count").unwrap(), Some(2));
    assert!(pf.tensor("blk.2.attn_q.weight").is_none());
    // Old block 3 is new block 1, bytes unchanged.
    assert_eq!(
        pf.tensor_bytes("blk.1.ffn_up.weight").unwrap(),
        bf.tensor_bytes("blk.3.ffn_up.weight").unwrap()
    );
    let m = load(&out);
    assert_eq!(m.config.n_layer, 2);
    assert!(last_logits(&m, &[1, 2, 3]).iter().all(|v| v.is_finite()));

    // Refusals.
    assert!(prune(&bf, &[4]).is_err());
    assert!(prune(&bf, &[1, 1]).is_err());
    assert!(prune(&bf, &[0, 1, 2, 3]).is_err());
    assert!(prune(&bf, &[]).is_err());

    // By count: scores for every block, the lowest dropped.
    let bm = load(&base);
    let toks = tokens(64, bm.config.n_vocab);
    let scores = block_scores(&bm, &toks, None, 32, None, &NoProgress).unwrap();
    assert_eq!(scores.len(), 4);
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)), "{scores:?}");
    let picked = pick_blocks(&scores, 1).unwrap();
    let (w, _) = prune(&bf, &picked).unwrap();
    let out = dir.path().join("pruned1.gguf");
    w.write_file(&out).unwrap();
    assert_eq!(load(&out).config.n_layer, 3);
}

#[test]
fn kld_of_a_model_against_itself_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    let base = write_base(dir.path());
    let q = dir.path().join("q4_0.gguf");
    quantize_to(&base, &q, FileType::Q4_0, &PlanOptions::default(), None);
    let bm = load(&base);
    let same = load(&base);
    let qm = load(&q);
    let toks = tokens(96, bm.config.n_vocab);
    let (bp, st) = kld(&bm, &[&same, &qm], &toks, None, 32, None, 32, &NoProgress).unwrap();
    assert_eq!(bp.n_chunks, 3);
    assert_eq!(bp.n_tokens_scored, 3 * 15);
    assert_eq!(st[0].kld_mean, 0.0);
    assert_eq!(st[0].top1_agreement, 1.0);
    assert_eq!(st[0].ppl_ratio, 1.0);
    assert!(st[1].kld_mean > 0.0);
    assert!(st[1].top1_agreement <= 1.0);
    // Too little text is refused clearly.
    let e = kld(&bm, &[&qm], &toks[..10], None, 32, None, 32, &NoProgress).unwrap_err();
    assert!(e.to_string().contains("fewer than one window"), "{e}");
}

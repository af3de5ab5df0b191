//! On the real SmolLM2 (MICROLLM_TEST_SMOLLM2 = path of the Q4_1 GGUF; skipped when unset):
//! dequantize to F32, quantize Q4_K_M with and without an importance matrix computed on
//! calibration text, and check that the importance matrix lowers the KL divergence from the
//! F32 model on other text.

use microllm_compress::convert::{convert, ConvertOptions};
use microllm_compress::eval::kld;
use microllm_compress::imatrix::collect;
use microllm_compress::recipe::{dequantize_plan, plan, FileType, PlanOptions};
use microllm_compress::NoProgress;
use microllm_gguf::{GgmlType, GgufFile};
use microllm_kernels::Kernels;
use microllm_model::{Model, ModelOptions};
use microllm_tokenizer::Tokenizer;

const CTX: usize = 512;

fn model(p: &std::path::Path) -> Model {
    Model::load(
        p,
        ModelOptions {
            n_threads: 0,
            kernels: Kernels::detect(),
            pack: true,
        },
    )
    .unwrap()
}

#[test]
fn imatrix_lowers_q4_k_m_kld_on_smollm2() {
    let Ok(src) = std::env::var("MICROLLM_TEST_SMOLLM2") else {
        eprintln!("note: MICROLLM_TEST_SMOLLM2 is unset; skipping the SmolLM2 compression test");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let k = Kernels::detect();
    let opts = |im| ConvertOptions {
        kernels: k,
        n_threads: 0,
        imatrix: im,
        imatrix_file: None,
    };
    // Dequantize to F32: the source of both quantizations and the KLD base.
    let q41 = GgufFile::open(std::path::Path::new(&src)).unwrap();
    let f32_path = dir.path().join("smollm2-f32.gguf");
    let p = dequantize_plan(&q41, FileType::F32).unwrap();
    let (w, _) = convert(&q41, &p, &opts(None), &NoProgress).unwrap();
    w.write_file(&f32_path).unwrap();
    drop(w);
    let f32_file = GgufFile::open(&f32_path).unwrap();
    assert!(f32_file.tensors().iter().all(|t| t.ty == GgmlType::F32));

    let base = model(&f32_path);
    let tok = Tokenizer::from_gguf(f32_file.metadata()).unwrap();
    let bos = if tok.add_bos() { tok.bos_id() } else { None };
    let calib = tok
        .encode(include_str!("fixtures/calibration.txt"), true, true)
        .unwrap();
    let eval = tok
        .encode(include_str!("fixtures/eval.txt"), true, true)
        .unwrap();
    let im = collect(
        &base,
        &calib,
        bos,
        CTX,
        Some(4),
        "calibration.txt",
        &NoProgress,
    )
    .unwrap();
    assert_eq!(im.entries.len(), 30 * 7);

    let plain_path = dir.path().join("q4km.gguf");
    let p = plan(&f32_file, FileType::Q4_K_M, &PlanOptions::default()).unwrap();
    let (w, _) = convert(&f32_file, &p, &opts(None), &NoProgress).unwrap();
    w.write_file(&plain_path).unwrap();
    drop(w);
    let im_path = dir.path().join("q4km-imatrix.gguf");
    let popts = PlanOptions {
        has_imatrix: true,
        ..Default::default()
    };
    let p = plan(&f32_file, FileType::Q4_K_M, &popts).unwrap();
    let (w, report) = convert(&f32_file, &p, &opts(Some(&im)), &NoProgress).unwrap();
    assert!(
        report.missing_imatrix.is_empty(),
        "{:?}",
        report.missing_imatrix
    );
    w.write_file(&im_path).unwrap();
    drop(w);

    let plain = model(&plain_path);
    let weighted = model(&im_path);
    let (base_ppl, st) = kld(
        &base,
        &[&plain, &weighted],
        &eval,
        bos,
        CTX,
        Some(3),
        CTX,
        &NoProgress,
    )
    .unwrap();
    eprintln!(
        "SmolLM2 F32 ppl {:.4}; Q4_K_M: KLD {:.5} (top-1 {:.2}%, ppl {:.4}); with imatrix: KLD {:.5} (top-1 {:.2}%, ppl {:.4})",
        base_ppl.ppl,
        st[0].kld_mean,
        st[0].top1_agreement * 100.0,
        st[0].ppl.ppl,
        st[1].kld_mean,
        st[1].top1_agreement * 100.0,
        st[1].ppl.ppl
    );
    assert!(st[0].kld_mean > 0.0);
    assert!(
        st[1].kld_mean < st[0].kld_mean,
        "the importance matrix should lower the KLD: {} vs {}",
        st[1].kld_mean,
        st[0].kld_mean
    );
}

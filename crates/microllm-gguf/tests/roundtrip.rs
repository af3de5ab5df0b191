//! Writer -> reader round trips: every metadata value type, nested arrays, v2 and v3,
//! default and custom alignment, atomic file writes.

mod common;

use std::borrow::Cow;

use microllm_gguf::{GgmlType, GgufError, GgufFile, GgufWriter, MetaArray, MetaValue, Metadata};

fn every_value_type() -> Metadata {
    let mut m = Metadata::new();
    m.insert("general.architecture", "llama".into());
    m.insert("v.u8", MetaValue::U8(200));
    m.insert("v.i8", MetaValue::I8(-100));
    m.insert("v.u16", MetaValue::U16(60000));
    m.insert("v.i16", MetaValue::I16(-30000));
    m.insert("v.u32", MetaValue::U32(4_000_000_000));
    m.insert("v.i32", MetaValue::I32(-2_000_000_000));
    m.insert("v.u64", MetaValue::U64(u64::MAX));
    m.insert("v.i64", MetaValue::I64(i64::MIN));
    m.insert("v.f32", MetaValue::F32(-0.125));
    m.insert("v.f64", MetaValue::F64(std::f64::consts::PI));
    m.insert("v.bool.t", MetaValue::Bool(true));
    m.insert("v.bool.f", MetaValue::Bool(false));
    m.insert("v.str", "héllo wörld ✓".into());
    m.insert("v.str.empty", "".into());
    m.insert("a.u8", vec![1u8, 2, 255].into());
    m.insert("a.i8", vec![-1i8, 0, 127].into());
    m.insert("a.u16", vec![1u16, 65535].into());
    m.insert("a.i16", vec![-32768i16, 5].into());
    m.insert("a.u32", vec![0u32, u32::MAX].into());
    m.insert("a.i32", vec![i32::MIN, 3].into());
    m.insert("a.u64", vec![u64::MAX, 9].into());
    m.insert("a.i64", vec![i64::MAX, -9].into());
    m.insert("a.f32", vec![1.5f32, f32::INFINITY, -0.0].into());
    m.insert("a.f64", vec![1e300f64, -2.5].into());
    m.insert("a.bool", vec![true, false, true].into());
    m.insert(
        "a.str",
        vec!["Ġthe".to_string(), "".into(), "<|im_end|>".into()].into(),
    );
    m.insert("a.empty", MetaValue::Array(MetaArray::F32(vec![])));
    m.insert(
        "a.nested",
        MetaValue::Array(MetaArray::Array(vec![
            MetaArray::I32(vec![1, 2, 3]),
            MetaArray::String(vec!["x".into(), "yz".into()]),
            MetaArray::Array(vec![
                MetaArray::Bool(vec![true]),
                MetaArray::Array(vec![MetaArray::U8(vec![42])]),
            ]),
            MetaArray::Array(vec![]),
        ])),
    );
    m
}

fn build(version: u32, alignment: Option<u32>) -> (Vec<u8>, Metadata) {
    let mut w = GgufWriter::with_version(version);
    *w.metadata_mut() = every_value_type();
    if let Some(a) = alignment {
        w.metadata_mut()
            .insert("general.alignment", MetaValue::U32(a));
    }
    let f32s: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
    w.add_tensor_f32("t.f32", &[3, 2], &f32s).unwrap();
    w.add_tensor(
        "t.q4_0",
        &[64, 2],
        GgmlType::Q4_0,
        Cow::Owned(vec![0xAB; 4 * 18]),
    )
    .unwrap();
    w.add_tensor_f16("t.f16", &[5], &[1.0, 2.0, 3.0, 4.0, 5.0])
        .unwrap();
    w.add_tensor(
        "t.q4_k",
        &[256, 1, 1, 2],
        GgmlType::Q4_K,
        Cow::Owned(vec![3; 2 * 144]),
    )
    .unwrap();
    w.add_tensor_bf16("t.bf16", &[2, 1, 1], &[1.0, -2.0])
        .unwrap();
    let meta = w.metadata().clone();
    (w.to_bytes().unwrap(), meta)
}

fn check(bytes: Vec<u8>, version: u32, alignment: u64, meta: &Metadata) {
    let len = bytes.len() as u64;
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.version(), version);
    assert_eq!(f.alignment(), alignment);
    assert_eq!(f.file_size(), len);
    assert_eq!(f.data_offset() % alignment, 0);
    assert_eq!(f.metadata(), meta, "metadata differs after round trip");
    // Order is kept.
    let keys: Vec<&str> = f.metadata().iter().map(|(k, _)| k).collect();
    let want: Vec<&str> = meta.iter().map(|(k, _)| k).collect();
    assert_eq!(keys, want);
    assert_eq!(f.architecture(), Some("llama"));

    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["t.f32", "t.q4_0", "t.f16", "t.q4_k", "t.bf16"]);
    for t in f.tensors() {
        assert_eq!(t.offset % alignment, 0, "{} misaligned", t.name);
        assert!(t.offset >= f.data_offset());
        assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
    }
    let t = f.tensor("t.f32").unwrap();
    assert_eq!(t.dims, [3, 2]);
    assert_eq!((t.n_elements(), t.n_rows(), t.ty), (6, 2, GgmlType::F32));
    let vals: Vec<f32> = f
        .tensor_data(t)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(vals, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
    let q = f.tensor("t.q4_0").unwrap();
    assert_eq!((q.ty, q.n_bytes, q.n_rows()), (GgmlType::Q4_0, 72, 2));
    assert!(f.tensor_data(q).iter().all(|&b| b == 0xAB));
    let h = f.tensor("t.f16").unwrap();
    let h0 = half::f16::from_le_bytes(f.tensor_data(h)[8..10].try_into().unwrap());
    assert_eq!(h0.to_f32(), 5.0);
    let k = f.tensor("t.q4_k").unwrap();
    assert_eq!((k.n_rows(), k.n_bytes), (2, 288));
    let b = f.tensor("t.bf16").unwrap();
    assert_eq!(f.tensor_data(b), [0x80, 0x3f, 0x00, 0xc0]);
    assert!(f.tensor("nope").is_none());
}

#[test]
fn roundtrip_v3_default_alignment() {
    let (bytes, meta) = build(3, None);
    check(bytes, 3, 32, &meta);
}

#[test]
fn roundtrip_v2() {
    let (bytes, meta) = build(2, None);
    check(bytes, 2, 32, &meta);
}

#[test]
fn roundtrip_alignment_32_explicit() {
    let (bytes, meta) = build(3, Some(32));
    check(bytes, 3, 32, &meta);
}

#[test]
fn roundtrip_custom_alignment() {
    for a in [1u32, 8, 64, 4096] {
        let (bytes, meta) = build(3, Some(a));
        check(bytes, 3, a as u64, &meta);
    }
}

#[test]
fn rewrite_from_file_is_byte_identical() {
    let (bytes, _) = build(3, Some(64));
    let f = GgufFile::from_bytes(bytes.clone()).unwrap();
    let again = GgufWriter::from_file(&f).unwrap().to_bytes().unwrap();
    assert_eq!(again, bytes);
}

#[test]
fn empty_file_without_tensors() {
    let w = GgufWriter::new();
    let bytes = w.to_bytes().unwrap();
    // 24 header bytes, padded so the (empty) data section starts aligned.
    assert_eq!(bytes.len(), 32);
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.tensors().len(), 0);
    assert_eq!(f.metadata().len(), 0);
    assert_eq!(f.architecture(), None);
}

#[test]
fn write_file_is_atomic_and_mmap_reads_it() {
    let dir = std::env::temp_dir().join(format!("microllm-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    let (bytes, meta) = build(3, None);
    let f = GgufFile::from_bytes(bytes.clone()).unwrap();
    let w = GgufWriter::from_file(&f).unwrap();
    w.write_file(&path).unwrap();
    // Overwrite in place: the old mapping stays valid because write_file renames.
    let mapped = GgufFile::open(&path).unwrap();
    w.write_file(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(mapped.metadata(), &meta);
    check(mapped.as_bytes().to_vec(), 3, 32, &meta);
    // No temp files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "model.gguf")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Writing into a missing directory fails with Io and creates nothing.
    let err = w.write_file(&dir.join("missing/x.gguf")).unwrap_err();
    assert!(matches!(err, GgufError::Io { .. }), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn writer_rejects_bad_input() {
    let mut w = GgufWriter::new();
    let e = w
        .add_tensor("x", &[32], GgmlType::Q8_0, Cow::Owned(vec![0; 33]))
        .unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::TensorSizeMismatch {
                expected: 34,
                got: 33,
                ..
            }
        ),
        "{e}"
    );
    let e = w
        .add_tensor("x", &[33], GgmlType::Q8_0, Cow::Owned(vec![0; 34]))
        .unwrap_err();
    assert!(matches!(e, GgufError::BadDims { .. }), "{e}");
    let e = w.add_tensor_f32("x", &[1, 1, 1, 1, 1], &[0.0]).unwrap_err();
    assert!(matches!(e, GgufError::BadDims { .. }), "{e}");
    let e = w.add_tensor_f32(&"n".repeat(64), &[1], &[0.0]).unwrap_err();
    assert!(
        matches!(e, GgufError::TensorNameTooLong { len: 64, .. }),
        "{e}"
    );
    w.add_tensor_f32("x", &[1], &[0.0]).unwrap();
    let e = w.add_tensor_f32("x", &[1], &[0.0]).unwrap_err();
    assert!(
        matches!(e, GgufError::DuplicateTensor(ref n) if n == "x"),
        "{e}"
    );

    w.metadata_mut()
        .insert("general.alignment", MetaValue::U32(24));
    assert!(matches!(
        w.to_bytes(),
        Err(GgufError::BadAlignment { value: 24 })
    ));
    w.metadata_mut()
        .insert("general.alignment", MetaValue::U64(32));
    assert!(matches!(w.to_bytes(), Err(GgufError::WrongType { .. })));
    w.metadata_mut().remove("general.alignment");
    w.metadata_mut().insert(
        "deep",
        MetaValue::Array(MetaArray::Array(vec![MetaArray::Array(vec![
            MetaArray::Array(vec![MetaArray::Array(vec![MetaArray::U8(vec![])])]),
        ])])),
    );
    assert!(matches!(w.to_bytes(), Err(GgufError::TooLarge { .. })));
    w.metadata_mut().remove("deep");
    assert!(w.to_bytes().is_ok());

    let w = GgufWriter::with_version(1);
    assert!(matches!(
        w.to_bytes(),
        Err(GgufError::UnsupportedVersion(1))
    ));
}

#[test]
fn error_messages_say_what_to_do() {
    let e = GgufFile::from_bytes(b"PK\x03\x04rest".to_vec()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("not a GGUF file"), "{msg}");
    let e = GgufFile::open(std::path::Path::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/model.gguf"), "{e}");
}

#[test]
fn small_valid_file_parses() {
    let f = GgufFile::from_bytes(common::small_valid_file()).unwrap();
    assert_eq!(f.tensors().len(), 3);
    assert_eq!(f.metadata().get_u32("llama.block_count").unwrap(), Some(2));
}

#[test]
fn file_is_send_and_sync() {
    // Model weights are shared read-only across worker threads.
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GgufFile>();
    assert_send_sync::<GgufWriter<'static>>();
}

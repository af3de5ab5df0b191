//! Hostile input: one test per kind of corruption, each asserting the specific error variant
//! (and, by running at all, that nothing panics).

mod common;

use common::Raw;
use microllm_gguf::{GgufError, GgufFile, MAX_ARRAY_LEN, MAX_STRING_LEN};

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(bytes)
}

/// A valid file with one F32 tensor of 8 elements (32 bytes) at relative offset `rel`.
fn one_tensor(dims: &[u64], type_id: u32, rel: u64, data_len: usize) -> Vec<u8> {
    let mut r = Raw::header(3, 1, 1);
    r.kv_str("general.architecture", "llama");
    r.tensor("w", dims, type_id, rel);
    r.pad(32).data(data_len);
    r.build()
}

#[test]
fn baseline_hand_built_file_is_valid() {
    let f = parse(one_tensor(&[8], 0, 0, 32)).unwrap();
    assert_eq!(f.tensors()[0].n_bytes, 32);
    assert_eq!(f.tensors()[0].offset, f.data_offset());
}

#[test]
fn truncated_at_every_offset_always_errors() {
    let bytes = common::small_valid_file();
    let f = parse(bytes.clone()).unwrap();
    let data_end = f
        .tensors()
        .iter()
        .map(|t| t.offset + t.n_bytes)
        .max()
        .unwrap() as usize;
    for len in 0..data_end {
        let r = parse(bytes[..len].to_vec());
        match r {
            Err(GgufError::Truncated { file_size, .. }) => assert_eq!(file_size, len as u64),
            Err(GgufError::TensorOutOfBounds { file_size, .. }) => {
                assert_eq!(file_size, len as u64)
            }
            Err(e) => panic!("truncated at {len}: unexpected error {e}"),
            Ok(_) => panic!("file truncated at {len} of {data_end} bytes parsed"),
        }
    }
    // Only the padding after the last tensor may be missing (llama.cpp accepts that too).
    for len in data_end..=bytes.len() {
        assert!(parse(bytes[..len].to_vec()).is_ok(), "len {len}");
    }
}

#[test]
fn empty_file_on_disk_is_truncated() {
    let path = std::env::temp_dir().join(format!("microllm-gguf-empty-{}", std::process::id()));
    std::fs::write(&path, b"").unwrap();
    let r = GgufFile::open(&path);
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(r, Err(GgufError::Truncated { file_size: 0, .. })));
}

#[test]
fn tensor_offset_past_end() {
    let r = parse(one_tensor(&[8], 0, 64, 32));
    assert!(
        matches!(r, Err(GgufError::TensorOutOfBounds { ref tensor, n_bytes: 32, .. }) if tensor == "w"),
        "{r:?}"
    );
    // Data one byte short.
    let r = parse(one_tensor(&[8], 0, 0, 31));
    assert!(
        matches!(r, Err(GgufError::TensorOutOfBounds { .. })),
        "{r:?}"
    );
    // Offset near u64::MAX (aligned) must not overflow.
    let r = parse(one_tensor(&[8], 0, u64::MAX - 31, 32));
    assert!(
        matches!(r, Err(GgufError::TensorOutOfBounds { .. })),
        "{r:?}"
    );
}

#[test]
fn absurd_dims() {
    for dims in [
        vec![1u64 << 41],
        vec![0],
        vec![8, 0],
        vec![1 << 40, 1 << 40],
        vec![1 << 32, 1 << 32, 1 << 32, 1 << 32],
        vec![u64::MAX],
    ] {
        let r = parse(one_tensor(&dims, 0, 0, 32));
        assert!(
            matches!(r, Err(GgufError::BadDims { .. })),
            "{dims:?}: {r:?}"
        );
    }
    // Element count fits, byte count would not (F64: 8 bytes each, 2^61 elements).
    let r = parse(one_tensor(&[1 << 31, 1 << 30], 28, 0, 32));
    assert!(matches!(r, Err(GgufError::BadDims { .. })), "{r:?}");
    // Huge but representable: must be caught by the bounds check, not allocate.
    let r = parse(one_tensor(&[1 << 20, 1 << 20], 0, 0, 32));
    assert!(
        matches!(r, Err(GgufError::TensorOutOfBounds { .. })),
        "{r:?}"
    );
}

#[test]
fn row_not_multiple_of_block_size() {
    // Q4_0 (id 2) needs rows that are a multiple of 32.
    let r = parse(one_tensor(&[33], 2, 0, 64));
    assert!(matches!(r, Err(GgufError::BadDims { .. })), "{r:?}");
}

#[test]
fn n_dims_above_four() {
    let r = parse(one_tensor(&[1, 1, 1, 1, 8], 0, 0, 32));
    assert!(
        matches!(r, Err(GgufError::BadDims { ref tensor, .. }) if tensor == "w"),
        "{r:?}"
    );
    // n_dims = u32::MAX must not try to read or reserve 4 billion dims.
    let mut r = Raw::header(3, 1, 0);
    r.string("w").u32(u32::MAX);
    assert!(matches!(parse(r.build()), Err(GgufError::BadDims { .. })));
}

#[test]
fn zero_dims() {
    let r = parse(one_tensor(&[], 0, 0, 32));
    assert!(matches!(r, Err(GgufError::BadDims { .. })), "{r:?}");
}

#[test]
fn absurd_string_length() {
    // Key length above the cap.
    let mut r = Raw::header(3, 0, 1);
    r.u64(u64::MAX).bytes(b"abc");
    let e = parse(r.build());
    assert!(
        matches!(e, Err(GgufError::TooLarge { value: u64::MAX, limit, .. }) if limit == MAX_STRING_LEN),
        "{e:?}"
    );
    // Value length within the cap but beyond the file.
    let mut r = Raw::header(3, 0, 1);
    r.string("k").u32(8).u64(1 << 20).bytes(b"short");
    let e = parse(r.build());
    assert!(
        matches!(e, Err(GgufError::Truncated { need: 1048576, .. })),
        "{e:?}"
    );
    // Tensor name length above the cap.
    let mut r = Raw::header(3, 1, 0);
    r.u64(MAX_STRING_LEN + 1);
    assert!(matches!(parse(r.build()), Err(GgufError::TooLarge { .. })));
}

#[test]
fn absurd_array_length() {
    let mut r = Raw::header(3, 0, 1);
    r.string("a").u32(9).u32(4).u64(1 << 60);
    let e = parse(r.build());
    assert!(
        matches!(e, Err(GgufError::TooLarge { value, limit, .. }) if value == 1 << 60 && limit == MAX_ARRAY_LEN),
        "{e:?}"
    );
    // Under the cap but more elements than bytes left: rejected before any allocation.
    let mut r = Raw::header(3, 0, 1);
    r.string("a")
        .u32(9)
        .u32(8)
        .u64(MAX_ARRAY_LEN)
        .bytes(&[0; 64]);
    let e = parse(r.build());
    assert!(matches!(e, Err(GgufError::Truncated { .. })), "{e:?}");
    // Same for nested arrays (each at least 12 bytes).
    let mut r = Raw::header(3, 0, 1);
    r.string("a").u32(9).u32(9).u64(100).bytes(&[0; 64]);
    let e = parse(r.build());
    assert!(matches!(e, Err(GgufError::Truncated { .. })), "{e:?}");
}

#[test]
fn array_nesting_too_deep() {
    let mut r = Raw::header(3, 0, 1);
    r.string("deep").u32(9);
    for _ in 0..5 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    let e = parse(r.build());
    assert!(
        matches!(
            e,
            Err(GgufError::TooLarge {
                value: 5,
                limit: 4,
                ..
            })
        ),
        "{e:?}"
    );
    // Depth 4 is fine.
    let mut r = Raw::header(3, 0, 1);
    r.string("deep").u32(9);
    for _ in 0..3 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    assert!(parse(r.build()).is_ok());
}

#[test]
fn huge_counts() {
    let r = Raw::header(3, u64::MAX, 0);
    assert!(matches!(
        parse(r.build()),
        Err(GgufError::TooLarge {
            value: u64::MAX,
            ..
        })
    ));
    let r = Raw::header(3, 0, 1 << 40);
    assert!(matches!(parse(r.build()), Err(GgufError::TooLarge { .. })));
    // Plausible counts with nothing behind them: truncated, quickly.
    let r = Raw::header(3, 1 << 16, 1 << 20);
    assert!(matches!(parse(r.build()), Err(GgufError::Truncated { .. })));
}

#[test]
fn unknown_tensor_type() {
    for id in [4u32, 5, 31, 36, 40, 1000, u32::MAX] {
        let r = parse(one_tensor(&[8], id, 0, 32));
        assert!(
            matches!(r, Err(GgufError::UnknownTensorType { type_id, .. }) if type_id == id),
            "{id}: {r:?}"
        );
    }
}

#[test]
fn unknown_value_type() {
    let mut r = Raw::header(3, 0, 1);
    r.string("k").u32(13).u32(0);
    let e = parse(r.build());
    assert!(
        matches!(e, Err(GgufError::UnknownValueType { ref key, type_id: 13 }) if key == "k"),
        "{e:?}"
    );
    // Unknown element type inside an array.
    let mut r = Raw::header(3, 0, 1);
    r.string("k").u32(9).u32(99).u64(0);
    let e = parse(r.build());
    assert!(
        matches!(e, Err(GgufError::UnknownValueType { type_id: 99, .. })),
        "{e:?}"
    );
}

#[test]
fn non_power_of_two_alignment() {
    for a in [0u32, 3, 24, 1 << 21] {
        let mut r = Raw::header(3, 0, 1);
        r.kv_u32("general.alignment", a);
        let e = parse(r.build());
        assert!(
            matches!(e, Err(GgufError::BadAlignment { value }) if value == a as u64),
            "{a}: {e:?}"
        );
    }
}

#[test]
fn alignment_of_wrong_type() {
    let mut r = Raw::header(3, 0, 1);
    r.kv_str("general.alignment", "32");
    let e = parse(r.build());
    assert!(
        matches!(e, Err(GgufError::WrongType { got: "string", .. })),
        "{e:?}"
    );
}

#[test]
fn misaligned_tensor_offset() {
    let r = parse(one_tensor(&[8], 0, 4, 64));
    assert!(
        matches!(
            r,
            Err(GgufError::MisalignedTensor {
                offset: 4,
                alignment: 32,
                ..
            })
        ),
        "{r:?}"
    );
    // With a custom alignment of 64, offset 32 is misaligned.
    let mut r = Raw::header(3, 1, 1);
    r.kv_u32("general.alignment", 64)
        .tensor("w", &[8], 0, 32)
        .pad(64)
        .data(128);
    let e = parse(r.build());
    assert!(
        matches!(e, Err(GgufError::MisalignedTensor { alignment: 64, .. })),
        "{e:?}"
    );
}

#[test]
fn duplicate_tensor_names() {
    let mut r = Raw::header(3, 2, 0);
    r.tensor("w", &[8], 0, 0)
        .tensor("w", &[8], 0, 32)
        .pad(32)
        .data(64);
    let e = parse(r.build());
    assert!(
        matches!(e, Err(GgufError::DuplicateTensor(ref n)) if n == "w"),
        "{e:?}"
    );
}

#[test]
fn duplicate_metadata_keys() {
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32("k", 1).kv_u32("k", 2);
    let e = parse(r.build());
    assert!(
        matches!(e, Err(GgufError::DuplicateKey(ref k)) if k == "k"),
        "{e:?}"
    );
}

#[test]
fn overlapping_tensors() {
    let mut r = Raw::header(3, 2, 0);
    // a: 64 bytes at 0; b: 32 bytes at 32.
    r.tensor("a", &[16], 0, 0)
        .tensor("b", &[8], 0, 32)
        .pad(32)
        .data(64);
    let e = parse(r.build());
    assert!(
        matches!(e, Err(GgufError::OverlappingTensors { .. })),
        "{e:?}"
    );
}

#[test]
fn invalid_utf8() {
    let mut r = Raw::header(3, 0, 1);
    r.u64(3).bytes(&[b'a', 0xff, b'b']).u32(4).u32(0);
    let e = parse(r.build());
    assert!(
        matches!(e, Err(GgufError::InvalidUtf8 { offset: 33, .. })),
        "{e:?}"
    );
}

#[test]
fn bad_magic() {
    let mut b = one_tensor(&[8], 0, 0, 32);
    b[..4].copy_from_slice(b"GGML");
    let e = parse(b);
    assert!(
        matches!(e, Err(GgufError::BadMagic { found }) if &found == b"GGML"),
        "{e:?}"
    );
    assert!(matches!(
        parse(b"GG".to_vec()),
        Err(GgufError::Truncated { .. })
    ));
}

#[test]
fn version_1_rejected() {
    let mut b = one_tensor(&[8], 0, 0, 32);
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(parse(b), Err(GgufError::UnsupportedVersion(1))));
}

#[test]
fn version_99_rejected() {
    let mut b = one_tensor(&[8], 0, 0, 32);
    b[4..8].copy_from_slice(&99u32.to_le_bytes());
    assert!(matches!(parse(b), Err(GgufError::UnsupportedVersion(99))));
    let mut b = one_tensor(&[8], 0, 0, 32);
    b[4..8].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(parse(b), Err(GgufError::UnsupportedVersion(0))));
}

#[test]
fn big_endian_rejected() {
    let mut b = one_tensor(&[8], 0, 0, 32);
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    let e = parse(b).unwrap_err();
    assert!(matches!(e, GgufError::BigEndian { .. }), "{e:?}");
    assert!(
        e.to_string().contains("big-endian GGUF is not supported"),
        "{e}"
    );
}

#[test]
fn tensor_data_of_foreign_info_is_empty_not_panic() {
    let f = parse(one_tensor(&[8], 0, 0, 32)).unwrap();
    let mut t = f.tensors()[0].clone();
    t.offset = u64::MAX - 4;
    assert!(f.tensor_data(&t).is_empty());
    t.offset = 0;
    t.n_bytes = u64::MAX;
    assert!(f.tensor_data(&t).is_empty());
}

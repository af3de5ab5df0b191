//! Development aid: rewrites a GGUF with every tensor dequantized to F32.
//! usage: cargo run --release -p microllm-model --example dequant_f32 IN OUT
use std::borrow::Cow;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let f = microllm_gguf::GgufFile::open(std::path::Path::new(&a[1])).unwrap();
    let k = microllm_kernels::Kernels::detect();
    let mut w = microllm_gguf::GgufWriter::new();
    for (key, v) in f.metadata().iter() {
        w.metadata_mut().insert(key, v.clone());
    }
    w.metadata_mut().insert("general.file_type", microllm_gguf::MetaValue::U32(0));
    for t in f.tensors() {
        let mut out = vec![0f32; t.n_elements() as usize];
        let rl = t.dims[0] as usize;
        let rb = t.ty.row_size(rl as u64).unwrap() as usize;
        let data = f.tensor_data(t);
        for (i, row) in out.chunks_mut(rl).enumerate() {
            k.dequantize_row(t.ty, &data[i * rb..(i + 1) * rb], row).unwrap();
        }
        let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.add_tensor(&t.name, &t.dims, microllm_gguf::GgmlType::F32, Cow::Owned(bytes)).unwrap();
    }
    w.write_file(std::path::Path::new(&a[2])).unwrap();
}

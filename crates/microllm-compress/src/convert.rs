//! Carrying out a [`Plan`]: every tensor decoded to f32 and encoded in its new type, rows
//! spread over a thread pool, metadata carried over, the file written atomically.

use std::borrow::Cow;
use std::sync::Mutex;

use microllm_gguf::{GgmlType, GgufFile, GgufWriter, MetaArray, MetaValue};
use microllm_kernels::pool::ThreadPool;
use microllm_kernels::Kernels;

use crate::imatrix::Imatrix;
use crate::recipe::{Plan, TensorPlan};
use crate::{CompressError, Progress};

/// llama.cpp's `GGML_QNT_VERSION`, written as `general.quantization_version`.
pub const QUANTIZATION_VERSION: u32 = 2;

/// How to convert.
#[derive(Clone, Copy, Debug)]
pub struct ConvertOptions<'i> {
    pub kernels: Kernels,
    /// Worker threads (0 = all cores).
    pub n_threads: usize,
    /// Weights the rounding of the quantized types (llama-quantize `--imatrix`).
    pub imatrix: Option<&'i Imatrix>,
    /// Name of the imatrix file, recorded in the metadata as llama-quantize does.
    pub imatrix_file: Option<&'i str>,
}

/// What a conversion did.
#[derive(Clone, Debug, Default)]
pub struct ConvertReport {
    pub n_converted: usize,
    pub n_copied: usize,
    /// Quantized tensors that had no importance data although an imatrix was given.
    pub missing_imatrix: Vec<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Checks a plan against what the kernels can decode and encode, before any work.
fn check_plan(plan: &Plan) -> Result<(), CompressError> {
    for t in plan.tensors.iter().filter(|t| t.from != t.to) {
        if !crate::recipe::WRITABLE.contains(&t.from) {
            return Err(CompressError::UnreadableTensor {
                tensor: t.name.clone(),
                ty: t.from,
            });
        }
        let n_cols = t.dims.first().copied().unwrap_or(0);
        let block = t.to.block_size();
        if n_cols % block as u64 != 0 {
            return Err(CompressError::BadShape {
                tensor: t.name.clone(),
                n_cols,
                ty: t.to,
                block,
            });
        }
    }
    Ok(())
}

/// Converts `file` by `plan` into a writer holding the new file (tensors that keep their type
/// are borrowed from `file`, not copied). Metadata: everything of the source, plus
/// `general.file_type`, `general.quantization_version` and, with an imatrix, llama-quantize's
/// `quantize.imatrix.*` keys; split keys are dropped.
pub fn convert<'f>(
    file: &'f GgufFile,
    plan: &Plan,
    opts: &ConvertOptions<'_>,
    progress: &dyn Progress,
) -> Result<(GgufWriter<'f>, ConvertReport), CompressError> {
    check_plan(plan)?;
    if plan.tensors.len() != file.tensors().len() {
        return Err(CompressError::NotAModel(
            "the plan was made for another file (its tensors differ)".into(),
        ));
    }
    let pool = ThreadPool::new(if opts.n_threads == 0 {
        ThreadPool::default_threads()
    } else {
        opts.n_threads
    })
    .map_err(|e| CompressError::Io {
        path: "<threads>".into(),
        source: e,
    })?;
    let mut w = GgufWriter::with_version(file.version());
    let md = w.metadata_mut();
    *md = file.metadata().clone();
    for k in ["split.no", "split.count", "split.tensors.count"] {
        md.remove(k);
    }
    md.insert(
        "general.quantization_version",
        MetaValue::U32(QUANTIZATION_VERSION),
    );
    md.insert(
        "general.file_type",
        MetaValue::U32(plan.ftype.llama_ftype()),
    );
    if let Some(im) = opts.imatrix {
        if let Some(f) = opts.imatrix_file {
            md.insert("quantize.imatrix.file", MetaValue::String(f.to_string()));
        }
        if let Some(d) = im.datasets.first() {
            md.insert("quantize.imatrix.dataset", MetaValue::String(d.clone()));
        }
        md.insert(
            "quantize.imatrix.entries_count",
            MetaValue::U32(im.entries.len() as u32),
        );
        md.insert(
            "quantize.imatrix.chunks_count",
            MetaValue::U32(im.chunk_count),
        );
    }
    let total: u64 = plan.tensors.iter().map(TensorPlan::n_elements).sum();
    progress.start("quantizing", total);
    let mut report = ConvertReport::default();
    for (info, tp) in file.tensors().iter().zip(&plan.tensors) {
        let src = file.tensor_data(info);
        report.bytes_in += src.len() as u64;
        let data: Cow<'f, [u8]> = if tp.from == tp.to {
            report.n_copied += 1;
            progress.inc(tp.n_elements());
            Cow::Borrowed(src)
        } else {
            report.n_converted += 1;
            let importance = match opts.imatrix {
                Some(im) if tp.to.is_quantized() => {
                    let w = im.importance(&tp.name, tp.dims[0] as usize)?;
                    // The embedding and output matrices are never collected (as in
                    // llama-imatrix), so their absence is not worth a warning.
                    let never_collected = !tp.name.starts_with("blk.");
                    if w.is_none() && !never_collected {
                        report.missing_imatrix.push(tp.name.clone());
                    }
                    w
                }
                _ => None,
            };
            Cow::Owned(convert_tensor(
                &pool,
                opts.kernels,
                tp,
                src,
                importance.as_deref(),
                progress,
            )?)
        };
        report.bytes_out += data.len() as u64;
        w.add_tensor(&tp.name, &tp.dims, tp.to, data)?;
    }
    progress.finish();
    Ok((w, report))
}

/// Decodes and re-encodes one tensor, rows spread over the pool.
fn convert_tensor(
    pool: &ThreadPool,
    kernels: Kernels,
    tp: &TensorPlan,
    src: &[u8],
    importance: Option<&[f32]>,
    progress: &dyn Progress,
) -> Result<Vec<u8>, CompressError> {
    let n_cols = tp.dims[0] as usize;
    let n_rows = (tp.n_elements() / tp.dims[0].max(1)) as usize;
    let src_row = row_size(tp.from, n_cols, &tp.name)?;
    let dst_row = row_size(tp.to, n_cols, &tp.name)?;
    let mut out = vec![0u8; dst_row * n_rows];
    if n_rows == 0 || dst_row == 0 {
        return Ok(out);
    }
    // About 1 MiB of output per task: enough tasks to balance two to many threads.
    let rows_per_task = ((1 << 20) / dst_row).clamp(1, n_rows);
    let error = Mutex::new(None);
    pool.for_each_chunk_mut(&mut out, rows_per_task * dst_row, |ci, chunk| {
        let mut row = vec![0f32; n_cols];
        let r0 = ci * rows_per_task;
        for (k, dst) in chunk.chunks_exact_mut(dst_row).enumerate() {
            let r = r0 + k;
            let res = kernels
                .dequantize_row(tp.from, &src[r * src_row..(r + 1) * src_row], &mut row)
                .and_then(|()| kernels.quantize_row_weighted(tp.to, &row, importance, dst));
            if let Err(e) = res {
                let mut slot = error.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(e);
                return;
            }
        }
        progress.inc((chunk.len() / dst_row * n_cols) as u64);
    });
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e.into());
    }
    Ok(out)
}

fn row_size(ty: GgmlType, n_cols: usize, name: &str) -> Result<usize, CompressError> {
    ty.row_size(n_cols as u64)
        .map(|s| s as usize)
        .ok_or_else(|| CompressError::BadShape {
            tensor: name.to_string(),
            n_cols: n_cols as u64,
            ty,
            block: ty.block_size(),
        })
}

/// The share of a file's bytes in tensor data, as bits per weight (all tensors).
pub fn bits_per_weight(file: &GgufFile) -> f64 {
    let (bytes, elems) = file.tensors().iter().fold((0u64, 0u64), |(b, e), t| {
        (b + t.n_bytes, e + t.n_elements())
    });
    if elems == 0 {
        0.0
    } else {
        bytes as f64 * 8.0 / elems as f64
    }
}

/// Keeps the metadata arrays of per-layer values consistent when layers are dropped: every
/// `{arch}.*` array with exactly `n_layer` elements loses the entries of `dropped`.
pub(crate) fn filter_layer_array(a: &MetaArray, keep: &[bool]) -> Option<MetaArray> {
    fn f<T: Clone>(v: &[T], keep: &[bool]) -> Vec<T> {
        v.iter()
            .zip(keep)
            .filter(|(_, &k)| k)
            .map(|(x, _)| x.clone())
            .collect()
    }
    if a.len() != keep.len() {
        return None;
    }
    Some(match a {
        MetaArray::U8(v) => MetaArray::U8(f(v, keep)),
        MetaArray::I8(v) => MetaArray::I8(f(v, keep)),
        MetaArray::U16(v) => MetaArray::U16(f(v, keep)),
        MetaArray::I16(v) => MetaArray::I16(f(v, keep)),
        MetaArray::U32(v) => MetaArray::U32(f(v, keep)),
        MetaArray::I32(v) => MetaArray::I32(f(v, keep)),
        MetaArray::U64(v) => MetaArray::U64(f(v, keep)),
        MetaArray::I64(v) => MetaArray::I64(f(v, keep)),
        MetaArray::F32(v) => MetaArray::F32(f(v, keep)),
        MetaArray::F64(v) => MetaArray::F64(f(v, keep)),
        MetaArray::Bool(v) => MetaArray::Bool(f(v, keep)),
        MetaArray::String(v) => MetaArray::String(f(v, keep)),
        MetaArray::Array(v) => MetaArray::Array(f(v, keep)),
    })
}

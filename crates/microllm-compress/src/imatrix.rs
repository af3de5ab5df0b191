//! Importance matrices: for every matmul weight `blk.*`, the sum over calibration tokens of
//! the square of each input column (and the number of tokens), so the quantizer can spend its
//! rounding error where the activations are small.
//!
//! File format: llama.cpp's GGUF imatrix (what `llama-imatrix` writes by default and
//! `llama-quantize --imatrix` reads), so files move both ways: `general.type = "imatrix"`,
//! `imatrix.datasets` (array of strings), `imatrix.chunk_count` and `imatrix.chunk_size`
//! (u32), and per weight `W` two F32 tensors, `W.in_sum2` (dims `[n_cols, 1]`, the sums of
//! x²) and `W.counts` (dims `[1, 1]`, the token count). The importance handed to the
//! quantizer is `in_sum2 / counts`, as llama-quantize computes it.

use std::collections::BTreeMap;
use std::path::Path;

use microllm_gguf::{GgmlType, GgufFile, GgufWriter, MetaArray, MetaValue};
use microllm_model::{Logits, Model, Observer, QMatrix, StateOptions};

use crate::eval::windows;
use crate::{CompressError, Progress};

/// One weight's statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct ImatrixEntry {
    /// Σ x² per input column.
    pub sums: Vec<f64>,
    /// Number of input rows (tokens) summed.
    pub count: u64,
}

/// An importance matrix.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Imatrix {
    pub entries: BTreeMap<String, ImatrixEntry>,
    /// Names of the calibration files.
    pub datasets: Vec<String>,
    pub chunk_count: u32,
    pub chunk_size: u32,
}

impl Imatrix {
    /// The importance of each column of weight `name` (mean x²), checked against its row
    /// length; `None` when the matrix has no entry for it.
    pub fn importance(&self, name: &str, n_cols: usize) -> Result<Option<Vec<f32>>, CompressError> {
        let Some(e) = self.entries.get(name) else {
            return Ok(None);
        };
        if e.sums.len() != n_cols {
            return Err(CompressError::Imatrix(format!(
                "the entry for {name} has {} columns but the tensor has {n_cols}; \
                 the importance matrix was computed for another model",
                e.sums.len()
            )));
        }
        if e.count == 0 {
            return Ok(Some(vec![1.0; n_cols]));
        }
        Ok(Some(
            e.sums
                .iter()
                .map(|&s| (s / e.count as f64) as f32)
                .collect(),
        ))
    }

    /// Writes the matrix in llama.cpp's GGUF imatrix format (atomically).
    pub fn save(&self, path: &Path) -> Result<(), CompressError> {
        let mut w = GgufWriter::new();
        let md = w.metadata_mut();
        md.insert("general.type", MetaValue::String("imatrix".into()));
        md.insert(
            "imatrix.datasets",
            MetaValue::Array(MetaArray::String(self.datasets.clone())),
        );
        md.insert("imatrix.chunk_count", MetaValue::U32(self.chunk_count));
        md.insert("imatrix.chunk_size", MetaValue::U32(self.chunk_size));
        for (name, e) in &self.entries {
            let sums: Vec<f32> = e.sums.iter().map(|&s| s as f32).collect();
            w.add_tensor_f32(&format!("{name}.in_sum2"), &[e.sums.len() as u64, 1], &sums)?;
            w.add_tensor_f32(&format!("{name}.counts"), &[1, 1], &[e.count as f32])?;
        }
        w.write_file(path)?;
        Ok(())
    }

    /// Reads a GGUF imatrix (ours or llama-imatrix's; one matrix per weight, not MoE).
    pub fn load(path: &Path) -> Result<Self, CompressError> {
        let file = GgufFile::open(path)?;
        Self::from_gguf(&file)
    }

    /// Reads the matrix from an opened GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, CompressError> {
        let md = file.metadata();
        let bad = |m: String| CompressError::Imatrix(m);
        if md.get_str("general.type").ok().flatten() != Some("imatrix") {
            return Err(bad(
                "the file is not an importance matrix (general.type is not \"imatrix\"); \
                 make one with `microllm imatrix -m MODEL -f TEXT`"
                    .into(),
            ));
        }
        let datasets = md
            .get_str_array("imatrix.datasets")
            .ok()
            .flatten()
            .map(<[String]>::to_vec)
            .unwrap_or_default();
        let chunk_count = md
            .get_u32("imatrix.chunk_count")
            .ok()
            .flatten()
            .unwrap_or(0);
        let chunk_size = md.get_u32("imatrix.chunk_size").ok().flatten().unwrap_or(0);
        let read_f32 = |name: &str| -> Result<Vec<f32>, CompressError> {
            let t = file
                .tensor(name)
                .ok_or_else(|| bad(format!("tensor {name} is missing")))?;
            if t.ty != GgmlType::F32 {
                return Err(bad(format!("tensor {name} is {}, not F32", t.ty)));
            }
            Ok(file
                .tensor_data(t)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let mut entries = BTreeMap::new();
        for t in file.tensors() {
            let Some(name) = t.name.strip_suffix(".in_sum2") else {
                continue;
            };
            let sums = read_f32(&t.name)?;
            let counts = read_f32(&format!("{name}.counts"))?;
            if counts.len() != 1 {
                return Err(bad(format!(
                    "{name} has {} matrices (a mixture-of-experts imatrix); microllm reads one per weight",
                    counts.len()
                )));
            }
            let c = counts[0];
            if !c.is_finite() || c < 0.0 || sums.iter().any(|s| !s.is_finite() || *s < 0.0) {
                return Err(bad(format!(
                    "{name} holds negative or non-finite values; the file is corrupt"
                )));
            }
            entries.insert(
                name.to_string(),
                ImatrixEntry {
                    sums: sums.into_iter().map(f64::from).collect(),
                    count: c.round() as u64,
                },
            );
        }
        if entries.is_empty() {
            return Err(bad("the file holds no entries".into()));
        }
        Ok(Imatrix {
            entries,
            datasets,
            chunk_count,
            chunk_size,
        })
    }
}

/// Accumulates x² per input column of every `blk.*` matmul.
struct Collector<'a> {
    entries: &'a mut BTreeMap<String, ImatrixEntry>,
}

impl Observer for Collector<'_> {
    fn matmul_input(&mut self, w: &QMatrix, x: &[f32], n_tok: usize) {
        // As llama-imatrix by default: the output projection is not collected.
        if !w.name().starts_with("blk.") || w.n_cols == 0 {
            return;
        }
        let e = self
            .entries
            .entry(w.name().to_string())
            .or_insert_with(|| ImatrixEntry {
                sums: vec![0.0; w.n_cols],
                count: 0,
            });
        if e.sums.len() != w.n_cols {
            return;
        }
        for row in x.chunks_exact(w.n_cols).take(n_tok) {
            for (s, &v) in e.sums.iter_mut().zip(row) {
                *s += f64::from(v) * f64::from(v);
            }
        }
        e.count += n_tok as u64;
    }
}

/// Computes an importance matrix on `tokens` cut into windows of `n_ctx` (the first token of
/// each replaced by `bos` when given, as llama-imatrix does), at most `max_chunks` windows.
pub fn collect(
    model: &Model,
    tokens: &[u32],
    bos: Option<u32>,
    n_ctx: usize,
    max_chunks: Option<usize>,
    dataset: &str,
    progress: &dyn Progress,
) -> Result<Imatrix, CompressError> {
    let wins = windows(tokens, bos, n_ctx, max_chunks)?;
    let mut state = model.new_state(StateOptions {
        n_ctx,
        n_batch: n_ctx.min(512),
        ..StateOptions::default()
    })?;
    let mut entries = BTreeMap::new();
    progress.start("imatrix", wins.len() as u64);
    for w in &wins {
        state.reset();
        model.forward_observed(
            &mut state,
            w,
            Logits::None,
            &mut Collector {
                entries: &mut entries,
            },
        )?;
        progress.inc(1);
    }
    progress.finish();
    Ok(Imatrix {
        entries,
        datasets: vec![dataset.to_string()],
        chunk_count: wins.len() as u32,
        chunk_size: n_ctx as u32,
    })
}

//! Depth pruning: drop whole transformer blocks.
//!
//! Which blocks: the ones that change the residual stream least. For block `i` the score is
//! the mean over calibration tokens of the angular distance `arccos(cos(h_i, h_{i+1})) / π`
//! between the residual stream entering it (`h_i`) and leaving it (`h_{i+1}`) (Gromov et al.,
//! "The Unreasonable Ineffectiveness of the Deeper Layers", applied to single blocks); the
//! `N` lowest scores are dropped.
//!
//! The pruned file keeps everything else: tensors `blk.{i}.*` of the dropped blocks are left
//! out, the others renumbered densely, `{arch}.block_count` fixed, and every per-layer
//! metadata array (`{arch}.*` with one value per block) filtered the same way.

use std::borrow::Cow;

use microllm_gguf::{GgufFile, GgufWriter, MetaValue};
use microllm_model::{Logits, Model, Observer, StateOptions};

use crate::convert::filter_layer_array;
use crate::eval::windows;
use crate::{CompressError, Progress};

/// Which blocks to drop: how many (chosen on calibration text) or which.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropSpec {
    Count(usize),
    Layers(Vec<usize>),
}

impl DropSpec {
    /// `N` or a comma-separated list `i,j,k`. A single number is a count; write a list of
    /// one block as `i,` (trailing comma).
    pub fn parse(s: &str) -> Result<Self, CompressError> {
        let bad = |m: String| CompressError::BadLayers(m);
        let s = s.trim();
        if !s.contains(',') {
            return s.parse().map(DropSpec::Count).map_err(|_| {
                bad(format!(
                    "{s:?} is neither a count N nor a list i,j,k of block numbers"
                ))
            });
        }
        let mut v = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            v.push(
                part.parse()
                    .map_err(|_| bad(format!("{part:?} in {s:?} is not a block number")))?,
            );
        }
        Ok(DropSpec::Layers(v))
    }
}

/// Records the angular distance between consecutive residual streams.
struct AngleObserver {
    n_embd: usize,
    prev: Vec<f32>,
    prev_layer: Option<usize>,
    sums: Vec<f64>,
    counts: Vec<u64>,
}

impl Observer for AngleObserver {
    fn hidden(&mut self, layer: usize, x: &[f32], n_tok: usize) {
        let d = self.n_embd;
        if let Some(p) = self.prev_layer {
            if p + 1 == layer && self.prev.len() == x.len() && layer <= self.sums.len() {
                for (a, b) in self.prev.chunks_exact(d).zip(x.chunks_exact(d)).take(n_tok) {
                    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
                    for (&u, &v) in a.iter().zip(b) {
                        ab += f64::from(u) * f64::from(v);
                        aa += f64::from(u) * f64::from(u);
                        bb += f64::from(v) * f64::from(v);
                    }
                    let cos = if aa > 0.0 && bb > 0.0 {
                        (ab / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0)
                    } else {
                        1.0
                    };
                    self.sums[p] += cos.acos() / std::f64::consts::PI;
                    self.counts[p] += 1;
                }
            }
        }
        self.prev.clear();
        self.prev.extend_from_slice(x);
        self.prev_layer = Some(layer);
    }
}

/// The mean angular distance (0..1) between the input and the output of every block on the
/// calibration windows.
pub fn block_scores(
    model: &Model,
    tokens: &[u32],
    bos: Option<u32>,
    n_ctx: usize,
    max_chunks: Option<usize>,
    progress: &dyn Progress,
) -> Result<Vec<f64>, CompressError> {
    let wins = windows(tokens, bos, n_ctx, max_chunks)?;
    let n_layer = model.config.n_layer;
    let mut state = model.new_state(StateOptions {
        n_ctx,
        n_batch: n_ctx.min(512),
        ..StateOptions::default()
    })?;
    let mut obs = AngleObserver {
        n_embd: model.config.n_embd,
        prev: Vec::new(),
        prev_layer: None,
        sums: vec![0.0; n_layer],
        counts: vec![0; n_layer],
    };
    progress.start("scoring blocks", wins.len() as u64);
    for w in &wins {
        state.reset();
        obs.prev_layer = None;
        model.forward_observed(&mut state, w, Logits::None, &mut obs)?;
        progress.inc(1);
    }
    progress.finish();
    Ok(obs
        .sums
        .iter()
        .zip(&obs.counts)
        .map(|(&s, &c)| if c == 0 { f64::NAN } else { s / c as f64 })
        .collect())
}

/// The `n` blocks with the lowest scores, ascending by block number.
pub fn pick_blocks(scores: &[f64], n: usize) -> Result<Vec<usize>, CompressError> {
    if n == 0 || n >= scores.len() {
        return Err(CompressError::BadLayers(format!(
            "cannot drop {n} of {} blocks; drop at least 1 and keep at least 1",
            scores.len()
        )));
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut picked = idx[..n].to_vec();
    picked.sort_unstable();
    Ok(picked)
}

/// The block count of `file` (`{arch}.block_count`).
pub fn block_count(file: &GgufFile) -> Result<usize, CompressError> {
    let arch = file
        .architecture()
        .ok_or_else(|| CompressError::BadLayers("the file has no general.architecture".into()))?;
    let n = file
        .metadata()
        .get_u32(&format!("{arch}.block_count"))?
        .ok_or_else(|| CompressError::BadLayers(format!("the file has no {arch}.block_count")))?;
    Ok(n as usize)
}

/// A writer for `file` without the blocks in `drop` (block numbers of `file`).
pub fn prune<'f>(
    file: &'f GgufFile,
    drop: &[usize],
) -> Result<(GgufWriter<'f>, Vec<String>), CompressError> {
    let n_layer = block_count(file)?;
    let arch = file.architecture().unwrap_or_default().to_string();
    let mut keep = vec![true; n_layer];
    for &i in drop {
        if i >= n_layer {
            return Err(CompressError::BadLayers(format!(
                "block {i} does not exist (the model has blocks 0..{})",
                n_layer.saturating_sub(1)
            )));
        }
        if !keep[i] {
            return Err(CompressError::BadLayers(format!(
                "block {i} is listed twice"
            )));
        }
        keep[i] = false;
    }
    let n_keep = keep.iter().filter(|&&k| k).count();
    if n_keep == 0 || n_keep == n_layer {
        return Err(CompressError::BadLayers(format!(
            "dropping {} of {n_layer} blocks; drop at least 1 and keep at least 1",
            n_layer - n_keep
        )));
    }
    let mut new_index = vec![usize::MAX; n_layer];
    let mut next = 0;
    for i in 0..n_layer {
        if keep[i] {
            new_index[i] = next;
            next += 1;
        }
    }
    let mut warnings = Vec::new();
    let mut w = GgufWriter::with_version(file.version());
    let md = w.metadata_mut();
    *md = file.metadata().clone();
    md.insert(format!("{arch}.block_count"), MetaValue::U32(n_keep as u32));
    let prefix = format!("{arch}.");
    let per_layer: Vec<(String, MetaValue)> = file
        .metadata()
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .filter_map(|(k, v)| {
            let a = v.as_array()?;
            filter_layer_array(a, &keep).map(|a| (k.to_string(), MetaValue::Array(a)))
        })
        .collect();
    let has_pattern_array = per_layer
        .iter()
        .any(|(k, _)| k.ends_with("sliding_window_pattern"));
    for (k, v) in per_layer {
        md.insert(k, v);
    }
    if arch.starts_with("gemma") && !has_pattern_array {
        warnings.push(format!(
            "{arch} decides which blocks use the sliding window by their position; after \
             renumbering some blocks change kind, expect a larger quality cost"
        ));
    }
    for t in file.tensors() {
        let name = match t.name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((n, rest)) => match n.parse::<usize>() {
                Ok(i) if i < n_layer => {
                    if !keep[i] {
                        continue;
                    }
                    format!("blk.{}.{rest}", new_index[i])
                }
                _ => {
                    return Err(CompressError::BadLayers(format!(
                        "tensor {} names a block outside 0..{n_layer}; the file is inconsistent",
                        t.name
                    )))
                }
            },
            None => t.name.clone(),
        };
        w.add_tensor(&name, &t.dims, t.ty, Cow::Borrowed(file.tensor_data(t)))?;
    }
    Ok((w, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_specs() {
        assert_eq!(DropSpec::parse("4").unwrap(), DropSpec::Count(4));
        assert_eq!(
            DropSpec::parse("3,5, 7").unwrap(),
            DropSpec::Layers(vec![3, 5, 7])
        );
        assert_eq!(DropSpec::parse("2,").unwrap(), DropSpec::Layers(vec![2]));
        assert!(DropSpec::parse("x").is_err());
        assert!(DropSpec::parse("1,a").is_err());
    }

    #[test]
    fn picks_lowest() {
        let s = [0.5, 0.1, 0.3, 0.05, 0.9];
        assert_eq!(pick_blocks(&s, 2).unwrap(), vec![1, 3]);
        assert!(pick_blocks(&s, 5).is_err());
        assert!(pick_blocks(&s, 0).is_err());
    }
}

//! Packing the weights at load: every matrix whose format has a packed layout
//! (`microllm_kernels::packed`: Q4_0, Q4_1, Q8_0) is repacked once into the panel kernels'
//! interleaved layout, at its original size, so that decode and small batches stream it with
//! no per-call unpacking; the file's pages of a packed matrix are then released (they stay in
//! the page cache), so resident memory holds the weights once. Results are bit-identical to
//! the panel matmul on the original bytes, so a model is packed or not without changing any
//! output but the llama.cpp-exact path's, which never uses packed weights.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use microllm_gguf::GgufFile;
use microllm_kernels::panel::PANEL_ROWS;
use microllm_kernels::pool::ThreadPool;
use microllm_kernels::Kernels;

use crate::weights::{QMatrix, Weights};

/// What packing did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Matrices packed.
    pub matrices: usize,
    /// Their bytes (the same packed as in the file).
    pub bytes: u64,
    /// Matrices of a packable format left unpacked (scales not exactly f16).
    pub refused: usize,
}

/// A packed matrix's bytes: an anonymous mapping with transparent huge pages where the OS
/// allows them (packing SmolLM2's 96 MB at load faulted in 24k zeroed 4 KiB pages), read-only
/// once filled; a plain allocation if mapping fails.
#[derive(Debug)]
pub enum PackedBuf {
    Map(memmap2::Mmap),
    Heap(Vec<u8>),
}

impl std::ops::Deref for PackedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            PackedBuf::Map(m) => m,
            PackedBuf::Heap(v) => v,
        }
    }
}

/// Zeroed, writable storage for `len` packed bytes, sealed read-only when filled.
enum Fresh {
    Map(memmap2::MmapMut),
    Heap(Vec<u8>),
}

impl Fresh {
    fn new(len: usize) -> Fresh {
        match memmap2::MmapMut::map_anon(len) {
            Ok(m) => {
                #[cfg(target_os = "linux")]
                let _ = m.advise(memmap2::Advice::HugePage);
                Fresh::Map(m)
            }
            Err(_) => Fresh::Heap(vec![0u8; len]),
        }
    }
    fn bytes(&mut self) -> &mut [u8] {
        match self {
            Fresh::Map(m) => m,
            Fresh::Heap(v) => v,
        }
    }
    /// The filled bytes, read-only; `None` if the OS refused to protect the mapping (the
    /// matrix then stays unpacked: slower, same results).
    fn seal(self) -> Option<PackedBuf> {
        match self {
            Fresh::Map(m) => m.make_read_only().ok().map(PackedBuf::Map),
            Fresh::Heap(v) => Some(PackedBuf::Heap(v)),
        }
    }
}

/// Packs one matrix, splitting its panels over the pool; `None` if the format has no packed
/// layout or a scale is not exactly an f16.
fn pack_matrix(
    m: &QMatrix,
    file: &GgufFile,
    kernels: &Kernels,
    pool: &ThreadPool,
) -> Option<Arc<PackedBuf>> {
    let len = kernels.packed_len(m.ty, m.n_cols, m.n_rows)?;
    let data = m.data(file);
    let panel = kernels.packed_len(m.ty, m.n_cols, PANEL_ROWS)?;
    let n_panels = m.n_rows.div_ceil(PANEL_ROWS);
    // A few chunks per thread: whole panels each.
    let per_chunk = n_panels.div_ceil(pool.n_threads() * 4).max(1);
    let mut buf = Fresh::new(len);
    let ok = AtomicBool::new(true);
    pool.for_each_chunk_mut(buf.bytes(), per_chunk * panel, |ci, dst| {
        let r0 = ci * per_chunk * PANEL_ROWS;
        let n = (per_chunk * PANEL_ROWS).min(m.n_rows - r0);
        let w = &data[r0 * m.row_bytes..(r0 + n) * m.row_bytes];
        if !kernels.pack(m.ty, m.n_cols, w, n, dst) {
            ok.store(false, Ordering::Relaxed);
        }
    });
    if !ok.into_inner() {
        return None;
    }
    buf.seal().map(Arc::new)
}

/// Packs every packable matrix of `weights` and releases the file pages it copied.
pub(crate) fn pack_weights(
    weights: &mut Weights,
    file: &GgufFile,
    kernels: &Kernels,
    pool: &ThreadPool,
) -> PackStats {
    let mut stats = PackStats::default();
    let mut mats: Vec<&mut QMatrix> = Vec::new();
    for l in &mut weights.layers {
        mats.extend([
            &mut l.wq,
            &mut l.wk,
            &mut l.wv,
            &mut l.wo,
            &mut l.w_gate,
            &mut l.w_up,
            &mut l.w_down,
        ]);
    }
    mats.push(&mut weights.output);
    for m in mats {
        if !kernels.pack_supports(m.ty) {
            continue;
        }
        match pack_matrix(m, file, kernels, pool) {
            Some(p) => {
                stats.matrices += 1;
                stats.bytes += p.len() as u64;
                m.packed = Some(p);
                file.release_pages(m.info());
            }
            None => stats.refused += 1,
        }
    }
    stats
}

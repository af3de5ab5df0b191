//! Packing the weights at load: every matrix whose format has a packed layout
//! (`microllm_kernels::packed`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) is repacked once
//! into the panel kernels' interleaved layout, at its original size, so that decode and small
//! batches stream it with no per-call unpacking; the file's pages of a packed matrix are then
//! released (they stay in the page cache), so resident memory holds the weights once. Results
//! are bit-identical to the panel matmul on the original bytes, so a model is packed or not
//! without changing any output but the llama.cpp-exact path's, which never uses packed
//! weights. The other matrices (formats with no packed layout, such as F16, Q2_K or Q3_K)
//! are copied into the same arena as they are, so that every matrix a decode step
//! streams sits on huge pages (same bytes, same results on every path).

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
    /// Matrices of a format with no packed layout copied into the arena as they are.
    pub copied: usize,
}

/// The packed matrices' bytes, all in one arena: an anonymous mapping with transparent huge
/// pages where the OS allows them, read-only once filled; a plain allocation if mapping fails.
/// One arena rather than a mapping per matrix because a huge page needs 2 MiB of one mapping:
/// SmolLM2's layer matrices (0.2-1.1 MB each) got none when mapped one by one, so decode
/// walked the page tables of ~16k 4 KiB pages per token. In the arena the matrices follow
/// each other in the order a forward pass reads them.
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

/// One matrix's packed bytes: a range of the shared arena.
#[derive(Clone, Debug)]
pub struct PackedSlice {
    buf: Arc<PackedBuf>,
    start: usize,
    len: usize,
}

impl std::ops::Deref for PackedSlice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// Zeroed, writable storage for `len` packed bytes, sealed read-only when filled.
enum Fresh {
    Map(memmap2::MmapMut),
    Heap(Vec<u8>),
}

/// Huge-page size on x86-64 Linux: the arena's matrices start at a multiple of it.
const HUGE: usize = 2 << 20;

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
    /// matrices then stay unpacked: slower, same results).
    fn seal(self) -> Option<PackedBuf> {
        match self {
            Fresh::Map(m) => m.make_read_only().ok().map(PackedBuf::Map),
            Fresh::Heap(v) => Some(PackedBuf::Heap(v)),
        }
    }
}

/// Packs one matrix into `dst` (its `packed_len` bytes), splitting its panels over the pool;
/// false if a scale is not exactly an f16.
fn pack_matrix(
    m: &QMatrix,
    file: &GgufFile,
    kernels: &Kernels,
    pool: &ThreadPool,
    dst: &mut [u8],
) -> bool {
    let data = m.data(file);
    let Some(panel) = kernels.packed_len(m.ty, m.n_cols, PANEL_ROWS) else {
        return false;
    };
    let n_panels = m.n_rows.div_ceil(PANEL_ROWS);
    // A few chunks per thread: whole pairs of panels each (packed Q8_0 pairs its panels
    // from each call's first, so chunks start at even panels).
    let per_chunk = n_panels.div_ceil(pool.n_threads() * 4).next_multiple_of(2);
    let ok = AtomicBool::new(true);
    pool.for_each_chunk_mut(dst, per_chunk * panel, |ci, dst| {
        let r0 = ci * per_chunk * PANEL_ROWS;
        let n = (per_chunk * PANEL_ROWS).min(m.n_rows - r0);
        let w = &data[r0 * m.row_bytes..(r0 + n) * m.row_bytes];
        if !kernels.pack(m.ty, m.n_cols, w, n, dst) {
            ok.store(false, Ordering::Relaxed);
        }
    });
    ok.into_inner()
}

/// Packs every packable matrix of `weights` into one arena and releases the file pages it
/// copied.
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
    // Each matrix's place in the arena, packed or (no packed layout) copied: consecutive,
    // each at a multiple of 64 bytes (a cache line; every packed length is a multiple of 32
    // already).
    let mut places: Vec<(&mut QMatrix, usize, usize, bool)> = Vec::new();
    let mut total = 0usize;
    for m in mats {
        let (len, pack) = match kernels.packed_len(m.ty, m.n_cols, m.n_rows) {
            Some(len) if kernels.pack_supports(m.ty) => (len, true),
            _ => (m.data(file).len(), false),
        };
        places.push((m, total, len, pack));
        total = (total + len).next_multiple_of(64);
    }
    if places.is_empty() {
        return stats;
    }
    // The arena starts at a huge-page boundary inside a mapping one huge page longer.
    let mut fresh = Fresh::new(total + HUGE);
    let bytes = fresh.bytes();
    let base = (HUGE - bytes.as_ptr() as usize % HUGE) % HUGE;
    let mut ok = vec![false; places.len()];
    for ((m, at, len, pack), ok) in places.iter().zip(&mut ok) {
        let dst = &mut bytes[base + at..base + at + len];
        *ok = if *pack {
            pack_matrix(m, file, kernels, pool, dst)
        } else {
            dst.copy_from_slice(m.data(file));
            true
        };
        if *ok {
            // Released at once, so that the file's pages and the packed copy are not both
            // resident for the whole model at the end of packing (peak RSS). Released pages
            // stay in the page cache: if sealing fails below, the unpacked path reads them
            // back.
            file.release_pages(m.info());
        }
    }
    let Some(buf) = fresh.seal().map(Arc::new) else {
        stats.refused = places.iter().filter(|p| p.3).count();
        return stats;
    };
    for ((m, at, len, pack), ok) in places.into_iter().zip(ok) {
        let slice = PackedSlice {
            buf: buf.clone(),
            start: base + at,
            len,
        };
        if !pack {
            stats.copied += 1;
            m.copy = Some(slice);
        } else if !ok {
            stats.refused += 1;
        } else {
            stats.matrices += 1;
            stats.bytes += len as u64;
            m.packed = Some(slice);
        }
    }
    stats
}

//! A small fork-join thread pool for the forward pass.
//!
//! Why not rayon: a decode step of a micro model issues a few hundred parallel operations of
//! a few microseconds each (30 narrow layers × ~5 matmul/attention ops), so the per-operation
//! synchronisation cost must be well under a microsecond when the workers are hot. Workers here
//! spin on an epoch counter for a short while after each job (the next op is usually only a few
//! microseconds away) and only then sleep on a condition variable, so an idle pool costs no CPU.
//!
//! The calling thread takes part as thread 0; `n_threads - 1` workers are spawned once. The
//! only `unsafe` is the lifetime erasure of the job closure, sound because [`ThreadPool::broadcast`]
//! does not return before every worker has finished with it, and the disjoint-chunk hand-out of
//! [`ThreadPool::for_each_chunk_mut`], sound because each chunk index is claimed exactly once.

use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// How many spin iterations a worker waits for the next job before it sleeps.
const SPIN_ITERS: u32 = 200_000;

type Job = &'static (dyn Fn(usize) + Sync);

struct Shared {
    /// Incremented once per published job; workers run the job when they see a new value.
    epoch: AtomicUsize,
    /// The current job (valid while `pending > 0`).
    job: Mutex<Option<Job>>,
    /// Workers that have not yet finished the current job.
    pending: AtomicUsize,
    /// Set when a worker's job panicked; re-raised on the calling thread.
    panicked: AtomicBool,
    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: Mutex<usize>,
    wake: Condvar,
    shutdown: AtomicBool,
}

/// A fixed-size pool; the caller is thread 0 of every job.
pub struct ThreadPool {
    n_threads: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises jobs when the pool is shared between callers.
    run_lock: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads)
            .finish()
    }
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all (the caller plus `n_threads - 1` workers).
    /// `0` is treated as 1.
    pub fn new(n_threads: usize) -> std::io::Result<Self> {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let mut workers = Vec::with_capacity(n_threads - 1);
        for tid in 1..n_threads {
            let shared = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("microllm-worker-{tid}"))
                .spawn(move || worker_loop(&shared, tid))?;
            workers.push(handle);
        }
        Ok(Self {
            n_threads,
            shared,
            workers,
            run_lock: Mutex::new(()),
        })
    }

    /// The number of physical cores as far as we can tell (Linux: distinct core ids in
    /// /proc/cpuinfo), else the available parallelism.
    pub fn default_threads() -> usize {
        let logical = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        physical_cores().unwrap_or(logical).clamp(1, logical)
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(tid)` once on every thread of the pool (`tid` in `0..n_threads`) and returns
    /// when all have finished. A panic in any thread is re-raised here.
    pub fn broadcast(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.n_threads == 1 {
            f(0);
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the job reference is only used by workers between the epoch bump below and
        // their decrement of `pending`; this function waits until `pending` is zero and clears
        // the job before returning, so the erased lifetime never outlives the borrow of `f`.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
        self.shared
            .pending
            .store(self.n_threads - 1, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let sleepers = self
                .shared
                .sleepers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if *sleepers > 0 {
                self.shared.wake.notify_all();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        let mut spins = 0u32;
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if self.shared.panicked.swap(false, Ordering::SeqCst) {
            panic!("a microllm worker thread panicked");
        }
    }

    /// Runs `f(i)` for every `i` in `0..n_tasks`, spread over the pool with dynamic
    /// scheduling (an atomic counter), and returns when all are done.
    pub fn for_each(&self, n_tasks: usize, f: impl Fn(usize) + Sync) {
        if n_tasks == 0 {
            return;
        }
        if self.n_threads == 1 || n_tasks == 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        let next = AtomicUsize::new(0);
        self.broadcast(&|_tid| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n_tasks {
                break;
            }
            f(i);
        });
    }

    /// Splits `data` into consecutive chunks of `chunk_len` elements (the last may be shorter)
    /// and runs `f(chunk_index, chunk)` for each, spread over the pool.
    pub fn for_each_chunk_mut<T: Send>(
        &self,
        data: &mut [T],
        chunk_len: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        assert!(chunk_len > 0, "chunk_len must be positive");
        let n_chunks = data.len().div_ceil(chunk_len);
        if self.n_threads == 1 || n_chunks <= 1 {
            for (i, c) in data.chunks_mut(chunk_len).enumerate() {
                f(i, c);
            }
            return;
        }
        let base = SendPtr(data.as_mut_ptr(), PhantomData);
        let len = data.len();
        self.for_each(n_chunks, |i| {
            let start = i * chunk_len;
            let end = (start + chunk_len).min(len);
            // SAFETY: `for_each` hands out each index `i < n_chunks` exactly once, so the
            // ranges `start..end` are disjoint and within `data`, which stays mutably borrowed
            // (and so unaliased) until `for_each` returns.
            let chunk =
                unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
            f(i, chunk);
        });
    }

    /// Runs `f(first, end, part)` over disjoint pieces covering items `0..n_items` of `data`
    /// (item `i` is `data[offset(i)..offset(i + 1)]`; `offset` non-decreasing, `offset(0)`
    /// at least 0 and `offset(n_items)` at most `data.len()`; `part` is the pieces' items).
    /// Every thread owns one contiguous run of the items and works through it front to
    /// back, `grain` items at a time — one long memory stream per thread, as a decode
    /// matmul wants — and a thread that is done takes `steal` items at a time from the back
    /// of the runs still going, so a thread that starts late or runs slow (a noisy
    /// neighbour, a late wake-up) is helped instead of waited for.
    ///
    /// # Panics
    /// If `offset` is not non-decreasing within `data` at the items' ends, or a grain is 0.
    pub fn for_each_run_mut<T: Send>(
        &self,
        data: &mut [T],
        n_items: usize,
        offset: impl Fn(usize) -> usize + Sync,
        grain: usize,
        steal: usize,
        f: impl Fn(usize, usize, &mut [T]) + Sync,
    ) {
        let end = offset(n_items);
        assert!(
            offset(0) <= end && end <= data.len(),
            "for_each_run_mut: items outside the data"
        );
        let base = SendPtr(data.as_mut_ptr(), PhantomData);
        self.runs(n_items, grain, steal, |a, b| {
            let (o0, o1) = (offset(a), offset(b));
            assert!(
                o0 <= o1 && o1 <= end,
                "for_each_run_mut: offsets must be non-decreasing"
            );
            // SAFETY: `runs` hands out every item index exactly once, so the pieces' item
            // ranges are disjoint, and with a non-decreasing `offset` (checked) so are their
            // element ranges, all within `data` (checked), which stays mutably borrowed until
            // this call returns (after every thread is done).
            let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(o0), o1 - o0) };
            f(a, b, part);
        });
    }

    /// [`ThreadPool::for_each_run_mut`] over the columns of an `n x width` row-major buffer
    /// (a batched matmul's output, one row per token): the items are the column ranges
    /// `offset(i)..offset(i + 1)`, and each piece gets the [`ColumnBlock`] of its items'
    /// columns in every row.
    ///
    /// # Panics
    /// As [`ThreadPool::for_each_run_mut`], with the offsets within `width`.
    #[allow(clippy::too_many_arguments)]
    pub fn for_each_run_columns_mut<T: Send>(
        &self,
        data: &mut [T],
        n: usize,
        width: usize,
        n_items: usize,
        offset: impl Fn(usize) -> usize + Sync,
        grain: usize,
        steal: usize,
        f: impl Fn(usize, usize, ColumnBlock<'_, T>) + Sync,
    ) {
        let total = n.checked_mul(width).expect("size overflows");
        assert!(
            data.len() >= total,
            "for_each_run_columns_mut: data too short"
        );
        let end = offset(n_items);
        assert!(
            offset(0) <= end && end <= width,
            "for_each_run_columns_mut: items outside the columns"
        );
        let base = SendPtr(data.as_mut_ptr(), PhantomData);
        self.runs(n_items, grain, steal, |a, b| {
            let (c0, c1) = (offset(a), offset(b));
            assert!(
                c0 <= c1 && c1 <= end,
                "for_each_run_columns_mut: offsets must be non-decreasing"
            );
            // Disjoint column ranges (each item once, offsets non-decreasing: checked), inside
            // the n x width buffer (checked), which stays borrowed until this call returns.
            f(
                a,
                b,
                ColumnBlock {
                    ptr: base.get(),
                    c0,
                    len: c1 - c0,
                    width,
                    n,
                    _borrow: PhantomData,
                },
            );
        });
    }

    /// The scheduling of [`ThreadPool::for_each_run_mut`]: `f(a, b)` for disjoint item
    /// ranges covering `0..n_items`, each item exactly once.
    fn runs(&self, n_items: usize, grain: usize, steal: usize, f: impl Fn(usize, usize) + Sync) {
        assert!(grain > 0 && steal > 0, "grains must be positive");
        assert!(n_items <= u32::MAX as usize, "too many items");
        let n = self.n_threads;
        if n == 1 || n > MAX_RUNS || n_items <= grain {
            if n_items > 0 {
                f(0, n_items);
            }
            return;
        }
        // Runs start at even items (see `claim`).
        let cut = |t: usize| {
            if t == n {
                n_items
            } else {
                (t * n_items / n) & !1
            }
        };
        let slots: [RunSlot; MAX_RUNS] = std::array::from_fn(|t| {
            let (a, b) = (cut(t), cut(t + 1));
            RunSlot(AtomicU64::new(if t < n {
                (a as u64) | ((b as u64) << 32)
            } else {
                0
            }))
        });
        self.broadcast(&|tid| {
            while let Some((a, b)) = claim(&slots[tid], grain, true) {
                f(a, b);
            }
            for v in (1..n).map(|d| (tid + d) % n) {
                while let Some((a, b)) = claim(&slots[v], steal, false) {
                    f(a, b);
                }
            }
        });
    }
}

/// Most threads [`ThreadPool::for_each_run_mut`] balances by stealing (more run its plain
/// split).
const MAX_RUNS: usize = 16;

/// One thread's run of [`ThreadPool::for_each_run_mut`]: its next item (low 32 bits) and the
/// end of what is left of it (high 32 bits). A cache line each: the owner claims from the
/// front without disturbing the other threads.
#[repr(align(64))]
struct RunSlot(AtomicU64);

/// Claims about `n` items of a run from its front (`front`) or its back; `None` when it is
/// used up. Pieces start at even items (runs do, and a claim rounds its cut to even, taking
/// one item more or less than `n`), so they never split an even-odd pair of items: packed
/// panels come in such pairs (`packed::pair_panel`), which a matmul call must not start
/// inside.
fn claim(slot: &RunSlot, n: usize, front: bool) -> Option<(usize, usize)> {
    let mut cur = slot.0.load(Ordering::Acquire);
    loop {
        let (a, b) = ((cur & 0xffff_ffff) as usize, (cur >> 32) as usize);
        if a >= b {
            return None;
        }
        let (na, nb, got) = if front {
            let e = if b - a <= n { b } else { (a + n + 1) & !1 }.min(b);
            (e, b, (a, e))
        } else {
            let s = if b - a <= n { a } else { (b - n) & !1 }.max(a);
            (a, s, (s, b))
        };
        let new = (na as u64) | ((nb as u64) << 32);
        match slot
            .0
            .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Some(got),
            Err(c) => cur = c,
        }
    }
}

/// Columns `c0 .. c0 + len` of every row of an `n x width` row-major buffer, handed to one
/// task by [`ThreadPool::for_each_column_block_mut`]; the blocks of one call are disjoint.
pub struct ColumnBlock<'a, T> {
    ptr: *mut T,
    c0: usize,
    len: usize,
    width: usize,
    n: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

impl<T> ColumnBlock<'_, T> {
    /// The first column of the block.
    pub fn first(&self) -> usize {
        self.c0
    }
    /// Columns in the block.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the block has no columns.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Row `r`'s part of the block.
    ///
    /// # Panics
    /// If `r` is not below the number of rows.
    pub fn row_mut(&mut self, r: usize) -> &mut [T] {
        assert!(r < self.n, "row {r} of {}", self.n);
        // SAFETY: row r's columns c0..c0+len lie inside the n x width buffer (asserted at
        // creation: c0 + len <= width, r < n); blocks of one call have disjoint column
        // ranges, so no other task can reach these elements, and `&mut self` keeps this
        // task from holding two views of them at once. The buffer stays mutably borrowed
        // until the pool call returns, which outlives the block.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * self.width + self.c0), self.len) }
    }
}

/// A raw pointer that may cross threads; used only for disjoint chunks (see above).
struct SendPtr<'a, T>(*mut T, PhantomData<&'a mut [T]>);
// SAFETY: the pointer is only dereferenced for disjoint ranges, one thread per range.
unsafe impl<T: Send> Sync for SendPtr<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for SendPtr<'_, T> {}
impl<T> SendPtr<'_, T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

fn worker_loop(shared: &Shared, tid: usize) {
    let mut seen = 0usize;
    loop {
        // Wait for a new epoch: spin first, then sleep.
        let mut spins = 0u32;
        loop {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            let e = shared.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if spins < SPIN_ITERS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let mut sleepers = shared.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            *sleepers += 1;
            while shared.epoch.load(Ordering::Acquire) == seen
                && !shared.shutdown.load(Ordering::Acquire)
            {
                sleepers = shared
                    .wake
                    .wait(sleepers)
                    .unwrap_or_else(|e| e.into_inner());
            }
            *sleepers -= 1;
            spins = 0;
        }
        let job = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            if catch_unwind(AssertUnwindSafe(|| job(tid))).is_err() {
                shared.panicked.store(true, Ordering::SeqCst);
            }
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _sleepers = self
                .shared
                .sleepers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn physical_cores() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut cores = std::collections::HashSet::new();
    let mut phys = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("physical id") {
            phys = v.split(':').nth(1).map(|s| s.trim().to_string());
        } else if let Some(v) = line.strip_prefix("core id") {
            let core = v.split(':').nth(1)?.trim().to_string();
            cores.insert((phys.clone(), core));
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_runs_cover_every_element_once() {
        for n in [1, 2, 3] {
            let pool = ThreadPool::new(n).unwrap();
            // 3 rows of 11 columns, items of 4 columns (the last 3): (row, col) gets its
            // item's index + 1, once.
            let mut m = vec![0usize; 33];
            pool.for_each_run_columns_mut(
                &mut m,
                3,
                11,
                3,
                |i| (4 * i).min(11),
                1,
                1,
                |a, b, mut blk| {
                    assert_eq!(blk.first(), 4 * a);
                    assert_eq!(blk.len(), (4 * b).min(11) - 4 * a);
                    for r in 0..3 {
                        for (j, x) in blk.row_mut(r).iter_mut().enumerate() {
                            *x += (4 * a + j) / 4 + 1;
                        }
                    }
                },
            );
            let want: Vec<usize> = (0..33).map(|j| (j % 11) / 4 + 1).collect();
            assert_eq!(m, want);
        }
    }

    #[test]
    fn runs_cover_every_item_once_and_slow_threads_are_helped() {
        for n in [1, 2, 3, 5] {
            let pool = ThreadPool::new(n).unwrap();
            for (n_items, grain, steal) in
                [(0, 4, 1), (1, 4, 1), (7, 2, 1), (100, 16, 4), (333, 5, 3)]
            {
                // Items of unequal sizes (item i has i % 3 elements), each element gets its
                // item's index + 1 once.
                let offs: Vec<usize> = (0..=n_items).map(|i| (0..i).map(|j| j % 3).sum()).collect();
                let mut v = vec![0usize; offs[n_items] + 2];
                pool.for_each_run_mut(
                    &mut v,
                    n_items,
                    |i| offs[i],
                    grain,
                    steal,
                    |a, b, part| {
                        assert_eq!(part.len(), offs[b] - offs[a]);
                        assert_eq!(a % 2, 0, "a piece starts inside a pair");
                        let mut k = 0;
                        for i in a..b {
                            for _ in 0..i % 3 {
                                part[k] += i + 1;
                                k += 1;
                            }
                        }
                    },
                );
                let want: Vec<usize> = (0..n_items)
                    .flat_map(|i| std::iter::repeat_n(i + 1, i % 3))
                    .chain([0, 0])
                    .collect();
                assert_eq!(v, want, "{n} threads, {n_items} items");
            }
        }
        // A thread that stalls on its first piece: the others finish its run.
        let pool = ThreadPool::new(2).unwrap();
        let mut v = vec![0u8; 64];
        let who: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
        pool.for_each_run_mut(
            &mut v,
            64,
            |i| i,
            4,
            1,
            |a, b, part| {
                if a == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                for (i, x) in (a..b).zip(part.iter_mut()) {
                    *x += 1;
                    who[i].store(a + 1, Ordering::Relaxed);
                }
            },
        );
        assert!(v.iter().all(|&x| x == 1));
        // Thread 0's run is items 0..32: with it asleep on 0..4, the rest of it was stolen
        // from the back, one item at a time rounded to a pair.
        assert_eq!(who[31].load(Ordering::Relaxed), 31);
        assert_eq!(who[30].load(Ordering::Relaxed), 31);
    }

    #[test]
    fn for_each_visits_every_task_once() {
        for n in [1, 2, 3] {
            let pool = ThreadPool::new(n).unwrap();
            for n_tasks in [0, 1, 2, 7, 100, 1000] {
                let counts: Vec<AtomicUsize> = (0..n_tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.for_each(n_tasks, |i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn chunks_are_disjoint_and_complete() {
        let pool = ThreadPool::new(2).unwrap();
        let mut v = vec![0u32; 1003];
        for _ in 0..50 {
            pool.for_each_chunk_mut(&mut v, 10, |i, c| {
                for (j, x) in c.iter_mut().enumerate() {
                    *x += (i * 10 + j) as u32;
                }
            });
        }
        for (j, x) in v.iter().enumerate() {
            assert_eq!(*x, 50 * j as u32);
        }
    }

    #[test]
    fn broadcast_runs_on_every_thread_and_survives_sleep() {
        let pool = ThreadPool::new(3).unwrap();
        for round in 0..3 {
            let seen: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.broadcast(&|tid| {
                seen[tid].fetch_add(1, Ordering::Relaxed);
            });
            assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            if round == 1 {
                // Let the workers fall asleep, then wake them.
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        }
    }

    #[test]
    fn worker_panic_is_reraised() {
        let pool = ThreadPool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.broadcast(&|tid| {
                if tid == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        // The pool still works afterwards.
        let n = AtomicUsize::new(0);
        pool.for_each(10, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
    }
}

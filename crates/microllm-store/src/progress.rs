//! Progress reporting hook; the CLI draws a bar, the library only counts bytes.

/// Receives progress of long operations (downloads, extraction, hashing).
pub trait Progress {
    /// A new phase starts: `what` is a short human label, `total_bytes` if known.
    fn start(&mut self, what: &str, total_bytes: Option<u64>);
    /// `n` more bytes of the current phase are done.
    fn advance(&mut self, n: u64);
    /// The current phase is over.
    fn finish(&mut self);
}

/// Ignores all progress.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&mut self, _what: &str, _total_bytes: Option<u64>) {}
    fn advance(&mut self, _n: u64) {}
    fn finish(&mut self) {}
}

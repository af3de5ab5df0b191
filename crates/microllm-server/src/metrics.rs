//! Prometheus text exposition, written by hand: a few atomics and fixed-bucket histograms are
//! all the server needs, and they are updated from the engine thread without locks.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the time-to-first-token histogram.
const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Upper bounds (seconds) of the per-output-token latency histogram.
const TPOT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A cumulative histogram with fixed bucket bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket; the last is +Inf.
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < s);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += self.counts[self.bounds.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cum}");
    }
}

/// Why a generation ended, as counted in `microllm_generations_finished_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    Stop,
    Length,
    /// The client went away (stream closed, connection dropped).
    Cancelled,
    Error,
}

/// Every number `/metrics` reports.
#[derive(Debug)]
pub struct Metrics {
    /// `(endpoint, status) -> count`.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens actually evaluated (the rest came from the prefix cache).
    pub prompt_tokens_evaluated: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub prefix_cache_hit_tokens: AtomicU64,
    pub prefix_cache_hit_requests: AtomicU64,
    /// Hit tokens whose KV was copied from the block store (the rest were still in the slot).
    pub prefix_cache_copied_tokens: AtomicU64,
    pub prefix_cache_blocks: AtomicU64,
    pub prefix_cache_bytes: AtomicU64,
    pub prefix_cache_capacity_bytes: AtomicU64,
    pub prefix_cache_evictions: AtomicU64,
    finished: [AtomicU64; 4],
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub queue_depth: AtomicU64,
    pub slots_total: AtomicU64,
    pub slots_active: AtomicU64,
    pub kv_tokens_used: AtomicU64,
    pub kv_tokens_capacity: AtomicU64,
    pub kv_bytes: AtomicU64,
    pub decode_steps: AtomicU64,
    pub decode_step_sequences: AtomicU64,
    /// Steps whose one forward held both decode rows and prompt rows.
    pub mixed_steps: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            prompt_tokens_evaluated: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            prefix_cache_hit_tokens: AtomicU64::new(0),
            prefix_cache_hit_requests: AtomicU64::new(0),
            prefix_cache_copied_tokens: AtomicU64::new(0),
            prefix_cache_blocks: AtomicU64::new(0),
            prefix_cache_bytes: AtomicU64::new(0),
            prefix_cache_capacity_bytes: AtomicU64::new(0),
            prefix_cache_evictions: AtomicU64::new(0),
            finished: Default::default(),
            ttft: Histogram::new(TTFT_BUCKETS),
            tpot: Histogram::new(TPOT_BUCKETS),
            queue_depth: AtomicU64::new(0),
            slots_total: AtomicU64::new(0),
            slots_active: AtomicU64::new(0),
            kv_tokens_used: AtomicU64::new(0),
            kv_tokens_capacity: AtomicU64::new(0),
            kv_bytes: AtomicU64::new(0),
            decode_steps: AtomicU64::new(0),
            decode_step_sequences: AtomicU64::new(0),
            mixed_steps: AtomicU64::new(0),
        }
    }

    pub fn record_request(&self, endpoint: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((endpoint.to_string(), status)).or_insert(0) += 1;
    }

    pub fn record_finish(&self, r: EndReason) {
        self.finished[r as usize].fetch_add(1, Relaxed);
    }

    pub fn finished(&self, r: EndReason) -> u64 {
        self.finished[r as usize].load(Relaxed)
    }

    /// The Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        let _ = writeln!(
            o,
            "# HELP microllm_requests_total HTTP requests answered, by endpoint and status."
        );
        let _ = writeln!(o, "# TYPE microllm_requests_total counter");
        {
            let m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            for ((ep, status), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "microllm_requests_total{{endpoint=\"{ep}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let counter = |o: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} counter");
            let _ = writeln!(o, "{name} {}", v.load(Relaxed));
        };
        let gauge = |o: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} gauge");
            let _ = writeln!(o, "{name} {v}");
        };
        counter(
            &mut o,
            "microllm_prompt_tokens_total",
            "Prompt tokens of admitted generations (tokens in).",
            &self.prompt_tokens,
        );
        counter(
            &mut o,
            "microllm_prompt_tokens_evaluated_total",
            "Prompt tokens evaluated by the model (the rest were reused from the prefix cache).",
            &self.prompt_tokens_evaluated,
        );
        counter(
            &mut o,
            "microllm_generated_tokens_total",
            "Tokens generated (tokens out).",
            &self.generated_tokens,
        );
        counter(
            &mut o,
            "microllm_prefix_cache_hit_tokens_total",
            "Prompt tokens whose KV came from the prefix cache instead of being evaluated.",
            &self.prefix_cache_hit_tokens,
        );
        counter(
            &mut o,
            "microllm_prefix_cache_hit_requests_total",
            "Generations that reused at least one cached prompt token.",
            &self.prefix_cache_hit_requests,
        );
        counter(
            &mut o,
            "microllm_prefix_cache_copied_tokens_total",
            "Hit tokens whose KV was copied from the prefix cache's blocks (the other hit tokens were still in the request's slot).",
            &self.prefix_cache_copied_tokens,
        );
        counter(
            &mut o,
            "microllm_prefix_cache_evictions_total",
            "Prefix-cache blocks evicted (least recently used first) to stay within --prefix-cache-mb.",
            &self.prefix_cache_evictions,
        );
        gauge(
            &mut o,
            "microllm_prefix_cache_blocks",
            "Blocks of KV held by the prefix cache.",
            self.prefix_cache_blocks.load(Relaxed) as f64,
        );
        gauge(
            &mut o,
            "microllm_prefix_cache_bytes",
            "Bytes of KV held by the prefix cache.",
            self.prefix_cache_bytes.load(Relaxed) as f64,
        );
        gauge(
            &mut o,
            "microllm_prefix_cache_capacity_bytes",
            "Most bytes of KV the prefix cache holds (--prefix-cache-mb, in whole blocks).",
            self.prefix_cache_capacity_bytes.load(Relaxed) as f64,
        );
        let _ = writeln!(
            o,
            "# HELP microllm_generations_finished_total Generations ended, by reason (cancelled = client went away)."
        );
        let _ = writeln!(o, "# TYPE microllm_generations_finished_total counter");
        for (r, name) in [
            (EndReason::Stop, "stop"),
            (EndReason::Length, "length"),
            (EndReason::Cancelled, "cancelled"),
            (EndReason::Error, "error"),
        ] {
            let _ = writeln!(
                o,
                "microllm_generations_finished_total{{reason=\"{name}\"}} {}",
                self.finished(r)
            );
        }
        self.ttft.render(
            &mut o,
            "microllm_time_to_first_token_seconds",
            "From a request's arrival (queue wait included) to its first generated token.",
        );
        self.tpot.render(
            &mut o,
            "microllm_time_per_output_token_seconds",
            "Time between consecutive generated tokens of one sequence.",
        );
        gauge(
            &mut o,
            "microllm_queue_depth",
            "Requests waiting for a free slot.",
            self.queue_depth.load(Relaxed) as f64,
        );
        gauge(
            &mut o,
            "microllm_slots_total",
            "Sequence slots (--parallel), each with its own KV cache.",
            self.slots_total.load(Relaxed) as f64,
        );
        gauge(
            &mut o,
            "microllm_slots_active",
            "Slots running a generation.",
            self.slots_active.load(Relaxed) as f64,
        );
        gauge(
            &mut o,
            "microllm_kv_cache_tokens",
            "Token positions held in the KV caches of all slots (active sequences and cached prefixes).",
            self.kv_tokens_used.load(Relaxed) as f64,
        );
        gauge(
            &mut o,
            "microllm_kv_cache_capacity_tokens",
            "Token positions the KV caches of all slots can hold.",
            self.kv_tokens_capacity.load(Relaxed) as f64,
        );
        let cap = self.kv_tokens_capacity.load(Relaxed).max(1) as f64;
        gauge(
            &mut o,
            "microllm_kv_cache_usage_ratio",
            "microllm_kv_cache_tokens / microllm_kv_cache_capacity_tokens.",
            self.kv_tokens_used.load(Relaxed) as f64 / cap,
        );
        gauge(
            &mut o,
            "microllm_kv_cache_bytes",
            "Bytes allocated for the KV caches.",
            self.kv_bytes.load(Relaxed) as f64,
        );
        if let Some(rss) = resident_bytes() {
            gauge(
                &mut o,
                "process_resident_memory_bytes",
                "Resident memory of the server process (VmRSS).",
                rss as f64,
            );
        }
        counter(
            &mut o,
            "microllm_decode_steps_total",
            "Engine steps that advanced at least one decoding sequence.",
            &self.decode_steps,
        );
        counter(
            &mut o,
            "microllm_decode_step_sequences_total",
            "Sequences advanced, summed over decode steps (divide by steps for the mean batch).",
            &self.decode_step_sequences,
        );
        counter(
            &mut o,
            "microllm_mixed_steps_total",
            "Engine steps whose single forward held decode rows and prompt rows together.",
            &self.mixed_steps,
        );
        o
    }
}

/// The process's resident set size, from `/proc/self/status` (Linux; `None` elsewhere).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"1\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_count 3\n"), "{s}");
        assert!(s.contains("x_sum 5.55"), "{s}");
    }

    #[test]
    fn render_has_every_family() {
        let m = Metrics::new();
        m.record_request("/v1/chat/completions", 200);
        m.record_request("/v1/chat/completions", 200);
        m.record_finish(EndReason::Cancelled);
        let s = m.render();
        assert!(s.contains(
            "microllm_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2"
        ));
        assert!(s.contains("microllm_generations_finished_total{reason=\"cancelled\"} 1"));
        for fam in [
            "microllm_prompt_tokens_total",
            "microllm_generated_tokens_total",
            "microllm_time_to_first_token_seconds_bucket",
            "microllm_time_per_output_token_seconds_bucket",
            "microllm_queue_depth",
            "microllm_kv_cache_usage_ratio",
            "microllm_prefix_cache_hit_tokens_total",
        ] {
            assert!(s.contains(fam), "{fam} missing:\n{s}");
        }
    }
}

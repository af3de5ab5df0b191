//! A small load generator for `microllm serve` (not part of the test suite).
//!
//! ```text
//! cargo run --release -p microllm-server --example load -- \
//!     --url http://127.0.0.1:8080 --concurrency 32 --seconds 60 [--max-tokens 32]
//!     [--ignore-eos] [--stream] [--temperature 0.7] [--api-key KEY]
//! ```
//! Each of `concurrency` threads sends chat completions back to back (different prompts,
//! temperature 0.7 unless told otherwise) for `seconds`; a 429 is counted and retried after 100 ms. At the end it
//! prints the count per status, latency percentiles, the server's generated tokens per second
//! (from /metrics) and the server's resident memory (process_resident_memory_bytes) sampled
//! every 5 s. It exits non-zero if any answer was a 5xx or a transport error.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    url: String,
    concurrency: usize,
    seconds: u64,
    max_tokens: usize,
    ignore_eos: bool,
    stream: bool,
    temperature: f32,
    api_key: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        url: "http://127.0.0.1:8080".into(),
        concurrency: 32,
        seconds: 60,
        max_tokens: 32,
        ignore_eos: false,
        stream: false,
        temperature: 0.7,
        api_key: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = val()?,
            "--concurrency" => a.concurrency = val()?.parse().map_err(|e| format!("{e}"))?,
            "--seconds" => a.seconds = val()?.parse().map_err(|e| format!("{e}"))?,
            "--max-tokens" => a.max_tokens = val()?.parse().map_err(|e| format!("{e}"))?,
            "--temperature" => a.temperature = val()?.parse().map_err(|e| format!("{e}"))?,
            "--api-key" => a.api_key = Some(val()?),
            "--ignore-eos" => a.ignore_eos = true,
            "--stream" => a.stream = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// `(status, body)`; status 0 = transport error.
fn call(agent: &ureq::Agent, a: &Args, path: &str, body: Option<&str>) -> (u16, String) {
    let url = format!("{}{path}", a.url);
    let resp = match body {
        None => {
            let mut r = agent.get(&url);
            if let Some(k) = &a.api_key {
                r = r.header("Authorization", &format!("Bearer {k}"));
            }
            r.call()
        }
        Some(b) => {
            let mut r = agent.post(&url).header("Content-Type", "application/json");
            if let Some(k) = &a.api_key {
                r = r.header("Authorization", &format!("Bearer {k}"));
            }
            r.send(b)
        }
    };
    match resp {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let mut s = String::new();
            let _ = r.body_mut().as_reader().read_to_string(&mut s);
            (status, s)
        }
        Err(e) => (0, e.to_string()),
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

const TOPICS: &[&str] = &[
    "the sea",
    "a lighthouse",
    "bread",
    "winter",
    "a train",
    "bees",
    "the moon",
    "a garden",
    "chess",
    "rain",
    "coffee",
    "a library",
    "volcanoes",
    "music",
    "a bicycle",
    "clouds",
];

fn main() {
    let a = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let ag = agent();
    let (s, m0) = call(&ag, &a, "/metrics", None);
    if s != 200 {
        eprintln!("error: GET /metrics answered {s}: {m0}");
        std::process::exit(2);
    }
    let gen0 = metric(&m0, "microllm_generated_tokens_total").unwrap_or(0.0);
    let rss0 = metric(&m0, "process_resident_memory_bytes").unwrap_or(0.0);

    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, u64>::new()));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let mut handles = Vec::new();
    for w in 0..a.concurrency {
        let (a, stop, statuses, latencies) = (
            Arc::clone(&a),
            Arc::clone(&stop),
            Arc::clone(&statuses),
            Arc::clone(&latencies),
        );
        handles.push(std::thread::spawn(move || {
            let ag = agent();
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let topic = TOPICS[i % TOPICS.len()];
                i += a.concurrency;
                let body = serde_json::json!({
                    "messages": [{"role": "user", "content": format!("Tell me about {topic}. ({i})")}],
                    "max_tokens": a.max_tokens,
                    "temperature": a.temperature,
                    "ignore_eos": a.ignore_eos,
                    "stream": a.stream,
                })
                .to_string();
                let t0 = Instant::now();
                let (s, text) = call(&ag, &a, "/v1/chat/completions", Some(&body));
                let dt = t0.elapsed().as_secs_f64();
                *statuses.lock().unwrap().entry(s).or_insert(0) += 1;
                match s {
                    200 => latencies.lock().unwrap().push(dt),
                    429 => std::thread::sleep(Duration::from_millis(100)),
                    _ => {
                        eprintln!("status {s}: {}", text.chars().take(300).collect::<String>());
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }));
    }

    let t0 = Instant::now();
    let mut rss_samples = Vec::new();
    // (time, generated tokens) at every sample while all the clients are busy.
    let mut gen_samples = Vec::new();
    while t0.elapsed() < Duration::from_secs(a.seconds) {
        std::thread::sleep(Duration::from_secs(5).min(Duration::from_secs(a.seconds)));
        let (_, m) = call(&ag, &a, "/metrics", None);
        let rss = metric(&m, "process_resident_memory_bytes").unwrap_or(0.0);
        let q = metric(&m, "microllm_queue_depth").unwrap_or(0.0);
        let gen = metric(&m, "microllm_generated_tokens_total").unwrap_or(0.0);
        gen_samples.push((t0.elapsed().as_secs_f64(), gen));
        rss_samples.push((t0.elapsed().as_secs(), rss));
        eprintln!(
            "t={:>3}s rss={:.1} MiB queue={q}",
            t0.elapsed().as_secs(),
            rss / 1048576.0
        );
    }
    stop.store(true, Ordering::Relaxed);
    // Requests in flight finish; the rates count the whole time.
    for h in handles {
        let _ = h.join();
    }
    let wall = t0.elapsed().as_secs_f64();
    let (_, m1) = call(&ag, &a, "/metrics", None);
    let gen1 = metric(&m1, "microllm_generated_tokens_total").unwrap_or(0.0);
    let rss1 = metric(&m1, "process_resident_memory_bytes").unwrap_or(0.0);

    let statuses = statuses.lock().unwrap().clone();
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize]
        }
    };
    let total: u64 = statuses.values().sum();
    println!(
        "concurrency {} for {:.1} s: {total} requests",
        a.concurrency, wall
    );
    for (s, n) in &statuses {
        let name = if *s == 0 {
            "transport error".to_string()
        } else {
            s.to_string()
        };
        println!("  {name}: {n}");
    }
    println!(
        "  latency of 200s: p50 {:.2} s, p95 {:.2} s, max {:.2} s",
        pct(0.5),
        pct(0.95),
        pct(1.0)
    );
    println!(
        "  generated tokens: {} ({:.1} tok/s aggregate)",
        gen1 - gen0,
        (gen1 - gen0) / wall
    );
    // Steady state: from the first sample (every client has a request running) to the last
    // one before the clients stop, so neither the start nor the drain of the last requests
    // (fewer streams) counts.
    if let (Some(f), Some(l)) = (gen_samples.first(), gen_samples.last()) {
        if l.0 > f.0 {
            println!(
                "  steady-state decode: {:.1} tok/s aggregate ({:.0} tokens in {:.1} s between the first and last samples)",
                (l.1 - f.1) / (l.0 - f.0),
                l.1 - f.1,
                l.0 - f.0
            );
        }
    }
    let first = rss_samples.first().map_or(rss0, |s| s.1);
    println!(
        "  server RSS: before {:.1} MiB, first sample {:.1} MiB, end {:.1} MiB ({:+.1}% vs first sample)",
        rss0 / 1048576.0,
        first / 1048576.0,
        rss1 / 1048576.0,
        if first > 0.0 { (rss1 / first - 1.0) * 100.0 } else { 0.0 }
    );
    // The soak criterion: RSS at the end against RSS after the first minute of load.
    if let Some(&(t, minute)) = rss_samples.iter().find(|s| s.0 >= 60) {
        println!(
            "  server RSS after the first minute (t={t}s): {:.1} MiB; end {:+.1}% vs it",
            minute / 1048576.0,
            if minute > 0.0 {
                (rss1 / minute - 1.0) * 100.0
            } else {
                0.0
            }
        );
    }
    let bad: u64 = statuses
        .iter()
        .filter(|(s, _)| **s == 0 || **s >= 500)
        .map(|(_, n)| n)
        .sum();
    let other: u64 = statuses
        .iter()
        .filter(|(s, _)| **s != 200 && **s != 429)
        .map(|(_, n)| n)
        .sum();
    println!("  5xx or transport errors: {bad}; statuses other than 200/429: {other}");
    if bad > 0 || other > 0 {
        std::process::exit(1);
    }
}

//! `microllm serve` end to end: the real binary on port 0, spoken to over HTTP.
//!
//! Cheap tests run on a tiny random model written to a temp file (error cases, stop strings,
//! shapes). The rest use the default model (SmolLM2-135M-Instruct, fetched into the store on
//! first use like tests/cli.rs does): concurrent streams against solo runs, the prefix cache,
//! cancellation on disconnect, the queue limit, graceful shutdown, and the official `openai`
//! Python package. Real-model tests take a lock so only one such server computes at a time
//! (2 shared cores). No test asserts a timing.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use microllm_testkit::TinySpec;
use serde_json::{json, Value};

const MODEL: &str = "smollm2-135m-instruct";

/// One real-model server at a time.
static REAL: Mutex<()> = Mutex::new(());

fn real_lock() -> MutexGuard<'static, ()> {
    REAL.lock().unwrap_or_else(|p| p.into_inner())
}

struct Server {
    child: Child,
    base: String,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    fn start(model: &str, extra: &[&str]) -> Server {
        Self::start_in(model, extra, None)
    }

    fn start_in(model: &str, extra: &[&str], dir: Option<tempfile::TempDir>) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_microllm"))
            .env_remove("MICROLLM_MODEL")
            .env("MICROLLM_KERNELS", "auto")
            .args(["serve", "-m", model, "--port", "0", "-t", "2"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start microllm serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
        // Generous: the first real-model test may download the model.
        let line = match rx.recv_timeout(Duration::from_secs(900)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("the server printed no address");
            }
        };
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("first stdout line is not the address: {line:?}")
            })
            .to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        Server {
            child,
            base,
            _dir: dir,
        }
    }

    /// A server on a tiny random model (llama architecture, ChatML template, n_ctx 256).
    fn tiny(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        microllm_testkit::write_tiny_model(&TinySpec::llama(), &path).unwrap();
        let p = path.to_str().unwrap().to_string();
        Self::start_in(&p, extra, Some(dir))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

/// `(status, body)` of a request; `body` is sent as-is.
fn request(method: &str, url: &str, body: Option<&str>, key: Option<&str>) -> (u16, String) {
    let a = agent();
    let mut resp = match (method, body) {
        ("GET", _) => {
            let mut r = a.get(url);
            if let Some(k) = key {
                r = r.header("Authorization", &format!("Bearer {k}"));
            }
            r.call()
        }
        (_, b) => {
            let mut r = a.post(url).header("Content-Type", "application/json");
            if let Some(k) = key {
                r = r.header("Authorization", &format!("Bearer {k}"));
            }
            r.send(b.unwrap_or(""))
        }
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .unwrap();
    (status, text)
}

fn post(srv: &Server, path: &str, body: &Value) -> (u16, Value) {
    let (s, t) = request("POST", &srv.url(path), Some(&body.to_string()), None);
    (s, parse(&t))
}

fn get(srv: &Server, path: &str) -> (u16, String) {
    request("GET", &srv.url(path), None, None)
}

fn parse(t: &str) -> Value {
    serde_json::from_str(t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
}

/// Asserts OpenAI's error shape and returns the error object.
fn assert_error(status: u16, body: &str, want_status: u16, want_type: &str) -> Value {
    assert_eq!(status, want_status, "{body}");
    let v = parse(body);
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(e["type"], want_type, "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    e.clone()
}

/// A counter or gauge from `/metrics` (first sample whose name+labels start with `series`).
fn metric(srv: &Server, series: &str) -> f64 {
    let (s, text) = get(srv, "/metrics");
    assert_eq!(s, 200);
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(60), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An open SSE response: `data:` payloads one at a time.
struct SseReader {
    lines: std::io::Lines<BufReader<Box<dyn Read + Send>>>,
}

impl SseReader {
    fn open(url: &str, body: &Value) -> (u16, SseReader) {
        let resp = agent()
            .post(url)
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        let status = resp.status().as_u16();
        let reader: Box<dyn Read + Send> = Box::new(resp.into_body().into_reader());
        (
            status,
            SseReader {
                lines: BufReader::new(reader).lines(),
            },
        )
    }

    /// The next `data:` payload (`None` at the end of the body).
    fn next_data(&mut self) -> Option<String> {
        for line in self.lines.by_ref() {
            let line = line.ok()?;
            if let Some(d) = line.strip_prefix("data: ") {
                return Some(d.to_string());
            }
            assert!(line.is_empty(), "unexpected SSE line {line:?}");
        }
        None
    }

    /// Every payload up to and including `[DONE]` (or the end of the body).
    fn collect(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = self.next_data() {
            let done = d == "[DONE]";
            out.push(d);
            if done {
                break;
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Tiny model: every error case of the issue, with status and body.

#[test]
fn error_cases_have_openai_shape() {
    let srv = Server::tiny(&[
        "--api-key",
        "sekrit",
        "--max-body",
        "4096",
        "--ctx",
        "64",
        "--alias",
        "tiny",
    ]);
    let key = Some("sekrit");
    let chat = srv.url("/v1/chat/completions");
    let ok_body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});

    // 401: no key, wrong key, malformed header; /health stays open.
    let (s, b) = request("POST", &chat, Some(&ok_body.to_string()), None);
    let e = assert_error(s, &b, 401, "authentication_error");
    assert_eq!(e["code"], "invalid_api_key");
    let (s, b) = request("POST", &chat, Some(&ok_body.to_string()), Some("wrong"));
    assert_error(s, &b, 401, "authentication_error");
    let (s, b) = request("GET", &srv.url("/v1/models"), None, Some("sekri"));
    assert_error(s, &b, 401, "authentication_error");
    let (s, b) = request("GET", &srv.url("/health"), None, None);
    assert_eq!((s, parse(&b)["status"].clone()), (200, json!("ok")));
    // The right key works.
    let (s, b) = request("POST", &chat, Some(&ok_body.to_string()), key);
    assert_eq!(s, 200, "{b}");
    assert_eq!(parse(&b)["model"], "tiny");

    // 400: malformed JSON, wrong types, missing fields.
    for bad in [
        "{not json",
        "",
        r#"{"messages": "hi"}"#,
        r#"{"max_tokens": 3}"#,
        r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#,
    ] {
        let (s, b) = request("POST", &chat, Some(bad), key);
        let e = assert_error(s, &b, 400, "invalid_request_error");
        assert!(
            e["message"].as_str().unwrap().contains("request body"),
            "{bad}: {e}"
        );
    }

    // 400: out-of-range parameters name the parameter.
    for (field, value) in [
        ("temperature", json!(2.5)),
        ("temperature", json!(-1)),
        ("top_p", json!(1.5)),
        ("presence_penalty", json!(-2.5)),
        ("frequency_penalty", json!(3)),
        ("max_tokens", json!(0)),
        ("max_completion_tokens", json!(-1)),
        ("n", json!(2)),
        ("top_logprobs", json!(21)),
    ] {
        let mut body = ok_body.clone();
        body[field] = value.clone();
        if field == "top_logprobs" {
            body["logprobs"] = json!(true);
        }
        let (s, b) = request("POST", &chat, Some(&body.to_string()), key);
        let e = assert_error(s, &b, 400, "invalid_request_error");
        assert_eq!(e["param"], field, "{field}={value}: {e}");
        assert!(e["message"].as_str().unwrap().contains(field), "{e}");
    }
    let (s, b) = request(
        "POST",
        &chat,
        Some(r#"{"messages": [{"role": "tool", "content": "x"}]}"#),
        key,
    );
    assert_error(s, &b, 400, "invalid_request_error");
    let (s, b) = request("POST", &chat, Some(r#"{"messages": []}"#), key);
    assert_error(s, &b, 400, "invalid_request_error");

    // 404: unknown model (named or via /v1/models/{id}), unknown route.
    let mut body = ok_body.clone();
    body["model"] = json!("gpt-4o");
    let (s, b) = request("POST", &chat, Some(&body.to_string()), key);
    let e = assert_error(s, &b, 404, "invalid_request_error");
    assert_eq!(e["code"], "model_not_found");
    assert!(e["message"].as_str().unwrap().contains("gpt-4o"), "{e}");
    let (s, b) = request("GET", &srv.url("/v1/models/gpt-4o"), None, key);
    assert_error(s, &b, 404, "invalid_request_error");
    let (s, b) = request("GET", &srv.url("/v1/models/tiny"), None, key);
    assert_eq!((s, parse(&b)["id"].clone()), (200, json!("tiny")));
    let (s, b) = request("GET", &srv.url("/v2/nothing"), None, key);
    let e = assert_error(s, &b, 404, "invalid_request_error");
    assert_eq!(e["code"], "not_found");
    // The served model's id is accepted, as is no model at all (above).
    let mut body = ok_body.clone();
    body["model"] = json!("tiny");
    assert_eq!(request("POST", &chat, Some(&body.to_string()), key).0, 200);

    // 413: a body over --max-body.
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(8000)}]});
    let (s, b) = request("POST", &chat, Some(&big.to_string()), key);
    let e = assert_error(s, &b, 413, "invalid_request_error");
    assert!(e["message"].as_str().unwrap().contains("4096"), "{e}");

    // 400: the prompt does not fit the context; the message says how many tokens and how
    // many fit.
    let words = "one two three four five six seven eight nine ten ".repeat(8);
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": words}]}),
        ),
        ("/v1/completions", json!({"prompt": words})),
    ] {
        let (s, b) = request("POST", &srv.url(path), Some(&body.to_string()), key);
        let e = assert_error(s, &b, 400, "invalid_request_error");
        assert_eq!(e["code"], "context_length_exceeded");
        let msg = e["message"].as_str().unwrap();
        let (_, tb) = request(
            "POST",
            &srv.url("/tokenize"),
            Some(&json!({"content": words}).to_string()),
            key,
        );
        let n = parse(&tb)["tokens"].as_array().unwrap().len();
        assert!(n > 64, "{n}");
        if path == "/v1/completions" {
            assert!(msg.contains(&format!("has {n} tokens")), "{msg}");
        }
        assert!(msg.contains("at most 63 fit"), "{msg}");
    }

    // Every answer above was counted by endpoint and status.
    let (_, m) = request("GET", &srv.url("/metrics"), None, key);
    for series in [
        "endpoint=\"/v1/chat/completions\",status=\"401\"",
        "endpoint=\"/v1/chat/completions\",status=\"400\"",
        "endpoint=\"/v1/chat/completions\",status=\"404\"",
        "endpoint=\"/v1/chat/completions\",status=\"413\"",
        "endpoint=\"other\",status=\"404\"",
    ] {
        assert!(m.contains(series), "{series} missing:\n{m}");
    }
}

#[test]
fn completions_and_utilities_on_a_tiny_model() {
    let srv = Server::tiny(&["--ctx", "128"]);
    // tokenize / detokenize round trip (llama.cpp shapes).
    let (s, v) = post(&srv, "/tokenize", &json!({"content": "hello world"}));
    assert_eq!(s, 200, "{v}");
    let ids = v["tokens"].clone();
    assert!(!ids.as_array().unwrap().is_empty());
    let (s, v) = post(&srv, "/detokenize", &json!({"tokens": ids}));
    assert_eq!((s, v["content"].clone()), (200, json!("hello world")));
    let (s, v) = post(
        &srv,
        "/tokenize",
        &json!({"content": "hi", "with_pieces": true}),
    );
    assert_eq!(s, 200);
    assert!(v["tokens"][0]["piece"].is_string(), "{v}");
    let (s, v) = post(&srv, "/detokenize", &json!({"tokens": [1, 999999]}));
    assert_eq!(s, 400, "{v}");

    // Greedy completion; then the same request with a stop string taken from the middle of
    // that output (so it usually spans tokens) must end just before it.
    let base = json!({"prompt": "the quick brown fox", "max_tokens": 40, "temperature": 0,
                      "ignore_eos": true});
    let (s, v) = post(&srv, "/v1/completions", &base);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 40);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "{full:?}");
    let stop: String = chars[8..12].iter().collect();
    let cut = full.find(&stop).unwrap();
    let mut with_stop = base.clone();
    with_stop["stop"] = json!(["\u{1}never", stop]);
    let (s, v) = post(&srv, "/v1/completions", &with_stop);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), &full[..cut]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // The same stop in a stream: the text never contains it.
    let mut streamed = with_stop.clone();
    streamed["stream"] = json!(true);
    let (s, sse) = SseReader::open(&srv.url("/v1/completions"), &streamed);
    assert_eq!(s, 200);
    let events = sse.collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut text = String::new();
    let mut finish = Value::Null;
    for e in &events[..events.len() - 1] {
        let v = parse(e);
        text.push_str(v["choices"][0]["text"].as_str().unwrap());
        if !v["choices"][0]["finish_reason"].is_null() {
            finish = v["choices"][0]["finish_reason"].clone();
        }
    }
    assert_eq!((text.as_str(), finish), (&full[..cut], json!("stop")));

    // Seeded sampling is reproducible.
    let sampled = json!({"prompt": "a b c", "max_tokens": 16, "temperature": 1.0, "seed": 42,
                         "ignore_eos": true});
    let a = post(&srv, "/v1/completions", &sampled).1["choices"][0]["text"].clone();
    let b = post(&srv, "/v1/completions", &sampled).1["choices"][0]["text"].clone();
    assert_eq!(a, b);

    // Completion logprobs (legacy shape).
    let (s, v) = post(
        &srv,
        "/v1/completions",
        &json!({"prompt": "x y", "max_tokens": 3, "temperature": 0, "logprobs": 2, "ignore_eos": true}),
    );
    assert_eq!(s, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3, "{lp}");
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2, "{lp}");
    assert!(lp["token_logprobs"][0].as_f64().unwrap() <= 0.0);

    // Embeddings: float and base64, unit length, token-list input.
    let (s, v) = post(&srv, "/v1/embeddings", &json!({"input": ["abc", "def"]}));
    assert_eq!(s, 200, "{v}");
    let e0: Vec<f64> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
    let norm: f64 = e0.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    assert_eq!(v["usage"]["prompt_tokens"], v["usage"]["total_tokens"]);
    let (s, v) = post(
        &srv,
        "/v1/embeddings",
        &json!({"input": "abc", "encoding_format": "base64"}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["data"][0]["embedding"].as_str().unwrap().len(),
        (e0.len() * 4).div_ceil(3) * 4
    );
    let (s, _) = post(&srv, "/v1/embeddings", &json!({"input": ""}));
    assert_eq!(s, 400);
    let (s, _) = post(
        &srv,
        "/v1/embeddings",
        &json!({"input": "abc", "encoding_format": "hex"}),
    );
    assert_eq!(s, 400);

    // Health, models, metrics families.
    let (s, b) = get(&srv, "/v1/models");
    assert_eq!(s, 200);
    let v = parse(&b);
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny");
    let (s, m) = get(&srv, "/metrics");
    assert_eq!(s, 200);
    for fam in [
        "microllm_requests_total",
        "microllm_prompt_tokens_total",
        "microllm_generated_tokens_total",
        "microllm_time_to_first_token_seconds_bucket",
        "microllm_time_per_output_token_seconds_bucket",
        "microllm_queue_depth",
        "microllm_kv_cache_usage_ratio",
        "microllm_prefix_cache_hit_tokens_total",
    ] {
        assert!(m.contains(fam), "{fam}");
    }
}

#[test]
fn sigterm_exits_cleanly() {
    let mut srv = Server::tiny(&["--shutdown-grace", "2"]);
    let (s, _) = post(
        &srv,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 4}),
    );
    assert_eq!(s, 200);
    let ok = Command::new("kill")
        .args(["-TERM", &srv.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "still running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// The real model.

fn stream_tokens(url: &str, body: &Value) -> (Vec<String>, String) {
    let (s, sse) = SseReader::open(url, body);
    assert_eq!(s, 200);
    let mut tokens = Vec::new();
    let mut text = String::new();
    let events = sse.collect();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    for e in &events[..events.len() - 1] {
        let v = parse(e);
        let c = &v["choices"][0];
        text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        if let Some(lps) = c["logprobs"]["content"].as_array() {
            tokens.extend(lps.iter().map(|t| t["token"].as_str().unwrap().to_string()));
        }
    }
    (tokens, text)
}

#[test]
fn concurrent_streams_match_solo_runs() {
    let _g = real_lock();
    let srv = Server::start(
        MODEL,
        &["--parallel", "8", "--ctx", "512", "--max-queue", "32"],
    );
    let topics = [
        "the moon",
        "bread",
        "rivers",
        "cats",
        "music",
        "winter",
        "trains",
        "the ocean",
        "bees",
        "mountains",
        "coffee",
        "libraries",
        "rain",
        "chess",
        "volcanoes",
        "gardens",
    ];
    let body = |t: &str| {
        json!({"messages": [{"role": "user", "content": format!("Write one sentence about {t}.")}],
               "temperature": 0, "max_tokens": 12, "logprobs": true, "stream": true})
    };
    let url = srv.url("/v1/chat/completions");
    let solo: Vec<(Vec<String>, String)> = topics
        .iter()
        .map(|t| stream_tokens(&url, &body(t)))
        .collect();
    let handles: Vec<_> = topics
        .iter()
        .map(|t| {
            let (url, b) = (url.clone(), body(t));
            std::thread::spawn(move || stream_tokens(&url, &b))
        })
        .collect();
    let together: Vec<(Vec<String>, String)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    for ((t, a), b) in topics.iter().zip(&solo).zip(&together) {
        assert!(!a.0.is_empty(), "{t}: no tokens");
        assert_eq!(a, b, "{t}: concurrent output differs from the solo run");
    }
    // They really ran together: some decode step advanced more than one sequence.
    let steps = metric(&srv, "microllm_decode_steps_total");
    let seqs = metric(&srv, "microllm_decode_step_sequences_total");
    assert!(seqs > steps, "steps {steps}, sequences {seqs}");
}

#[test]
fn shared_system_prompt_hits_the_prefix_cache() {
    let _g = real_lock();
    let srv = Server::start(MODEL, &["--parallel", "2", "--ctx", "1024"]);
    let system = "You are the help desk of the city library. ".repeat(50);
    let ask = |q: &str| {
        json!({"messages": [{"role": "system", "content": system},
                            {"role": "user", "content": q}],
               "temperature": 0, "max_tokens": 4})
    };
    let (s, v1) = post(&srv, "/v1/chat/completions", &ask("When do you open?"));
    assert_eq!(s, 200, "{v1}");
    let n_prompt = v1["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(n_prompt > 450, "{n_prompt}");
    let hits0 = metric(&srv, "microllm_prefix_cache_hit_tokens_total");
    let (s, v2) = post(
        &srv,
        "/v1/chat/completions",
        &ask("Can I renew a book online?"),
    );
    assert_eq!(s, 200, "{v2}");
    let cached = v2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let hits = metric(&srv, "microllm_prefix_cache_hit_tokens_total") - hits0;
    assert!(cached >= 450, "cached {cached} of {n_prompt}");
    assert_eq!(hits as u64, cached);
    assert!(metric(&srv, "microllm_prefix_cache_hit_requests_total") >= 1.0);
}

#[test]
fn client_disconnect_cancels_and_full_queue_refuses() {
    let _g = real_lock();
    let srv = Server::start(
        MODEL,
        &["--parallel", "1", "--max-queue", "1", "--ctx", "1024"],
    );
    let long = json!({"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": true,
                      "temperature": 0, "stream": true});
    let url = srv.url("/v1/completions");
    // A occupies the only slot (its first token arrived), B waits in the queue of one.
    let (s, mut a) = SseReader::open(&url, &long);
    assert_eq!(s, 200);
    assert!(a.next_data().is_some());
    let (s, b) = SseReader::open(&url, &long);
    assert_eq!(s, 200);
    wait_for("B queued", || metric(&srv, "microllm_queue_depth") == 1.0);
    // C finds the queue full.
    let (s, body) = request("POST", &url, Some(&long.to_string()), None);
    let e = assert_error(s, &body, 429, "rate_limit_error");
    assert_eq!(e["code"], "queue_full");
    // Dropping A's connection cancels it at once and frees the slot for B; dropping B
    // cancels B.
    drop(a);
    wait_for("A cancelled", || {
        metric(
            &srv,
            "microllm_generations_finished_total{reason=\"cancelled\"}",
        ) >= 1.0
    });
    wait_for("B admitted", || metric(&srv, "microllm_queue_depth") == 0.0);
    drop(b);
    wait_for("B cancelled", || {
        metric(
            &srv,
            "microllm_generations_finished_total{reason=\"cancelled\"}",
        ) >= 2.0
    });
    wait_for("slots idle", || {
        metric(&srv, "microllm_slots_active") == 0.0
    });
    // A non-streamed request whose client gives up is cancelled too.
    let impatient: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let mut plain = long.clone();
    plain["stream"] = json!(false);
    let r = impatient
        .post(&url)
        .header("Content-Type", "application/json")
        .send(plain.to_string());
    assert!(r.is_err(), "900 tokens cannot come back within 2 s");
    wait_for("non-streamed request cancelled", || {
        metric(
            &srv,
            "microllm_generations_finished_total{reason=\"cancelled\"}",
        ) >= 3.0
    });
    wait_for("slots idle again", || {
        metric(&srv, "microllm_slots_active") == 0.0
    });
    // None ran to its 900 tokens.
    assert!(metric(&srv, "microllm_generated_tokens_total") < 2700.0);
    assert_eq!(
        metric(
            &srv,
            "microllm_generations_finished_total{reason=\"length\"}"
        ),
        0.0
    );
}

/// The package installed, or an error saying how it failed.
fn ensure_openai_package() {
    let has = |py: &str| {
        Command::new(py)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if has("python3") {
        return;
    }
    for extra in [&[][..], &["--user"][..], &["--break-system-packages"][..]] {
        let st = Command::new("python3")
            .args(["-m", "pip", "install", "-q", "openai"])
            .args(extra)
            .status();
        if st.is_ok_and(|s| s.success()) && has("python3") {
            return;
        }
    }
    panic!(
        "could not install the `openai` Python package with pip (python3 -m pip install openai)"
    );
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

#[test]
fn official_openai_python_client() {
    ensure_openai_package();
    let _g = real_lock();
    let srv = Server::start(MODEL, &["--api-key", "test-key"]);
    let out = Command::new("python3")
        .arg(script("openai_client.py"))
        .args([&srv.base, "test-key"])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "openai_client.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("checks passed"), "{stdout}");
}

/// Text and token strings of a non-streamed greedy chat answer, and its `cached_tokens`.
fn chat_answer(srv: &Server, body: &Value) -> (String, Vec<String>, u64) {
    let (s, v) = post(srv, "/v1/chat/completions", body);
    assert_eq!(s, 200, "{v}");
    let c = &v["choices"][0];
    let tokens = c["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs: {v}"))
        .iter()
        .map(|t| t["token"].as_str().unwrap().to_string())
        .collect();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    (
        c["message"]["content"].as_str().unwrap().to_string(),
        tokens,
        cached,
    )
}

#[test]
fn prefix_blocks_are_shared_across_slots_and_change_nothing() {
    let _g = real_lock();
    let system = "You answer questions about the opening hours, loans and events of the \
                  city library, briefly and politely. "
        .repeat(20);
    let ask = |q: &str| {
        json!({"messages": [{"role": "system", "content": system},
                            {"role": "user", "content": q}],
               "temperature": 0, "max_tokens": 12, "logprobs": true})
    };
    // Cold: no prefix cache, one slot, nothing cached before.
    let cold = {
        let srv = Server::start(MODEL, &["--parallel", "1", "--prefix-cache-mb", "0"]);
        let a = chat_answer(&srv, &ask("Can I renew a book online?"));
        assert_eq!(a.2, 0, "nothing was cached");
        a
    };

    let srv = Server::start(MODEL, &["--parallel", "2", "--ctx", "1024"]);
    // R1 leaves the system prompt's blocks in the cache (and its whole prompt in slot 0).
    let (_, _, c1) = chat_answer(&srv, &ask("When do you open?"));
    assert_eq!(c1, 0);
    assert!(metric(&srv, "microllm_prefix_cache_blocks") > 10.0);
    // L takes slot 0 (it shares the most with it) and keeps it busy, streaming.
    let mut long = ask("Tell me about the events.");
    long["max_tokens"] = json!(800);
    long["ignore_eos"] = json!(true);
    long["stream"] = json!(true);
    let (s, mut l) = SseReader::open(&srv.url("/v1/chat/completions"), &long);
    assert_eq!(s, 200);
    // The role chunk, then the first token: L is running.
    assert!(l.next_data().is_some() && l.next_data().is_some());
    assert_eq!(metric(&srv, "microllm_slots_active"), 1.0);
    let copied0 = metric(&srv, "microllm_prefix_cache_copied_tokens_total");
    // R2 can only go to slot 1, which holds nothing: its prefix comes from the blocks.
    let (text, tokens, cached) = chat_answer(&srv, &ask("Can I renew a book online?"));
    let copied = metric(&srv, "microllm_prefix_cache_copied_tokens_total") - copied0;
    let n_system = post(&srv, "/tokenize", &json!({"content": system})).1["tokens"]
        .as_array()
        .unwrap()
        .len() as u64;
    assert!(n_system > 400, "{n_system}");
    assert!(
        cached >= n_system - 32,
        "cached {cached} of a {n_system}-token system prompt"
    );
    assert_eq!(
        copied as u64, cached,
        "all of it copied from the block store"
    );
    assert_eq!(cached % 32, 0, "whole blocks");
    // The same answer as without any cache.
    assert!(!tokens.is_empty());
    assert_eq!((&text, &tokens), (&cold.0, &cold.1));
    drop(l);
}

#[test]
fn a_long_prompt_is_admitted_while_streams_keep_going() {
    let _g = real_lock();
    let srv = Server::start(
        MODEL,
        &["--parallel", "2", "--ctx", "2048", "--prefill-chunk", "128"],
    );
    let url = srv.url("/v1/completions");
    let running = json!({"prompt": "Once upon a time, in a small village,", "max_tokens": 48,
                         "ignore_eos": true, "temperature": 0, "logprobs": 0, "stream": true});
    // A 1500-token prompt, as token ids.
    let words = "The history of the printing press begins with movable type in Asia and \
                 continues with Gutenberg in Mainz, whose presses spread across Europe. "
        .repeat(60);
    let ids = post(&srv, "/tokenize", &json!({"content": words})).1["tokens"].clone();
    let ids: Vec<Value> = ids.as_array().unwrap()[..1500].to_vec();
    let long = json!({"prompt": ids, "max_tokens": 8, "temperature": 0, "logprobs": 0,
                      "stream": true});
    /// The text of each token event of a completion stream.
    fn texts(events: &[String]) -> Vec<String> {
        events
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| {
                let v = parse(e);
                let c = &v["choices"][0];
                c["logprobs"]["tokens"].as_array().map(|t| {
                    t.iter()
                        .map(|x| x.as_str().unwrap().to_string())
                        .collect::<Vec<_>>()
                        .join("")
                })
            })
            .collect()
    }
    // Solo answers from another server, so that nothing of the long prompt is cached here.
    let (solo_running, solo_long) = {
        let solo = Server::start(MODEL, &["--parallel", "1", "--ctx", "2048"]);
        let url = solo.url("/v1/completions");
        (
            texts(&SseReader::open(&url, &running).1.collect()),
            texts(&SseReader::open(&url, &long).1.collect()),
        )
    };
    assert_eq!(solo_running.len(), 48);
    assert_eq!(solo_long.len(), 8);
    assert_eq!(metric(&srv, "microllm_prefix_cache_blocks"), 0.0);
    let mixed0 = metric(&srv, "microllm_mixed_steps_total");

    #[derive(Debug, PartialEq)]
    enum Ev {
        Running(usize),
        LongOpened,
        LongToken,
    }
    let (tx, rx) = mpsc::channel::<Ev>();
    let (url_a, tx_a) = (url.clone(), tx.clone());
    let a = std::thread::spawn(move || {
        let (s, mut sse) = SseReader::open(&url_a, &running);
        assert_eq!(s, 200);
        let mut events = Vec::new();
        while let Some(d) = sse.next_data() {
            let done = d == "[DONE]";
            if !done {
                let _ = tx_a.send(Ev::Running(events.len()));
            }
            events.push(d);
            if done {
                break;
            }
        }
        events
    });
    // Once the running stream has produced a few tokens, the long prompt arrives.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(rx.recv().unwrap());
    }
    let url_b = url.clone();
    let b = std::thread::spawn(move || {
        let (s, mut sse) = SseReader::open(&url_b, &long);
        assert_eq!(s, 200);
        let _ = tx.send(Ev::LongOpened);
        let mut events = Vec::new();
        while let Some(d) = sse.next_data() {
            let done = d == "[DONE]";
            if !done && events.is_empty() {
                let _ = tx.send(Ev::LongToken);
            }
            events.push(d);
            if done {
                break;
            }
        }
        events
    });
    let got_a = texts(&a.join().unwrap());
    let got_b = texts(&b.join().unwrap());
    seen.extend(rx.try_iter());
    let opened = seen.iter().position(|e| *e == Ev::LongOpened).unwrap();
    let first = seen.iter().position(|e| *e == Ev::LongToken).unwrap();
    let between = seen[opened..first]
        .iter()
        .filter(|e| matches!(e, Ev::Running(_)))
        .count();
    // 1500 prompt tokens in chunks of 128 take 12 steps, each also a decode step.
    println!("{between} tokens of the running stream during the long prompt's prefill");
    assert!(
        between >= 4,
        "only {between} tokens of the running stream arrived while the long prompt was prefilled: {seen:?}"
    );
    assert!(metric(&srv, "microllm_mixed_steps_total") - mixed0 >= 4.0);
    assert_eq!(got_a, solo_running, "the running stream changed");
    assert_eq!(got_b, solo_long, "the long prompt's answer changed");
}

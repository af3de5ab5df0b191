//! The library API in process (`start` + `serve` on a port-0 listener) on a tiny random model:
//! continuous batching with chunked prefill must give exactly the tokens of one-shot prefill
//! run one request at a time, and shutdown must drain.

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::Duration;

use microllm_engine::{LoadedModel, ModelOptions};
use microllm_server::{EngineConfig, ServerConfig};
use microllm_testkit::TinySpec;
use serde_json::{json, Value};

struct Running {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    state: microllm_server::AppState,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start(lm: Arc<LoadedModel>, engine: EngineConfig) -> Running {
    let cfg = ServerConfig {
        model_id: "tiny".into(),
        ..ServerConfig::default()
    };
    let state = microllm_server::start(lm, cfg, engine).unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(l.local_addr().unwrap()).unwrap();
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            microllm_server::serve(l, st.clone(), shutdown, Duration::from_secs(1))
                .await
                .unwrap();
        });
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    Running {
        base: format!("http://{addr}"),
        stop: Some(stop_tx),
        thread: Some(thread),
        state,
    }
}

fn complete(base: &str, prompt: &str) -> Value {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": true,
                      "logprobs": 0});
    let mut r = agent
        .post(&format!("{base}/v1/completions"))
        .send(body.to_string())
        .unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["choices"][0]["logprobs"]["tokens"].clone()
}

#[test]
fn chunked_concurrent_generation_matches_one_shot_solo() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    microllm_testkit::write_tiny_model(&TinySpec::llama(), &path).unwrap();
    let lm = Arc::new(
        LoadedModel::load(
            &path,
            ModelOptions {
                n_threads: 2,
                ..ModelOptions::default()
            },
        )
        .unwrap(),
    );
    // Prompts of 30-60 tokens sharing a prefix (so the prefix cache is used too).
    let prompts: Vec<String> = (0..6)
        .map(|i| {
            format!(
                "shared words at the start {} then the part for request {i} {}",
                "alpha beta ".repeat(3),
                "gamma delta ".repeat(i + 2)
            )
        })
        .collect();

    // Reference: one slot, whole prompt in one forward, one request at a time.
    let solo = start(
        Arc::clone(&lm),
        EngineConfig {
            n_parallel: 1,
            n_ctx: 200,
            n_prefill_chunk: 512,
            max_queue: 8,
            prefix_cache_bytes: 0,
            ..EngineConfig::default()
        },
    );
    let want: Vec<Value> = prompts.iter().map(|p| complete(&solo.base, p)).collect();
    // Two prompts sharing a long beginning that none of the above has.
    let preamble = "another preamble entirely ".repeat(6);
    let (busy, later) = (format!("{preamble} one"), format!("{preamble} two"));
    let want_later = complete(&solo.base, &later);
    drop(solo);

    // Three slots, 7-token prefill chunks, all six requests at once (three wait in the queue).
    // A longer context than the solo engine's, for the long `busy` stream below.
    let batched = start(
        lm,
        EngineConfig {
            n_parallel: 3,
            n_ctx: 2048,
            n_prefill_chunk: 7,
            max_queue: 8,
            // Small blocks, so that requests also copy prefixes from the block store.
            prefix_block_tokens: 4,
            ..EngineConfig::default()
        },
    );
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (base, p) = (batched.base.clone(), p.clone());
            std::thread::spawn(move || complete(&base, &p))
        })
        .collect();
    let got: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w.as_array().unwrap().len(), 24);
        assert_eq!(w, g, "request {i}");
    }
    let m = batched.state.metrics().render();
    let hits = m
        .lines()
        .find(|l| l.starts_with("microllm_prefix_cache_hit_tokens_total "))
        .unwrap();
    assert_ne!(hits, "microllm_prefix_cache_hit_tokens_total 0", "{m}");

    // `busy` streams in one slot (its blocks are cached once its prompt is evaluated);
    // `later` must go to another slot, which holds nothing of the preamble: its prefix comes
    // from the block store, and its answer is still the one-shot solo answer. `busy` asks for
    // far more tokens than `later` needs steps, so that it still holds its slot when `later`
    // arrives (with 150 the tiny model sometimes finished first, and `later` took its slot).
    let copied = |st: &microllm_server::AppState| -> f64 {
        let m = st.metrics().render();
        let line = m
            .lines()
            .find(|l| l.starts_with("microllm_prefix_cache_copied_tokens_total "))
            .unwrap()
            .to_string();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let copied0 = copied(&batched.state);
    let body = json!({"prompt": busy, "max_tokens": 1900, "temperature": 0, "ignore_eos": true,
                      "stream": true});
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let resp = agent
        .post(&format!("{}/v1/completions", batched.base))
        .send(body.to_string())
        .unwrap();
    let mut lines = BufReader::new(resp.into_body().into_reader()).lines();
    let first = lines.find(|l| l.as_ref().is_ok_and(|l| l.starts_with("data: ")));
    assert!(first.is_some(), "the busy stream started");
    assert_eq!(complete(&batched.base, &later), want_later);
    assert!(copied(&batched.state) - copied0 >= 8.0);
    drop(lines);
    assert!(!batched.state.engine().is_shutting_down());
}

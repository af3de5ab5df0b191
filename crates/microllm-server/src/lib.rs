//! microllm-server: an OpenAI-compatible HTTP server for one loaded model.
//!
//! Main design decision: **the engine runs on its own thread, synchronous; axum and tokio stay
//! at the edge.** The forward pass is CPU-bound and already parallel inside the model's thread
//! pool, so putting it on the async runtime would only add contention. Handlers parse,
//! validate and tokenize, then hand a job to the engine over a bounded channel (full = 429) and
//! read its events back over a per-request channel; a dropped receiver (client gone) cancels
//! the sequence at the next step. The engine ([`Engine`]) keeps `--parallel` slots, each a
//! sequence `State` with its own KV cache, and runs continuous batching over them: requests
//! join between steps, and each step is ONE batched forward holding every decoding
//! sequence's next token and a chunk of the prompts being prefilled (the weights are read
//! once per step for all of them, each row attending to its own sequence's KV cache). A new
//! request takes the free slot whose cached tokens share the longest prefix with its prompt,
//! and copies a longer cached prefix from the prefix cache: KV blocks of earlier requests,
//! named by their whole prefix, under a memory budget with LRU eviction (see
//! `prefix_cache`).
//!
//! Routes: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`, `POST
//! /v1/completions`, `POST /v1/embeddings`, `GET /metrics` (Prometheus text), `POST /tokenize`,
//! `POST /detokenize`. Every error is OpenAI's `{"error": {message, type, param, code}}`.
//!
//! Embeddings mean-pool the model's final hidden states (after the output norm) over the
//! input's tokens, L2-normalised, as llama.cpp's `--pooling mean` (see [`embed`]).

#![forbid(unsafe_code)]

mod api;
pub mod embed;
mod engine;
mod error;
pub mod metrics;
mod prefix_cache;
mod routes;
mod stop;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use microllm_engine::LoadedModel;

pub use embed::{Embedder, HiddenStateMean};
pub use engine::{Engine, EngineConfig};
pub use error::AppError;
pub use metrics::Metrics;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("bad server settings: {0}")]
    Config(String),
    #[error("could not set up the model's sequence slots: {0}; try a smaller --ctx or --parallel")]
    Engine(#[from] microllm_engine::EngineError),
    #[error("could not start the engine thread: {0}")]
    Thread(std::io::Error),
    #[error("the engine thread stopped while starting; see the messages above")]
    EngineDied,
    #[error(
        "could not listen on {addr}: {source}; is the port in use? (--port 0 picks a free one)"
    )]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("could not start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// Settings of the HTTP side.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The id `/v1/models` lists; requests may name it or leave `model` out.
    pub model_id: String,
    /// When set, every route but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model_id: "model".into(),
            api_key: None,
            max_body_bytes: 4 << 20,
        }
    }
}

struct Inner {
    lm: Arc<LoadedModel>,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    cfg: ServerConfig,
    created: u64,
}

/// Everything the handlers share: the model (for tokenizing), the engine handle, metrics.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("cfg", &self.0.cfg)
            .finish_non_exhaustive()
    }
}

impl AppState {
    pub fn new(
        lm: Arc<LoadedModel>,
        engine: Arc<Engine>,
        metrics: Arc<Metrics>,
        cfg: ServerConfig,
    ) -> Self {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        AppState(Arc::new(Inner {
            lm,
            engine,
            metrics,
            cfg,
            created,
        }))
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.0.engine
    }
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }
    pub fn lm(&self) -> &LoadedModel {
        &self.0.lm
    }
    pub fn cfg(&self) -> &ServerConfig {
        &self.0.cfg
    }
    fn created(&self) -> u64 {
        self.0.created
    }

    /// Requests may name the served model or leave `model` out.
    fn check_model(&self, requested: Option<&str>) -> Result<(), AppError> {
        match requested {
            None => Ok(()),
            Some(m) if m == self.0.cfg.model_id => Ok(()),
            Some(m) => Err(AppError::ModelNotFound {
                requested: m.to_string(),
                served: self.0.cfg.model_id.clone(),
            }),
        }
    }

    /// A prompt must leave at least one position of the per-request context for the answer.
    fn check_fits(&self, n_prompt: usize) -> Result<(), AppError> {
        let n_ctx = self.0.engine.config().n_ctx;
        let n_fit = n_ctx - 1;
        if n_prompt > n_fit {
            return Err(AppError::PromptTooLong {
                n_prompt,
                n_fit,
                n_ctx,
            });
        }
        Ok(())
    }

    /// Token ids from a request, checked against the vocabulary.
    fn check_ids(&self, param: &str, ids: &[i64]) -> Result<Vec<u32>, AppError> {
        let n_vocab = self.0.lm.model.config.n_vocab;
        ids.iter()
            .map(|&id| {
                u32::try_from(id)
                    .ok()
                    .filter(|&u| (u as usize) < n_vocab)
                    .ok_or_else(|| {
                        AppError::bad_param(
                            param,
                            format!("token id {id} is outside the vocabulary (0..{n_vocab})"),
                        )
                    })
            })
            .collect()
    }
}

/// Starts the engine thread for `lm` (allocating every slot's KV cache) and returns the state
/// [`app`] serves.
pub fn start(
    lm: Arc<LoadedModel>,
    cfg: ServerConfig,
    engine_cfg: EngineConfig,
) -> Result<AppState, ServerError> {
    let metrics = Arc::new(Metrics::new());
    // Sizes are checked by Engine::start; keep them valid for the allocation meanwhile.
    let embedder = HiddenStateMean::new(
        &lm,
        engine_cfg.n_ctx.max(1),
        engine_cfg.n_prefill_chunk.clamp(1, engine_cfg.n_ctx.max(1)),
    )?;
    let engine = Engine::start(
        Arc::clone(&lm),
        engine_cfg,
        Box::new(embedder),
        Arc::clone(&metrics),
    )?;
    Ok(AppState::new(lm, Arc::new(engine), metrics, cfg))
}

/// The router: every route, the API-key check, the body limit and request metrics.
pub fn app(state: AppState) -> Router {
    let limit = state.cfg().max_body_bytes;
    Router::new()
        .route("/health", get(routes::health))
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{id}", get(routes::model_get))
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/embeddings", post(routes::embeddings))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::auth,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::track,
        ))
        .with_state(state)
}

/// Serves `listener` until `shutdown` resolves; then stops accepting, lets running
/// generations finish for up to `grace` (the engine cuts them off after that) and returns at
/// most a couple of seconds later even if a client holds a connection open.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<(), ServerError> {
    let engine = Arc::clone(state.engine());
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        engine.begin_shutdown(grace);
        let _ = fired_tx.send(());
    };
    let server = std::future::IntoFuture::into_future(
        axum::serve(listener, app(state)).with_graceful_shutdown(signal),
    );
    let hard_stop = async move {
        match fired_rx.await {
            Ok(()) => tokio::time::sleep(grace + Duration::from_secs(2)).await,
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = server => r.map_err(ServerError::Serve),
        _ = hard_stop => Ok(()),
    }
}

/// Resolves on SIGINT (ctrl-c) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Blocking entry point for the CLI: binds `host:port`, calls `on_bound` with the bound
/// address (port 0 picks a free one), serves until SIGINT/SIGTERM, then drains and joins the
/// engine thread.
pub fn run(
    state: AppState,
    host: &str,
    port: u16,
    grace: Duration,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("microllm-http")
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    let engine = Arc::clone(state.engine());
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .map_err(|source| ServerError::Bind {
                addr: format!("{host}:{port}"),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: format!("{host}:{port}"),
            source,
        })?;
        on_bound(addr);
        serve(listener, state, shutdown_signal(), grace).await
    });
    engine.begin_shutdown(grace);
    engine.join();
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

//! HTTP handlers: parse and validate, tokenize, hand the work to the engine, turn its events
//! into OpenAI-shaped JSON or an SSE stream.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use microllm_engine::ChatMessage;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::api::{self, ContentIn, PromptIn};
use crate::embed::base64_f32;
use crate::engine::{EmbedJob, Event, Finish, GenJob, GenParams, Job, TokenLogprob, Usage};
use crate::error::AppError;
use crate::AppState;

/// A JSON body whose every failure is an OpenAI-shaped error (axum's own `Json` answers
/// plain text): 413 past the body limit, 400 for bad JSON or wrong field types.
pub(crate) struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, AppError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AppError::PayloadTooLarge {
                    limit: state.cfg().max_body_bytes,
                }
            } else {
                AppError::bad(format!("could not read the request body: {e}"))
            }
        })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            let what = if e.is_syntax() || e.is_eof() {
                "the request body is not valid JSON"
            } else {
                "the request body does not match this endpoint's schema"
            };
            AppError::bad(format!("{what}: {e}"))
        })
    }
}

/// Counts every answer by route and status (unknown paths are one label, "other").
pub(crate) async fn track(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    st.metrics()
        .record_request(&endpoint, resp.status().as_u16());
    resp
}

/// `Authorization: Bearer KEY` on everything but `/health`, when a key is set.
pub(crate) async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.cfg().api_key {
        if req.uri().path() != "/health" {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
                return AppError::Unauthorized.into_response();
            }
        }
    }
    next.run(req).await
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) async fn not_found(method: Method, uri: Uri) -> AppError {
    AppError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

pub(crate) async fn health(State(st): State<AppState>) -> Response {
    if st.engine().is_shutting_down() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ok"})).into_response()
    }
}

fn model_object(st: &AppState) -> Value {
    let lm = st.lm();
    json!({
        "id": st.cfg().model_id,
        "object": "model",
        "created": st.created(),
        "owned_by": "microllm",
        "meta": {
            "n_ctx_per_request": st.engine().config().n_ctx,
            "n_parallel": st.engine().config().n_parallel,
            "n_ctx_train": lm.model.config.n_ctx_train,
            "n_vocab": lm.model.config.n_vocab,
            "n_embd": lm.model.config.n_embd,
            "n_params": lm.model.n_params(),
        }
    })
}

pub(crate) async fn models(State(st): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&st)]}))
}

pub(crate) async fn model_get(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    st.check_model(Some(&id))?;
    Ok(Json(model_object(&st)))
}

pub(crate) async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        st.metrics().render(),
    )
        .into_response()
}

pub(crate) async fn tokenize(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<api::TokenizeRequest>,
) -> Result<Json<Value>, AppError> {
    let tok = &st.lm().tokenizer;
    let ids = tok
        .encode(&req.content, req.add_special, true)
        .map_err(|e| AppError::bad_param("content", format!("could not tokenize: {e}")))?;
    if req.with_pieces {
        let pieces: Vec<Value> = ids
            .iter()
            .map(|&id| json!({"id": id, "piece": String::from_utf8_lossy(tok.token_bytes(id))}))
            .collect();
        Ok(Json(json!({ "tokens": pieces })))
    } else {
        Ok(Json(json!({ "tokens": ids })))
    }
}

pub(crate) async fn detokenize(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<api::DetokenizeRequest>,
) -> Result<Json<Value>, AppError> {
    let ids = st.check_ids("tokens", &req.tokens)?;
    Ok(Json(json!({ "content": st.lm().tokenizer.decode(&ids) })))
}

/// Unique enough response ids: process start time plus a counter.
fn response_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    format!("{prefix}-{t:x}{n:04x}")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A seed for requests that give none: different per request.
fn fresh_seed() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ NEXT.fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    Chat,
    Completion,
}

/// What every response and chunk of one request repeats.
#[derive(Clone, Debug)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    flavor: Flavor,
}

pub(crate) async fn chat(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<api::ChatRequest>,
) -> Result<Response, AppError> {
    st.check_model(req.model.as_deref())?;
    let top = api::chat_top_logprobs(req.logprobs, req.top_logprobs)?;
    let v = api::validate(&req.sampling, top, st.engine().config().n_ctx, fresh_seed())?;
    if req.messages.is_empty() {
        return Err(AppError::bad_param(
            "messages",
            "messages is empty: give at least one message",
        ));
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(AppError::bad_param(
                    "messages",
                    format!("messages[{i}].role is '{other}'; this server takes system, developer, user and assistant messages"),
                ))
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(ContentIn::Text(t)) => t,
            Some(ContentIn::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => s.push_str(&t),
                        (kind, _) => {
                            return Err(AppError::bad_param(
                                "messages",
                                format!("messages[{i}] has a '{kind}' content part; only text parts are supported"),
                            ))
                        }
                    }
                }
                s
            }
        };
        msgs.push(ChatMessage::new(role, content));
    }
    // Templating and tokenizing cost more than everything above: skip them when the queue
    // would refuse the request anyway.
    st.engine().check_capacity()?;
    let lm = st.lm();
    let rendered = lm.render_chat(None, &msgs, true).map_err(|e| {
        AppError::bad_param(
            "messages",
            format!("could not apply the model's chat template to these messages: {e}"),
        )
    })?;
    let ids = lm
        .tokenize_chat(&rendered)
        .map_err(|e| AppError::bad_param("messages", format!("could not tokenize: {e}")))?;
    st.check_fits(ids.len())?;
    let meta = Meta {
        id: response_id("chatcmpl"),
        created: unix_now(),
        model: st.cfg().model_id.clone(),
        flavor: Flavor::Chat,
    };
    generate(st, ids, v.params, v.stream, v.include_usage, meta).await
}

pub(crate) async fn completions(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<api::CompletionRequest>,
) -> Result<Response, AppError> {
    st.check_model(req.model.as_deref())?;
    if req.echo == Some(true) {
        return Err(AppError::NotSupported(
            "echo: true is not supported; the prompt is not repeated in the answer".into(),
        ));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(AppError::bad_param(
            "best_of",
            "only best_of = 1 is supported",
        ));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(AppError::NotSupported(
            "suffix (insertion) is not supported by this server".into(),
        ));
    }
    let top = api::completion_logprobs(req.logprobs)?;
    let v = api::validate(&req.sampling, top, st.engine().config().n_ctx, fresh_seed())?;
    let Some(prompt) = req.prompt else {
        return Err(AppError::bad_param(
            "prompt",
            "prompt is missing: give a string",
        ));
    };
    // Tokenizing costs more than everything above: skip it when the queue would refuse.
    st.engine().check_capacity()?;
    let lm = st.lm();
    let tokenize = |t: &str| {
        lm.tokenize(t)
            .map_err(|e| AppError::bad_param("prompt", format!("could not tokenize: {e}")))
    };
    let ids = match prompt {
        PromptIn::Text(t) => tokenize(&t)?,
        PromptIn::Texts(v) if v.len() == 1 => tokenize(&v[0])?,
        PromptIn::Tokens(ids) => st.check_ids("prompt", &ids)?,
        PromptIn::TokenLists(l) if l.len() == 1 => st.check_ids("prompt", &l[0])?,
        _ => {
            return Err(AppError::bad_param(
                "prompt",
                "one prompt per request: give a string (or one token list)",
            ))
        }
    };
    if ids.is_empty() {
        return Err(AppError::bad_param(
            "prompt",
            "the prompt is empty: give at least one token of text",
        ));
    }
    st.check_fits(ids.len())?;
    let meta = Meta {
        id: response_id("cmpl"),
        created: unix_now(),
        model: st.cfg().model_id.clone(),
        flavor: Flavor::Completion,
    };
    generate(st, ids, v.params, v.stream, v.include_usage, meta).await
}

async fn generate(
    st: AppState,
    prompt: Vec<u32>,
    params: GenParams,
    stream: bool,
    include_usage: bool,
    meta: Meta,
) -> Result<Response, AppError> {
    let (tx, rx) = mpsc::unbounded_channel();
    st.engine().submit(Job::Generate(GenJob {
        prompt,
        params,
        events: tx,
        arrived: Instant::now(),
    }))?;
    if stream {
        return Ok(sse_response(st, rx, meta, include_usage));
    }
    let mut text = String::new();
    let mut lps = Vec::new();
    let mut rx = rx;
    let (finish, usage) = loop {
        match rx.recv().await {
            Some(Event::Delta { text: t, logprob }) => {
                text.push_str(&t);
                lps.extend(logprob);
            }
            Some(Event::Done { finish, usage }) => break (finish, usage),
            Some(Event::Error(e)) => return Err(e),
            None => return Err(AppError::ShuttingDown),
        }
    };
    let with_lp = !lps.is_empty();
    let body = match meta.flavor {
        Flavor::Chat => json!({
            "id": meta.id,
            "object": "chat.completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": if with_lp { chat_logprobs(&st, &lps) } else { Value::Null },
                "finish_reason": finish.as_str(),
            }],
            "usage": usage_json(&usage),
        }),
        Flavor::Completion => json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": if with_lp { completion_logprobs(&st, &lps, 0) } else { Value::Null },
                "finish_reason": finish.as_str(),
            }],
            "usage": usage_json(&usage),
        }),
    };
    Ok(Json(body).into_response())
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// Logprobs are finite in JSON: -inf (impossible tokens) becomes OpenAI's floor of -9999.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

fn token_json(st: &AppState, id: u32, lp: f32) -> Value {
    let bytes = st.lm().tokenizer.token_bytes(id);
    json!({
        "token": String::from_utf8_lossy(bytes),
        "logprob": finite(lp),
        "bytes": bytes,
    })
}

fn chat_logprobs(st: &AppState, lps: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|lp| {
            let mut v = token_json(st, lp.id, lp.logprob);
            v["top_logprobs"] = lp
                .top
                .iter()
                .map(|&(id, l)| token_json(st, id, l))
                .collect();
            v
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

/// The legacy completions shape; `offset0` is the text offset of the first token.
fn completion_logprobs(st: &AppState, lps: &[TokenLogprob], offset0: usize) -> Value {
    let tok = &st.lm().tokenizer;
    let mut offset = offset0;
    let mut tokens = Vec::new();
    let mut token_lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    for lp in lps {
        let text = String::from_utf8_lossy(tok.token_bytes(lp.id)).into_owned();
        offsets.push(offset);
        offset += text.len();
        tokens.push(text);
        token_lps.push(finite(lp.logprob));
        let top: serde_json::Map<String, Value> = lp
            .top
            .iter()
            .map(|&(id, l)| {
                (
                    String::from_utf8_lossy(tok.token_bytes(id)).into_owned(),
                    json!(finite(l)),
                )
            })
            .collect();
        tops.push(Value::Object(top));
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    })
}

/// State of one SSE response body.
struct Sse {
    st: AppState,
    rx: mpsc::UnboundedReceiver<Event>,
    meta: Meta,
    include_usage: bool,
    started: bool,
    done: bool,
    /// Text offset for completions' logprobs.
    offset: usize,
}

fn sse_data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

impl Sse {
    /// One chunk object with a single choice.
    fn chunk(&self, choice: Value) -> Value {
        let object = match self.meta.flavor {
            Flavor::Chat => "chat.completion.chunk",
            Flavor::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.meta.id,
            "object": object,
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn delta(&mut self, text: String, lp: Option<TokenLogprob>) -> Value {
        let lps: Vec<TokenLogprob> = lp.into_iter().collect();
        match self.meta.flavor {
            Flavor::Chat => {
                let logprobs = if lps.is_empty() {
                    Value::Null
                } else {
                    chat_logprobs(&self.st, &lps)
                };
                self.chunk(json!({
                    "index": 0,
                    "delta": {"content": text},
                    "logprobs": logprobs,
                    "finish_reason": null,
                }))
            }
            Flavor::Completion => {
                let logprobs = if lps.is_empty() {
                    Value::Null
                } else {
                    completion_logprobs(&self.st, &lps, self.offset)
                };
                self.offset += text.len();
                self.chunk(json!({
                    "index": 0,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": null,
                }))
            }
        }
    }

    fn finish(&self, finish: Finish, usage: &Usage) -> String {
        let choice = match self.meta.flavor {
            Flavor::Chat => json!({
                "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish.as_str(),
            }),
            Flavor::Completion => json!({
                "index": 0, "text": "", "logprobs": null, "finish_reason": finish.as_str(),
            }),
        };
        let mut out = sse_data(&self.chunk(choice));
        if self.include_usage {
            let mut u = self.chunk(Value::Null);
            u["choices"] = json!([]);
            u["usage"] = usage_json(usage);
            out.push_str(&sse_data(&u));
        }
        out.push_str("data: [DONE]\n\n");
        out
    }

    /// The next piece of the body, or `None` at the end.
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        if self.done {
            return None;
        }
        if !self.started {
            self.started = true;
            if self.meta.flavor == Flavor::Chat {
                let first = self.chunk(json!({
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null,
                }));
                return Some((Ok(Bytes::from(sse_data(&first))), self));
            }
        }
        loop {
            let out = match self.rx.recv().await {
                Some(Event::Delta { text, logprob }) => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    sse_data(&self.delta(text, logprob))
                }
                Some(Event::Done { finish, usage }) => {
                    self.done = true;
                    self.finish(finish, &usage)
                }
                Some(Event::Error(e)) => {
                    self.done = true;
                    sse_data(&e.body())
                }
                None => {
                    self.done = true;
                    sse_data(&AppError::ShuttingDown.body())
                }
            };
            return Some((Ok(Bytes::from(out)), self));
        }
    }
}

fn sse_response(
    st: AppState,
    rx: mpsc::UnboundedReceiver<Event>,
    meta: Meta,
    include_usage: bool,
) -> Response {
    let state = Sse {
        st,
        rx,
        meta,
        include_usage,
        started: false,
        done: false,
        offset: 0,
    };
    // Dropping the body (client gone) drops `rx`, which the engine sees as a cancellation.
    let stream = futures_util::stream::unfold(state, Sse::next);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| AppError::Internal(e.to_string()).into_response())
}

/// `POST /v1/embeddings`: one unit vector per input, the mean of the model's final hidden
/// states (after the output norm) over the input's tokens, L2-normalised (llama.cpp's
/// `--pooling mean`); computed on the engine thread by its [`crate::Embedder`].
pub(crate) async fn embeddings(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<api::EmbeddingRequest>,
) -> Result<Json<Value>, AppError> {
    st.check_model(req.model.as_deref())?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(AppError::bad_param(
                "encoding_format",
                format!("encoding_format must be 'float' or 'base64', got '{other}'"),
            ))
        }
    };
    let n_embd = st.lm().model.config.n_embd;
    if let Some(d) = req.dimensions {
        if d != n_embd as i64 {
            return Err(AppError::bad_param(
                "dimensions",
                format!("this model's embeddings have {n_embd} dimensions and cannot be shortened; omit dimensions or pass {n_embd}"),
            ));
        }
    }
    let lm = st.lm();
    let tokenize = |t: &str| {
        lm.tokenize(t)
            .map_err(|e| AppError::bad_param("input", format!("could not tokenize: {e}")))
    };
    let inputs: Vec<Vec<u32>> = match req.input {
        PromptIn::Text(t) => vec![tokenize(&t)?],
        PromptIn::Texts(v) => v.iter().map(|t| tokenize(t)).collect::<Result<_, _>>()?,
        PromptIn::Tokens(ids) => vec![st.check_ids("input", &ids)?],
        PromptIn::TokenLists(l) => l
            .iter()
            .map(|ids| st.check_ids("input", ids))
            .collect::<Result<_, _>>()?,
    };
    if inputs.is_empty() || inputs.len() > api::MAX_EMBED_INPUTS {
        return Err(AppError::bad_param(
            "input",
            format!(
                "give between 1 and {} inputs, got {}",
                api::MAX_EMBED_INPUTS,
                inputs.len()
            ),
        ));
    }
    if inputs.iter().any(|ids| ids.is_empty()) {
        return Err(AppError::bad_param(
            "input",
            "an input is empty: every input needs at least one token",
        ));
    }
    for ids in &inputs {
        st.check_fits(ids.len())?;
    }
    let n_tokens: usize = inputs.iter().map(Vec::len).sum();
    let (tx, rx) = oneshot::channel();
    st.engine()
        .submit(Job::Embed(EmbedJob { inputs, reply: tx }))?;
    let vectors = rx.await.map_err(|_| AppError::ShuttingDown)??;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let e = if base64 {
                Value::String(base64_f32(v))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": e})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": st.cfg().model_id,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    })))
}

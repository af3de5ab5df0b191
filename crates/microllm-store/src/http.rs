//! Blocking HTTP over ureq: system trust roots, proxy from the environment (or as
//! configured), downloads opened with optional `Range` and redirects followed by hand.

use crate::error::StoreError;
use crate::pypi::{host_of, join_url};
use std::time::Duration;

/// Which proxy the store's HTTP client uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ProxyConfig {
    /// `ALL_PROXY` / `HTTPS_PROXY` / `HTTP_PROXY` (and `NO_PROXY`) as the environment says.
    #[default]
    FromEnv,
    /// Connect directly.
    Direct,
    /// This proxy URL, e.g. `http://proxy:3128`.
    Url(String),
}

pub(crate) struct Http {
    agent: ureq::Agent,
}

/// Size of the copy buffer for downloads and extraction.
pub(crate) const CHUNK: usize = 1 << 20;

impl Http {
    pub(crate) fn new(proxy: &ProxyConfig) -> Result<Self, StoreError> {
        let proxy = match proxy {
            ProxyConfig::FromEnv => ureq::Proxy::try_from_env(),
            ProxyConfig::Direct => None,
            ProxyConfig::Url(u) => Some(ureq::Proxy::new(u).map_err(|e| StoreError::BadProxy {
                url: u.clone(),
                message: e.to_string(),
            })?),
        };
        // The platform verifier reads the system trust store, so a TLS-inspecting proxy
        // whose CA the administrator installed is trusted (Mozilla's list alone is not).
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::PlatformVerifier)
            .build();
        let config = ureq::Agent::config_builder()
            .tls_config(tls)
            .proxy(proxy)
            .http_status_as_error(false)
            .user_agent(concat!("microllm/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            // A stalled transfer fails instead of hanging; a slow one keeps going.
            .timeout_per_read(Some(Duration::from_secs(60)))
            .build();
        Ok(Self {
            agent: config.new_agent(),
        })
    }

    fn call(
        &self,
        url: &str,
        accept: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, StoreError> {
        let mut req = self.agent.get(url);
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        req.call().map_err(|e| network_error(url, e))
    }

    /// GET a text page: `Ok(Some((body, content_type)))`, `Ok(None)` on 404.
    pub(crate) fn get_text(
        &self,
        url: &str,
        accept: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let mut resp = self.call(url, Some(accept))?;
        let status = resp.status().as_u16();
        if status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&status) {
            return Err(StoreError::HttpStatus {
                url: url.to_string(),
                status,
            });
        }
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| network_error(url, e))?;
        Ok(Some((body, ctype)))
    }

    /// Starts a GET of `url` for a download, following redirects itself (at most 10, never
    /// from https to http) so that Hugging Face's `X-Linked-Etag` / `X-Linked-Size` headers
    /// on the redirect are seen. `range_from` asks for the bytes from that offset on
    /// (`Range: bytes=N-`), conditional on `if_range` (an ETag or Last-Modified date) when
    /// given. The body is not read: the caller streams it.
    pub(crate) fn open(
        &self,
        url: &str,
        range_from: Option<u64>,
        if_range: Option<&str>,
    ) -> Result<Opened, StoreError> {
        let mut current = url.to_string();
        let mut linked_etag = None;
        let mut linked_size = None;
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.agent.get(&current).config().max_redirects(0).build();
            if let Some(from) = range_from {
                req = req.header("Range", format!("bytes={from}-"));
                if let Some(v) = if_range {
                    req = req.header("If-Range", v);
                }
            }
            let resp = req.call().map_err(|e| network_error(&current, e))?;
            let status = resp.status().as_u16();
            let h = resp.headers();
            let header = |name: &str| {
                h.get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
            };
            if let Some(e) = header("x-linked-etag") {
                linked_etag = Some(e);
            }
            if let Some(n) = header("x-linked-size").and_then(|v| v.parse().ok()) {
                linked_size = Some(n);
            }
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                let Some(loc) = header("location") else {
                    return Err(StoreError::HttpStatus {
                        url: current,
                        status,
                    });
                };
                let next = join_url(&current, &loc);
                if current.starts_with("https://") && !next.starts_with("https://") {
                    return Err(StoreError::Network {
                        host: host_of(&current),
                        url: current.clone(),
                        message: format!(
                            "it redirects to {next}, which is not HTTPS; refusing to downgrade"
                        ),
                    });
                }
                current = next;
                continue;
            }
            let content_length = header("content-length").and_then(|v| v.parse().ok());
            let content_range = header("content-range").and_then(|v| parse_content_range(&v));
            let etag = header("etag");
            let last_modified = header("last-modified");
            return Ok(Opened {
                status,
                url: current,
                content_length,
                content_range,
                etag,
                last_modified,
                linked_etag,
                linked_size,
                body: resp.into_body(),
            });
        }
        Err(StoreError::Network {
            host: host_of(url),
            url: url.to_string(),
            message: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }
}

/// Most redirects followed by [`Http::open`].
const MAX_REDIRECTS: usize = 10;

/// A response whose body has not been read yet.
pub(crate) struct Opened {
    pub status: u16,
    /// The URL that answered (after redirects).
    pub url: String,
    pub content_length: Option<u64>,
    /// `Content-Range: bytes START-END/TOTAL` (TOTAL `None` for `*`).
    pub content_range: Option<(u64, u64, Option<u64>)>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// `X-Linked-Etag` seen on any hop (Hugging Face: the file's sha256 for LFS files).
    pub linked_etag: Option<String>,
    /// `X-Linked-Size` seen on any hop.
    pub linked_size: Option<u64>,
    pub body: ureq::Body,
}

/// Parses `bytes START-END/TOTAL` (or `bytes START-END/*`).
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    if b < a {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    if total.is_some_and(|t| b >= t) {
        return None;
    }
    Some((a, b, total))
}

fn network_error(url: &str, e: ureq::Error) -> StoreError {
    StoreError::Network {
        host: host_of(url),
        url: url.to_string(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, 199, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, 0, None)));
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("bytes 5-10/10"), None);
        assert_eq!(parse_content_range("bytes */10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }
}

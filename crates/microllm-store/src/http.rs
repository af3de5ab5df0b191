//! Blocking HTTP over ureq: system trust roots, proxy from the environment (or as
//! configured), streaming downloads hashed as they arrive.

use crate::error::StoreError;
use crate::progress::Progress;
use crate::pypi::host_of;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;
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

    /// Streams `url` into `out`, returning (bytes, sha256 hex). Reports progress as `what`.
    pub(crate) fn download(
        &self,
        url: &str,
        what: &str,
        out: &mut dyn Write,
        out_path: &Path,
        progress: &mut dyn Progress,
    ) -> Result<(u64, String), StoreError> {
        let resp = self.call(url, None)?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(StoreError::HttpStatus {
                url: url.to_string(),
                status,
            });
        }
        let total = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        progress.start(what, total);
        let mut reader = resp.into_body().into_reader();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut n_total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(StoreError::Network {
                        host: host_of(url),
                        url: url.to_string(),
                        message: format!("download interrupted after {n_total} bytes: {e}"),
                    })
                }
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| StoreError::io("write", out_path, e))?;
            n_total += n as u64;
            progress.advance(n as u64);
        }
        progress.finish();
        if let Some(t) = total {
            if t != n_total {
                return Err(StoreError::SizeMismatch {
                    what: what.to_string(),
                    expected: t,
                    got: n_total,
                });
            }
        }
        Ok((n_total, hex::encode(hasher.finalize())))
    }
}

fn network_error(url: &str, e: ureq::Error) -> StoreError {
    StoreError::Network {
        host: host_of(url),
        url: url.to_string(),
        message: e.to_string(),
    }
}

//! Release transport: fetch the channel manifest, its signature and artifacts from a
//! static release directory over `http(s)://` (reqwest, rustls) or `file://`.
//!
//! [`Transport`] is the seam the upgrade steps fetch through (unit tests serve releases
//! from memory); [`Fetcher`] is the real one, used in production and integration tests.
//!
//! Every read is bounded by what the signed manifest allows, so a hostile mirror cannot
//! fill the disk; a body that ends early is told apart from one of the wrong size
//! ([`UpgradeError::Truncated`] is retried later, [`UpgradeError::SizeMismatch`] refused).

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use tokio::io::AsyncReadExt;

use crate::error::{NetworkError, UpgradeError};

/// Where releases come from.
#[allow(async_fn_in_trait)]
pub trait Transport {
    /// A small document (manifest, signature), at most `max` bytes.
    async fn get_small(&self, url: &str, max: u64) -> Result<Vec<u8>, UpgradeError>;
    /// Download into memory, bounded by the signed `size`, and check size and SHA-256
    /// against the signed manifest. The returned bytes are the ones that were checked:
    /// the caller unpacks exactly them, never a path that could change in between.
    async fn download(&self, url: &str, size: u64, sha256: &str) -> Result<Vec<u8>, UpgradeError>;
}

pub struct Fetcher {
    http: reqwest::Client,
}

fn network(url: &str, source: NetworkError) -> UpgradeError {
    UpgradeError::Network {
        url: url.to_string(),
        source,
    }
}

/// The local path of a `file://` URL (percent-decoded by `url`), `None` for other schemes.
fn file_path(url: &str) -> Option<PathBuf> {
    let u = url::Url::parse(url).ok()?;
    (u.scheme() == "file")
        .then(|| u.to_file_path().ok())
        .flatten()
}

impl Fetcher {
    pub fn new() -> Result<Fetcher, UpgradeError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("delegate-upgrader/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| network("(client)", NetworkError::Client(e)))?;
        Ok(Fetcher { http })
    }

    async fn get(&self, url: &str) -> Result<reqwest::Response, UpgradeError> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| network(url, NetworkError::Request(e)))?;
        let status = resp.status();
        // A 4xx is the server saying the request is wrong (a mistyped channel → 404):
        // the next run would get the same answer. 408 and 429 are the exceptions that
        // say "later".
        if status.is_client_error()
            && status != reqwest::StatusCode::REQUEST_TIMEOUT
            && status != reqwest::StatusCode::TOO_MANY_REQUESTS
        {
            return Err(UpgradeError::Rejected {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        if !status.is_success() {
            return Err(network(url, NetworkError::Status(status)));
        }
        Ok(resp)
    }
}

impl Transport for Fetcher {
    async fn get_small(&self, url: &str, max: u64) -> Result<Vec<u8>, UpgradeError> {
        if let Some(p) = file_path(url) {
            let f = tokio::fs::File::open(&p)
                .await
                .map_err(|e| network(url, NetworkError::File(e)))?;
            let mut body = Vec::new();
            f.take(max.saturating_add(1))
                .read_to_end(&mut body)
                .await
                .map_err(|e| network(url, NetworkError::File(e)))?;
            if body.len() as u64 > max {
                return Err(network(url, NetworkError::TooLarge(max)));
            }
            return Ok(body);
        }
        let resp = self.get(url).await?;
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| network(url, NetworkError::Body(e)))?;
            body.extend_from_slice(&chunk);
            if body.len() as u64 > max {
                return Err(network(url, NetworkError::TooLarge(max)));
            }
        }
        Ok(body)
    }

    async fn download(&self, url: &str, size: u64, sha256: &str) -> Result<Vec<u8>, UpgradeError> {
        let too_big = |actual: u64| UpgradeError::SizeMismatch {
            url: url.to_string(),
            expected: size,
            actual,
        };
        let mut body: Vec<u8> = Vec::new();
        if let Some(p) = file_path(url) {
            let f = tokio::fs::File::open(&p)
                .await
                .map_err(|e| network(url, NetworkError::File(e)))?;
            f.take(size.saturating_add(1))
                .read_to_end(&mut body)
                .await
                .map_err(|e| network(url, NetworkError::File(e)))?;
            let len = body.len() as u64;
            if len != size {
                return Err(too_big(len));
            }
        } else {
            let resp = self.get(url).await?;
            if let Some(n) = resp.content_length()
                && n != size
            {
                return Err(too_big(n));
            }
            // The size is signed, but grow as bytes arrive rather than trust it up front.
            body.reserve(usize::try_from(size.min(64 * 1024 * 1024)).unwrap_or(0));
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(c) => {
                        let received = (body.len() + c.len()) as u64;
                        if received > size {
                            return Err(too_big(received));
                        }
                        body.extend_from_slice(&c);
                    }
                    Err(_) => break, // the connection ended early: judged below
                }
            }
            let received = body.len() as u64;
            if received < size {
                return Err(UpgradeError::Truncated {
                    url: url.to_string(),
                    expected: size,
                    received,
                });
            }
        }
        let actual = hex::encode(Sha256::digest(&body));
        if !actual.eq_ignore_ascii_case(sha256) {
            return Err(UpgradeError::DigestMismatch {
                url: url.to_string(),
                expected: sha256.to_string(),
                actual,
            });
        }
        Ok(body)
    }
}

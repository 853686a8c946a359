//! Release transport: fetch the channel manifest, its signature and artifacts from a
//! static release directory over `http(s)://` (reqwest, rustls) or `file://`.
//!
//! Every read is bounded by what the signed manifest allows, so a hostile mirror cannot
//! fill the disk; a body that ends early is told apart from one of the wrong size
//! ([`UpgradeError::Truncated`] is retried later, [`UpgradeError::SizeMismatch`] refused).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::error::{UpgradeError, io};

pub struct Fetcher {
    http: reqwest::Client,
}

fn network(url: &str, reason: impl std::fmt::Display) -> UpgradeError {
    UpgradeError::Network {
        url: url.to_string(),
        reason: reason.to_string(),
    }
}

fn file_path(url: &str) -> Option<PathBuf> {
    url.strip_prefix("file://").map(PathBuf::from)
}

impl Fetcher {
    pub fn new() -> Result<Fetcher, UpgradeError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("delegate-upgrader/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| network("(client)", e))?;
        Ok(Fetcher { http })
    }

    /// A small document (manifest, signature), at most `max` bytes.
    pub async fn get_small(&self, url: &str, max: u64) -> Result<Vec<u8>, UpgradeError> {
        if let Some(p) = file_path(url) {
            let meta = tokio::fs::metadata(&p).await.map_err(|e| network(url, e))?;
            if meta.len() > max {
                return Err(network(url, format!("larger than {max} bytes")));
            }
            return tokio::fs::read(&p).await.map_err(|e| network(url, e));
        }
        let resp = self.get(url).await?;
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| network(url, format!("reading the body: {e}")))?;
            body.extend_from_slice(&chunk);
            if body.len() as u64 > max {
                return Err(network(url, format!("larger than {max} bytes")));
            }
        }
        Ok(body)
    }

    async fn get(&self, url: &str) -> Result<reqwest::Response, UpgradeError> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| network(url, format!("request failed: {e}")))?;
        if !resp.status().is_success() {
            return Err(network(url, format!("server answered {}", resp.status())));
        }
        Ok(resp)
    }

    /// Download to `dest` (created), checking size and SHA-256 against the signed manifest.
    pub async fn download(
        &self,
        url: &str,
        dest: &Path,
        size: u64,
        sha256: &str,
    ) -> Result<(), UpgradeError> {
        let mut out = std::fs::File::create(dest).map_err(io(dest))?;
        let mut hasher = Sha256::new();
        let mut received: u64 = 0;
        let mut put = |chunk: &[u8], received: &mut u64| -> Result<(), UpgradeError> {
            *received += chunk.len() as u64;
            if *received > size {
                return Err(UpgradeError::SizeMismatch {
                    url: url.to_string(),
                    expected: size,
                    actual: *received,
                });
            }
            hasher.update(chunk);
            out.write_all(chunk).map_err(io(dest))
        };
        if let Some(p) = file_path(url) {
            let bytes = tokio::fs::read(&p).await.map_err(|e| network(url, e))?;
            let len = bytes.len() as u64;
            if len != size {
                return Err(UpgradeError::SizeMismatch {
                    url: url.to_string(),
                    expected: size,
                    actual: len,
                });
            }
            put(&bytes, &mut received)?;
        } else {
            let resp = self.get(url).await?;
            let announced = resp.content_length();
            if let Some(n) = announced
                && n != size
            {
                return Err(UpgradeError::SizeMismatch {
                    url: url.to_string(),
                    expected: size,
                    actual: n,
                });
            }
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(c) => put(&c, &mut received)?,
                    Err(_) => break, // the connection ended early: judged below
                }
            }
            if received < size {
                return Err(UpgradeError::Truncated {
                    url: url.to_string(),
                    expected: size,
                    received,
                });
            }
        }
        out.sync_all().map_err(io(dest))?;
        let actual = hex::encode(hasher.finalize());
        if !actual.eq_ignore_ascii_case(sha256) {
            return Err(UpgradeError::DigestMismatch {
                url: url.to_string(),
                expected: sha256.to_string(),
                actual,
            });
        }
        Ok(())
    }
}

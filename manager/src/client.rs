//! A small HTTP client for the user side of API v1, used by the CLI commands.
//!
//! It turns the manager's JSON error bodies into `CliError::Manager` so the operator reads
//! the manager's own message, and a refused connection into a hint to start the server.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use delegate_protocol::{API_PREFIX, ErrorBody, ErrorCode};
use reqwest::{RequestBuilder, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CliError;

/// Time limit of every request except log following, which lasts as long as the task.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    /// A client of the manager at `server` (`http://` or `https://`). With `ca_file`, an
    /// https manager's certificate must be signed by a CA in that PEM file, and by no
    /// other.
    pub fn new(server: &str, token: String, ca_file: Option<&Path>) -> Result<Client, CliError> {
        let url = check_server_url(server)?;
        if url.scheme() == "http" && !is_loopback(&url) {
            eprintln!(
                "warning: --server {server} is plain http to another host: the admin token \
                 and task specs travel in clear text; serve the manager with --tls-cert and \
                 use https://"
            );
        }
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|source| CliError::ReadFile {
                path: path.to_path_buf(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| CliError::CaFile {
                    path: path.to_path_buf(),
                })?;
            builder = builder.tls_certs_only(certs);
        }
        let http = builder.build().map_err(|source| CliError::Http {
            url: server.to_string(),
            source,
        })?;
        Ok(Client {
            http,
            base: server.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// The full URL of an API v1 path such as `/tasks`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{API_PREFIX}{path}", self.base)
    }

    async fn send(&self, req: RequestBuilder, url: &str) -> Result<Response, CliError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| {
                let reason = root_cause(&source);
                if source.is_connect() && is_certificate_error(&source) {
                    CliError::Certificate {
                        url: self.base.clone(),
                        reason,
                    }
                } else if source.is_connect() {
                    CliError::Unreachable {
                        url: self.base.clone(),
                        reason,
                    }
                } else {
                    CliError::Http {
                        url: url.to_string(),
                        source,
                    }
                }
            })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => CliError::Manager {
                status,
                code: body.error.code,
                message: body.error.message,
            },
            Err(_) => CliError::Manager {
                status,
                code: ErrorCode::Unknown,
                message: format!("{url} answered HTTP {status}: {}", text.trim()),
            },
        })
    }

    async fn json<T: DeserializeOwned>(resp: Response, url: &str) -> Result<T, CliError> {
        let bytes = resp.bytes().await.map_err(|source| CliError::Http {
            url: url.to_string(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| CliError::BadAnswer {
            url: url.to_string(),
            source,
        })
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, CliError> {
        let url = self.url(path);
        let req = self.http.get(&url).query(query).timeout(REQUEST_TIMEOUT);
        let resp = self.send(req, &url).await?;
        Self::json(resp, &url).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CliError> {
        let url = self.url(path);
        let mut req = self.http.post(&url).timeout(REQUEST_TIMEOUT);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = self.send(req, &url).await?;
        Self::json(resp, &url).await
    }

    /// Copy a task's log to `out` from byte `offset`; with `follow`, until the task is
    /// finished. Returns the bytes written.
    pub async fn copy_log(
        &self,
        task_id: &str,
        offset: u64,
        follow: bool,
        out: &mut impl Write,
    ) -> Result<u64, CliError> {
        let url = self.url(&format!("/tasks/{task_id}/logs"));
        let mut req = self.http.get(&url).query(&[
            ("offset", offset.to_string()),
            ("follow", follow.to_string()),
        ]);
        if !follow {
            req = req.timeout(REQUEST_TIMEOUT);
        }
        let mut resp = self.send(req, &url).await?;
        let mut written = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|source| CliError::Http {
            url: url.clone(),
            source,
        })? {
            out.write_all(&chunk).map_err(CliError::Stdout)?;
            out.flush().map_err(CliError::Stdout)?;
            written += chunk.len() as u64;
        }
        Ok(written)
    }
}

/// `server` as a URL the client can use: http or https, with a host.
fn check_server_url(server: &str) -> Result<url::Url, CliError> {
    let bad = |why: String| {
        CliError::Usage(format!(
            "--server {server:?} is not a manager URL: {why} (expected http://HOST:PORT or \
             https://HOST:PORT)"
        ))
    };
    let url = url::Url::parse(server).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme {:?} is not http or https",
            url.scheme()
        )));
    }
    if url.host().is_none() {
        return Err(bad("it names no host".to_string()));
    }
    Ok(url)
}

/// Does `url` name this machine (where clear text never leaves it)?
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Did a connection fail because the server's certificate could not be verified?
fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    use tokio_rustls::rustls;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            );
        }
        cur = next_cause(err);
    }
    false
}

/// The cause of `e`. An `io::Error`'s `source()` skips the error it wraps (the TLS
/// library's verdict sits inside two of them), so look inside it instead.
fn next_cause<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    match e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        Some(inner) => Some(inner),
        None => e.source(),
    }
}

/// The innermost error of a chain: for a failed connect, the OS's own words.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = next_cause(cur) {
        cur = next;
    }
    cur.to_string()
}

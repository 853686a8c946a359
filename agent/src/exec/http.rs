//! The `http` executor: one request made from the delegate's network.
//!
//! The task log shows the request line, the response status and headers and the start of
//! the body, which is what an operator debugging a health check or webhook needs.

use std::sync::OnceLock;
use std::time::Duration;

use delegate_protocol::HttpSpec;

use super::{ExecContext, ExecOutcome, Facts};
use crate::config::Config;

/// HTTP tasks run where `[http]` is enabled; a request in flight dies with the agent.
pub(super) fn facts(config: &Config) -> Facts {
    Facts {
        runs: config.http_enabled,
        adoptable: false,
    }
}

/// Most response body bytes copied to the task log.
const MAX_LOGGED_BODY: usize = 64 * 1024;

fn client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(30))
                .redirect(reqwest::redirect::Policy::limited(5))
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

pub async fn run(spec: &HttpSpec, mut ctx: ExecContext) -> ExecOutcome {
    let client = match client() {
        Ok(c) => c,
        Err(e) => return ExecOutcome::CouldNotStart(format!("cannot build an HTTP client: {e}")),
    };
    let method_name = spec.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
    let method = match reqwest::Method::from_bytes(method_name.as_bytes()) {
        Ok(m) => m,
        Err(_) => {
            return ExecOutcome::CouldNotStart(format!("{method_name:?} is not an HTTP method"));
        }
    };
    let mut req = client.request(method, &spec.url);
    for (k, v) in &spec.headers {
        req = req.header(k, v);
    }
    if let Some(b) = &spec.body {
        req = req.body(b.clone());
    }
    ctx.note(&format!("{method_name} {}", spec.url));
    let sent = tokio::select! {
        r = req.send() => r,
        _ = ctx.stop.cancelled() => {
            return ExecOutcome::Done { success: false, message: "request stopped before an answer came".into() };
        }
    };
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("request to {} failed: {e}", spec.url);
            ctx.note(&msg);
            return ExecOutcome::Done {
                success: false,
                message: msg,
            };
        }
    };
    let status = resp.status();
    let mut head = format!("{:?} {status}\n", resp.version());
    for (k, v) in resp.headers() {
        head.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    head.push('\n');
    ctx.log.append(head.as_bytes());
    let mut logged = 0usize;
    loop {
        let chunk = tokio::select! {
            c = resp.chunk() => c,
            _ = ctx.stop.cancelled() => break,
        };
        match chunk {
            Ok(Some(c)) => {
                let take = c.len().min(MAX_LOGGED_BODY - logged);
                ctx.log.append(&c[..take]);
                logged += take;
                if logged >= MAX_LOGGED_BODY {
                    ctx.note("\nbody truncated in the log at 64 KiB");
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                ctx.note(&format!("\nreading the body failed: {e}"));
                break;
            }
        }
    }
    let code = status.as_u16();
    if spec.status_ok(code) {
        ExecOutcome::Done {
            success: true,
            message: format!("{} answered {status}", spec.url),
        }
    } else {
        let want = if spec.expect_status.is_empty() {
            "2xx".to_string()
        } else {
            format!("{:?}", spec.expect_status)
        };
        ExecOutcome::Done {
            success: false,
            message: format!("{} answered {status}, expected {want}", spec.url),
        }
    }
}

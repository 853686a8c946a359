//! The agent's own figures in the Prometheus text format, on an opt-in local listener.
//!
//! The agent only dials out, so metrics are off unless `metrics_listen` names an address
//! (meant for loopback: a node exporter or a local Prometheus scrapes it there). Counters
//! are bumped where things happen (a task finished, the manager came back); gauges that
//! are cheap to read (tasks running, spool bytes) are read at each scrape instead, so no
//! hook can forget to update them. The HTTP side is a tiny `GET /metrics` responder on
//! tokio: one request per connection, bounded in size and time, at most [`MAX_SCRAPES`]
//! connections at once, no dependency on a server framework the agent does not otherwise
//! need.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use delegate_protocol::Outcome;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Longest request head a scraper may send.
const MAX_REQUEST: usize = 8 * 1024;
/// A scraper gets this long to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole exchange (request and answer) ends within this, however slowly the peer reads.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most scrapes answered at once; a connection beyond them is closed on accept. Every
/// connection is a file descriptor of the agent, which tasks need too: a local user or
/// task holding 1,100 idle connections took all 1,024 and a task then failed to journal
/// (docs/security.md, second review, finding 6). A Prometheus or two need a handful.
pub const MAX_SCRAPES: usize = 16;

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen for metrics on {addr} (metrics_listen in the config); pick a free address or remove the line"
)]
pub struct MetricsError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::Cancelled => "cancelled",
        Outcome::TimedOut => "timed_out",
        Outcome::Lost => "lost",
    }
}

/// Every figure the agent exports. Cheap to keep when nobody scrapes.
pub struct Metrics {
    registry: Registry,
    tasks_running: Gauge,
    tasks_finished: Family<OutcomeLabel, Counter>,
    spool_bytes: Gauge,
    connected: Gauge,
    reconnects: Counter,
    was_connected: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("delegate");
        let tasks_running = Gauge::default();
        let tasks_finished = Family::<OutcomeLabel, Counter>::default();
        let spool_bytes = Gauge::default();
        let connected = Gauge::default();
        let reconnects = Counter::default();
        registry.register(
            "tasks_running",
            "Tasks whose process or container runs now",
            tasks_running.clone(),
        );
        registry.register(
            "tasks_finished",
            "Task attempts that ended on this agent, by outcome",
            tasks_finished.clone(),
        );
        registry.register(
            "spool_bytes",
            "Bytes in the spool: logs and results not yet acknowledged by the manager, and the journal of running tasks",
            spool_bytes.clone(),
        );
        registry.register(
            "manager_connected",
            "1 while the last request to the manager got an answer",
            connected.clone(),
        );
        registry.register(
            "manager_reconnects",
            "Times the manager answered again after a loss of connection",
            reconnects.clone(),
        );
        registry.register(
            "build",
            "Version of this agent",
            Info::new(vec![("version", crate::VERSION)]),
        );
        // Every outcome from the first scrape on, so rates work without a first event.
        for o in [
            Outcome::Succeeded,
            Outcome::Failed,
            Outcome::Cancelled,
            Outcome::TimedOut,
            Outcome::Lost,
        ] {
            let _ = tasks_finished.get_or_create(&OutcomeLabel {
                outcome: outcome_name(o),
            });
        }
        Metrics {
            registry,
            tasks_running,
            tasks_finished,
            spool_bytes,
            connected,
            reconnects,
            was_connected: AtomicBool::new(false),
        }
    }

    pub fn task_finished(&self, outcome: Outcome) {
        self.tasks_finished
            .get_or_create(&OutcomeLabel {
                outcome: outcome_name(outcome),
            })
            .inc();
    }

    /// The link to the manager went up or down (called on changes only).
    pub fn set_connected(&self, up: bool) {
        self.connected.set(i64::from(up));
        if up && self.was_connected.swap(true, Ordering::Relaxed) {
            self.reconnects.inc();
        }
    }

    /// The text exposition, with the gauges read now.
    pub fn render(&self, running: usize, spool_root: &Path) -> String {
        self.tasks_running
            .set(i64::try_from(running).unwrap_or(i64::MAX));
        self.spool_bytes
            .set(i64::try_from(dir_bytes(spool_root, 2)).unwrap_or(i64::MAX));
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            warn!("cannot encode metrics: {e}");
        }
        out
    }
}

/// Sum of file sizes under `dir`, `depth` levels down (the spool is `tasks/<attempt>/*`).
fn dir_bytes(dir: &Path, depth: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() && depth > 0 => dir_bytes(&e.path(), depth - 1),
            Ok(m) if m.is_file() => m.len(),
            _ => 0,
        })
        .sum()
}

/// Bind the metrics listener (at start, so a taken port is said at once). A non-loopback
/// address is allowed; the config check warns about it.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError { addr, source })?;
    Ok(l)
}

/// The running metrics listener; dropping it stops answering.
pub struct Server(tokio::task::JoinHandle<()>);

impl Server {
    /// Answer scrapes on `listener`; `render` makes the body of each.
    pub fn spawn(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) -> Server {
        Server(tokio::spawn(serve(listener, render)))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    let mut refused: u64 = 0;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                warn!("metrics listener: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once: its descriptor is back before the next accept.
            drop(stream);
            refused += 1;
            if refused.is_power_of_two() {
                warn!(
                    %peer,
                    "metrics listener: {MAX_SCRAPES} scrapes are open already; closed {refused} connection(s) so far"
                );
            }
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(EXCHANGE_TIMEOUT, answer(stream, &*render)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, "metrics request: {e}"),
                Err(_) => debug!(%peer, "metrics request: not done in time; closed"),
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    render: &(dyn Fn() -> String + Send + Sync),
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_REQUEST {
                return Err(std::io::Error::other("incomplete or oversized request"));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::other("request not sent in time"))??;
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only /metrics is served here\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_string(),
        ),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Second review, finding 6: a connection beyond [`MAX_SCRAPES`] open ones is closed at once
    /// (the old listener kept every one for its 5 s header timeout, so 1,100 of them took
    /// all the agent's descriptors); once they are gone, scrapes are answered again.
    #[tokio::test]
    async fn connections_beyond_the_scrape_limit_are_closed_at_once() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _server = Server::spawn(listener, Arc::new(|| "up 1\n".to_string()));
        let mut idle = Vec::new();
        for _ in 0..MAX_SCRAPES {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // Accepted after the ones before it (the backlog is a queue): no slot is left.
        let mut extra = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0) | Err(_))),
            "the connection beyond the limit stayed open: {closed:?}"
        );
        // The held ones still count: they are open, waiting for their request.
        let mut first = idle.remove(0);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), first.read(&mut buf))
                .await
                .is_err(),
            "a connection within the limit was closed early"
        );
        drop(first);
        drop(idle);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
                .await
                .expect("send");
            let mut reply = Vec::new();
            let _ = s.read_to_end(&mut reply).await;
            if reply.starts_with(b"HTTP/1.1 200") {
                assert!(reply.ends_with(b"up 1\n"));
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "scrapes were not answered again after the connections closed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn exposition_names_every_figure_and_counts_outcomes_and_reconnects() {
        let m = Metrics::new();
        m.task_finished(Outcome::Failed);
        m.task_finished(Outcome::Failed);
        m.set_connected(true);
        m.set_connected(false);
        m.set_connected(true);
        let dir = tempfile::tempdir().expect("tempdir");
        let task = dir.path().join("t1.1");
        std::fs::create_dir(&task).expect("mkdir");
        std::fs::write(task.join("log"), b"12345").expect("write");
        let text = m.render(3, dir.path());
        for line in [
            "delegate_tasks_running 3",
            "delegate_tasks_finished_total{outcome=\"failed\"} 2",
            "delegate_tasks_finished_total{outcome=\"succeeded\"} 0",
            "delegate_spool_bytes 5",
            "delegate_manager_connected 1",
            "delegate_manager_reconnects_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
        assert!(text.contains(&format!(
            "delegate_build_info{{version=\"{}\"}} 1",
            crate::VERSION
        )));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}

//! How the CLI shows views to people: the tables of tokens, tasks and delegates, a
//! task's details and its one-line summary, with times as RFC 3339 and spans rounded for
//! reading. Everything a delegate or a task chose passes through `text::shown`, so no
//! value can drive the operator's terminal. (`--json` bypasses this: scripts get the
//! API's own JSON.)

use std::time::{Duration, UNIX_EPOCH};

use delegate_protocol::{DelegateView, TaskView, TokenView, UnixMillis};

use crate::text::shown;

/// `token list`: one row per token.
pub(super) fn tokens_table(tokens: &[TokenView]) -> String {
    let rows = tokens
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                rfc3339(t.created_at),
                if t.revoked { "revoked" } else { "active" }.to_string(),
                t.tags
                    .as_ref()
                    .map(|t| t.join(","))
                    .unwrap_or_else(|| "(any)".to_string()),
            ]
        })
        .collect();
    table(&["NAME", "CREATED", "STATUS", "TAGS"], rows)
}

/// `task list`: one row per task, as the manager listed them.
pub(super) fn tasks_table(tasks: &[TaskView]) -> String {
    let rows = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.state.to_string(),
                t.kind.clone(),
                t.attempt.to_string(),
                t.delegate_name.clone().unwrap_or_else(|| "-".into()),
                rfc3339(t.created_at),
            ]
        })
        .collect();
    table(
        &["ID", "STATE", "KIND", "ATTEMPT", "DELEGATE", "CREATED"],
        rows,
    )
}

/// `delegates`: one row per delegate, its last heartbeat as a time before `now`.
pub(super) fn delegates_table(ds: &[DelegateView], now: UnixMillis) -> String {
    let rows = ds
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                d.id.clone(),
                d.version.clone(),
                d.upgrade_group.clone().unwrap_or_else(|| "-".to_string()),
                d.state.to_string(),
                if d.connected { "yes" } else { "no" }.to_string(),
                d.last_heartbeat
                    .map(|h| format!("{} ago", span(h, now)))
                    .unwrap_or_else(|| "never".to_string()),
                format!("{}/{}", d.in_flight, d.capacity),
                d.targets
                    .iter()
                    .map(|t| match &t.name {
                        Some(n) => format!("{}:{n}", t.kind),
                        None => t.kind.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                d.tags.join(","),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "ID",
            "VERSION",
            "GROUP",
            "STATE",
            "CONNECTED",
            "LAST HEARTBEAT",
            "IN-FLIGHT",
            "TARGETS",
            "TAGS",
        ],
        rows,
    )
}

/// One line: `task t_… succeeded (exit 0) on delegate NAME in 1s 200ms`.
pub(super) fn summary(t: &TaskView) -> String {
    let mut s = format!("task {} {}", t.id, t.state);
    let mut how = Vec::new();
    if let Some(c) = t.exit_code {
        how.push(format!("exit {c}"));
    }
    if let Some(sig) = t.signal {
        how.push(format!("signal {sig}"));
    }
    if !how.is_empty() {
        s.push_str(&format!(" ({})", how.join(", ")));
    }
    if let Some(d) = &t.delegate_name {
        s.push_str(&format!(" on delegate {d}"));
    }
    if let (Some(a), Some(b)) = (t.started_at, t.finished_at) {
        s.push_str(&format!(" in {}", span(a, b)));
    }
    if let Some(m) = &t.message {
        s.push_str(&format!(": {m}"));
    }
    s
}

pub(super) fn show_text(t: &TaskView) -> String {
    let mut lines = vec![
        ("id", t.id.clone()),
        ("kind", t.kind.clone()),
        ("state", t.state.to_string()),
        (
            "attempt",
            format!("{} of at most {}", t.attempt, t.retries + 1),
        ),
        (
            "delegate",
            match (&t.delegate_name, &t.delegate_id) {
                (Some(n), Some(i)) => format!("{n} ({i})"),
                _ => "-".to_string(),
            },
        ),
        (
            "selectors",
            if t.selectors.is_empty() {
                "-".to_string()
            } else {
                t.selectors.join(", ")
            },
        ),
        ("timeout", format!("{}s", t.timeout_secs)),
    ];
    if t.cancel_requested {
        lines.push(("cancel", "requested".to_string()));
    }
    if let Some(c) = t.exit_code {
        lines.push(("exit code", c.to_string()));
    }
    if let Some(s) = t.signal {
        lines.push(("signal", s.to_string()));
    }
    if let Some(m) = &t.message {
        lines.push(("message", m.clone()));
    }
    lines.push(("created", rfc3339(t.created_at)));
    if let Some(a) = t.assigned_at {
        lines.push((
            "assigned",
            format!("{} (queued {})", rfc3339(a), span(t.created_at, a)),
        ));
    }
    if let Some(s) = t.started_at {
        lines.push(("started", rfc3339(s)));
    }
    if let Some(f) = t.finished_at {
        let ran = t
            .started_at
            .map(|s| format!(" (ran {})", span(s, f)))
            .unwrap_or_default();
        lines.push(("finished", format!("{}{ran}", rfc3339(f))));
    }
    lines.push((
        "log bytes",
        if t.log_truncated {
            format!(
                "{} (truncated at the manager's --max-log-bytes cap)",
                t.log_bytes
            )
        } else {
            t.log_bytes.to_string()
        },
    ));
    lines
        .into_iter()
        .map(|(k, v)| format!("{:<10} {}", format!("{k}:"), shown(&v)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rfc3339(ms: UnixMillis) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// A duration between two instants, rounded to what a person wants to read.
fn span(from: UnixMillis, to: UnixMillis) -> String {
    let ms = (to - from).max(0) as u64;
    let d = if ms >= 60_000 {
        Duration::from_secs(ms / 1000)
    } else {
        Duration::from_millis(ms)
    };
    humantime::format_duration(d).to_string()
}

/// Left-aligned columns, two spaces apart; what others chose is shown escaped.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| shown(c).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut outl = vec![line(header.iter().map(|h| h.to_string()).collect())];
    outl.extend(rows.into_iter().map(line));
    outl.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use delegate_protocol::DelegateState;

    #[test]
    fn the_delegates_table_shows_the_upgrade_group_or_a_dash() {
        let d = |name: &str, group: Option<&str>| DelegateView {
            id: format!("d_{name}"),
            name: name.into(),
            hostname: "h".into(),
            version: "1.2.3".into(),
            tags: vec![],
            targets: vec![],
            capacity: 4,
            state: DelegateState::Running,
            connected: true,
            last_heartbeat: Some(1_000),
            in_flight: 0,
            upgrade_group: group.map(str::to_string),
        };
        let text = delegates_table(&[d("a", Some("canary")), d("b", None)], 2_000);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines[0][..4], ["NAME", "ID", "VERSION", "GROUP"], "{text}");
        assert_eq!(lines[1][..4], ["a", "d_a", "1.2.3", "canary"], "{text}");
        assert_eq!(lines[2][..4], ["b", "d_b", "1.2.3", "-"], "{text}");
    }
}

//! systemd service notifications (`Type=notify`): READY, STATUS, STOPPING, WATCHDOG.
//!
//! All of these are no-ops when `NOTIFY_SOCKET` is not set, so the same binary runs under
//! systemd, in a terminal and in tests.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// Config loaded and the daemon is about to serve; registration happens afterwards so a
/// manager that is down does not make `systemctl start` hang.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Ping the watchdog at half its interval when `WatchdogSec=` is set.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()? / 2;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}

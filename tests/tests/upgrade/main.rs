//! Upgrader integration tests: the real `delegate-upgrader`, `delegate` and
//! `delegate-manager` binaries, a loopback release server, a private dbus-daemon standing
//! in for the system bus, and a process supervisor standing in for systemd.

mod checks;
mod flow;

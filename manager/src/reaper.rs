//! The lease reaper: every tick, end or re-queue the held tasks whose lease lapsed, and
//! keep a step of the wall clock from lapsing every lease at once.
//!
//! Lease deadlines are wall-clock times in the database, so that they survive a restart
//! (start-up gives every held task a fresh lease). A forward step of the wall clock (NTP
//! catching up after a suspend, an operator's `date -s`) larger than the lease TTL would
//! otherwise make every lease look lapsed and re-run every task. The reaper reads a
//! monotonic clock beside the wall clock; when the wall moved further than the monotonic
//! clock between two ticks, it moves the leases set before the step by the same amount,
//! as start-up does after downtime. The clock is a trait so tests can step it.

use std::time::{Duration, Instant};

use delegate_protocol::UnixMillis;

use crate::error::StoreError;
use crate::store::{Reaped, Store, now_ms};

/// A wall step smaller than this is ordinary drift between two ticks, not a step.
const STEP_SLACK_MS: i64 = 1_000;

/// Where the reaper reads the time.
pub trait Clock: Send + Sync {
    /// The wall clock, as stored in lease deadlines.
    fn wall_ms(&self) -> UnixMillis;
    /// A clock that never steps, from any fixed origin.
    fn monotonic(&self) -> Duration;
}

/// The system's wall and monotonic clocks.
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn wall_ms(&self) -> UnixMillis {
        now_ms()
    }
    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub reaped: Reaped,
    /// A forward wall-clock step seen since the last pass: its size in ms and how many
    /// leases were moved by it.
    pub step: Option<(i64, usize)>,
}

/// The reaper's memory between ticks: the last (wall, monotonic) reading.
#[derive(Debug, Default)]
pub struct Reaper {
    last: Option<(UnixMillis, Duration)>,
}

impl Reaper {
    /// One tick: detect a wall-clock step and move the leases it would lapse, then reap.
    pub fn pass(&mut self, store: &Store, clock: &dyn Clock) -> Result<Pass, StoreError> {
        let wall = clock.wall_ms();
        let mono = clock.monotonic();
        let mut pass = Pass::default();
        if let Some((last_wall, last_mono)) = self.last {
            let elapsed = mono.saturating_sub(last_mono).as_millis() as i64;
            let step = (wall - last_wall) - elapsed;
            if step > STEP_SLACK_MS {
                // A lease set before the step ends by `last_wall + elapsed + ttl` on the
                // old clock; one set after it (a heartbeat since) ends later than that on
                // the new clock and is right already.
                let set_before = last_wall + elapsed + store.lease_ttl_ms();
                let moved = store.shift_leases(step, set_before)?;
                pass.step = Some((step, moved));
            }
            // A backward step only makes leases last longer (tasks are not lost); it is
            // left alone.
        }
        self.last = Some((wall, mono));
        pass.reaped = store.reap(wall)?;
        Ok(pass)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use delegate_protocol::{
        DelegateState, HeartbeatRequest, RegisterRequest, ShellSpec, SubmitTask, TaskSpec,
        TaskState,
    };

    use super::*;
    use crate::auth;

    const TTL: Duration = Duration::from_secs(30);

    /// A clock the test steps by hand.
    struct TestClock(Mutex<(UnixMillis, Duration)>);

    impl TestClock {
        /// Time passes: both clocks advance.
        fn advance(&self, ms: u64) {
            let mut g = self.0.lock().expect("clock");
            g.0 += ms as i64;
            g.1 += Duration::from_millis(ms);
        }
        /// The wall clock alone jumps.
        fn step_wall(&self, ms: i64) {
            self.0.lock().expect("clock").0 += ms;
        }
        fn wall(&self) -> UnixMillis {
            self.0.lock().expect("clock").0
        }
    }

    impl Clock for TestClock {
        fn wall_ms(&self) -> UnixMillis {
            self.0.lock().expect("clock").0
        }
        fn monotonic(&self) -> Duration {
            self.0.lock().expect("clock").1
        }
    }

    fn world() -> (tempfile::TempDir, Store, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("m.db"), TTL).expect("open");
        s.create_token("tok", &auth::hash_token("dlg_a"), None, 0)
            .expect("token");
        let reg = RegisterRequest {
            name: "a".into(),
            hostname: "h".into(),
            version: "1".into(),
            tags: vec![],
            targets: vec![],
            capacity: 2,
            upgrade_group: None,
        };
        let id = s.register("tok", &reg, 0).expect("register");
        (dir, s, id)
    }

    fn submit(s: &Store, id: &str, now: UnixMillis) {
        let t = SubmitTask {
            spec: TaskSpec::Shell(ShellSpec {
                script: "true".into(),
                ..Default::default()
            }),
            selectors: vec![],
            timeout_secs: None,
            retries: 1,
        };
        s.submit(id, &t, 60, now).expect("submit");
    }

    /// A forward step of the wall clock larger than the lease TTL lapsed
    /// every lease at once and re-ran every task.
    #[test]
    fn a_forward_clock_step_does_not_lapse_leases() {
        let (_d, s, me) = world();
        let clock = TestClock(Mutex::new((1_000_000, Duration::ZERO)));
        let mut reaper = Reaper::default();
        submit(&s, "t_1", clock.wall());
        submit(&s, "t_2", clock.wall());
        assert_eq!(
            s.acquire("tok", &me, 2, clock.wall(), None)
                .expect("acquire")
                .tasks
                .len(),
            2
        );
        assert!(!reaper.pass(&s, &clock).expect("pass").reaped.any());

        clock.advance(500);
        clock.step_wall(3_600_000);
        // A heartbeat after the step renews t_2 on the new clock; t_1 is not renewed.
        let hb = HeartbeatRequest {
            state: DelegateState::Running,
            in_flight: vec!["t_2".into()],
            ..Default::default()
        };
        s.heartbeat("tok", &me, &hb, clock.wall())
            .expect("heartbeat");
        let pass = reaper.pass(&s, &clock).expect("pass");
        assert!(!pass.reaped.any(), "the step lapsed leases: {pass:?}");
        assert_eq!(pass.step, Some((3_600_000, 1)), "only t_1's lease moves");
        for t in ["t_1", "t_2"] {
            assert_eq!(s.task(t).expect("view").state, TaskState::Assigned);
        }

        // Leases still lapse when time really passes without heartbeats.
        clock.advance(31_000);
        let pass = reaper.pass(&s, &clock).expect("pass");
        assert_eq!((pass.step, pass.reaped.requeued), (None, 2));
    }

    #[test]
    fn ordinary_ticks_and_backward_steps_move_nothing() {
        let (_d, s, me) = world();
        let clock = TestClock(Mutex::new((1_000_000, Duration::ZERO)));
        let mut reaper = Reaper::default();
        submit(&s, "t_1", clock.wall());
        s.acquire("tok", &me, 1, clock.wall(), None)
            .expect("acquire");
        for _ in 0..10 {
            clock.advance(1_000);
            assert_eq!(reaper.pass(&s, &clock).expect("pass").step, None);
        }
        clock.step_wall(-60_000);
        assert_eq!(reaper.pass(&s, &clock).expect("pass").step, None);
        assert_eq!(s.task("t_1").expect("view").state, TaskState::Assigned);
    }
}

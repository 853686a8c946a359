//! The manager's store on both backends: a core set of its rules (register, lease,
//! result, cancel, lapsed leases, log appends, retention) run against SQLite and against a
//! real PostgreSQL started for the test, through the same `Store` the API uses. The
//! PostgreSQL runs also check what only several nodes can break: two stores on one
//! database leasing and reaping at once.

use std::time::Duration;

use delegate_manager::auth;
use delegate_manager::error::StoreError;
use delegate_manager::pg::{PgClock, PgOptions};
use delegate_manager::store::{Cancel, Finish, Store, now_ms};
use delegate_protocol::{
    HeartbeatRequest, Outcome, RegisterRequest, ShellSpec, SubmitTask, TaskResult, TaskSpec,
    TaskState,
};
use delegate_tests::postgres::Postgres;

const TTL: Duration = Duration::from_secs(30);

/// Run `scenario` on a fresh SQLite store, then on a fresh PostgreSQL one.
fn on_both(scenario: impl Fn(&Store)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = Store::open(&dir.path().join("m.db"), TTL).expect("open sqlite");
    prepare(&sqlite);
    scenario(&sqlite);
    let pg = Postgres::start().expect("PostgreSQL starts");
    let store = open_pg(&pg);
    prepare(&store);
    scenario(&store);
}

/// A PostgreSQL store that takes the time each call is given, as SQLite does: the rules'
/// tests move time by hand. (Served stores keep the database's clock; see
/// `nodes_with_skewed_clocks_agree_on_leases_because_the_database_keeps_the_time`.)
fn open_pg(pg: &Postgres) -> Store {
    Store::open_postgres_with(
        &pg.url(),
        TTL,
        PgOptions {
            clock: PgClock::Caller,
            ..Default::default()
        },
    )
    .expect("open postgres")
}

fn prepare(s: &Store) {
    s.create_token("tok", &auth::hash_token("dlg_a"), None, 0)
        .expect("token");
    s.create_token("other", &auth::hash_token("dlg_b"), None, 0)
        .expect("token");
}

fn reg(name: &str, tags: &[&str]) -> RegisterRequest {
    RegisterRequest {
        name: name.into(),
        hostname: "host".into(),
        version: "1.0.0".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        targets: vec![],
        capacity: 4,
    }
}

fn shell(selectors: &[&str], retries: u32) -> SubmitTask {
    SubmitTask {
        spec: TaskSpec::Shell(ShellSpec {
            script: "echo hi".into(),
            ..Default::default()
        }),
        selectors: selectors.iter().map(|t| t.to_string()).collect(),
        timeout_secs: None,
        retries,
    }
}

fn result(outcome: Outcome, exit_code: Option<i32>) -> TaskResult {
    TaskResult {
        outcome,
        exit_code,
        signal: None,
        message: None,
        log_bytes: 0,
    }
}

fn leased(s: &Store, delegate: &str, max: u32, now: i64) -> Vec<String> {
    s.acquire("tok", delegate, max, now, None)
        .expect("acquire")
        .tasks
        .into_iter()
        .map(|a| a.task_id)
        .collect()
}

#[test]
fn register_lease_oldest_matching_first_and_finish_once_on_both_backends() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &["linux"]), 0).expect("reg");
        assert_eq!(
            s.register("tok", &reg("a", &["linux"]), 1).expect("again"),
            a
        );
        assert!(matches!(
            s.register("other", &reg("a", &["linux"]), 1),
            Err(StoreError::NameTaken { .. })
        ));
        s.submit("t_gpu", &shell(&["gpu"], 0), 60, 1)
            .expect("submit");
        s.submit("t_1", &shell(&["linux"], 0), 60, 2)
            .expect("submit");
        s.submit("t_2", &shell(&[], 0), 60, 3).expect("submit");
        assert_eq!(leased(s, &a, 1, 10), ["t_1"]);
        assert_eq!(leased(s, &a, 5, 10), ["t_2"], "t_gpu needs a tag a lacks");
        assert_eq!(s.task("t_gpu").expect("view").state, TaskState::Queued);
        s.started("tok", "t_1", 1, 11).expect("started");
        let done = result(Outcome::Succeeded, Some(0));
        let (view, effect) = s.finish("tok", "t_1", 1, &done, 12).expect("finish");
        assert_eq!((view.state, effect), (TaskState::Succeeded, Finish::Done));
        s.finish("tok", "t_1", 1, &done, 13)
            .expect("same result again");
        assert!(matches!(
            s.finish("tok", "t_1", 1, &result(Outcome::Failed, Some(1)), 14),
            Err(StoreError::ResultConflict { .. })
        ));
    });
}

#[test]
fn cancel_ends_a_queued_task_and_flags_a_held_one_on_both_backends() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        s.submit("t_q", &shell(&[], 0), 60, 1).expect("submit");
        let (view, effect) = s.cancel("t_q", 2).expect("cancel");
        assert_eq!(
            (view.state, effect),
            (TaskState::Cancelled, Cancel::Cancelled)
        );
        assert!(
            leased(s, &a, 5, 3).is_empty(),
            "a cancelled task is not leased"
        );
        s.submit("t_h", &shell(&[], 0), 60, 4).expect("submit");
        assert_eq!(leased(s, &a, 1, 5), ["t_h"]);
        let (_, effect) = s.cancel("t_h", 6).expect("cancel");
        assert_eq!(effect, Cancel::Requested);
        let got = s.acquire("tok", &a, 0, 7, None).expect("acquire");
        assert_eq!(got.cancel, ["t_h"], "the holder is told once");
        let again = s.acquire("tok", &a, 0, 8, None).expect("acquire");
        assert!(again.cancel.is_empty());
        let hb = HeartbeatRequest {
            in_flight: vec!["t_h".into()],
            ..Default::default()
        };
        assert_eq!(
            s.heartbeat("tok", &a, &hb, 9).expect("heartbeat").cancel,
            ["t_h"]
        );
    });
}

#[test]
fn a_lapsed_lease_is_requeued_then_lost_on_both_backends() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        s.submit("t_1", &shell(&[], 1), 60, 0).expect("submit");
        assert_eq!(leased(s, &a, 1, 0), ["t_1"]);
        let ttl = TTL.as_millis() as i64;
        assert!(!s.reap(ttl - 1).expect("reap").any(), "not lapsed yet");
        let r = s.reap(ttl + 1).expect("reap");
        assert_eq!((r.requeued, r.lost), (1, 0));
        let v = s.task("t_1").expect("view");
        assert_eq!((v.state, v.attempt), (TaskState::Queued, 2));
        assert_eq!(leased(s, &a, 1, ttl + 2), ["t_1"]);
        let r = s.reap(2 * ttl + 3).expect("reap");
        assert_eq!((r.requeued, r.lost), (0, 1));
        assert_eq!(s.task("t_1").expect("view").state, TaskState::Lost);
    });
}

#[test]
fn log_appends_are_idempotent_and_pages_are_bounded_on_both_backends() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        s.submit("t_1", &shell(&[], 0), 60, 0).expect("submit");
        assert_eq!(leased(s, &a, 1, 0), ["t_1"]);
        assert_eq!(s.append_log("tok", "t_1", 1, 0, b"hello ").expect("log"), 6);
        assert_eq!(
            s.append_log("tok", "t_1", 1, 0, b"hello ").expect("resend"),
            6
        );
        assert_eq!(
            s.append_log("tok", "t_1", 1, 3, b"lo world")
                .expect("overlap"),
            11
        );
        assert!(matches!(
            s.append_log("tok", "t_1", 1, 20, b"x"),
            Err(StoreError::LogGap { expected: 11, .. })
        ));
        assert_eq!(
            s.read_log("t_1", 0, usize::MAX).expect("read").data,
            b"hello world"
        );
        assert_eq!(s.read_log("t_1", 4, 3).expect("read").data, b"o w");
        assert_eq!(
            s.read_log("t_1", 2, usize::MAX).expect("read").data,
            b"llo world"
        );
        assert!(s.read_log("t_1", 11, 100).expect("read").data.is_empty());
    });
}

#[test]
fn retention_prunes_only_old_finished_tasks_on_both_backends() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        s.submit("t_old", &shell(&[], 0), 60, 0).expect("submit");
        s.submit("t_new", &shell(&[], 0), 60, 0).expect("submit");
        s.submit("t_queued", &shell(&["gpu"], 0), 60, 0)
            .expect("submit");
        assert_eq!(leased(s, &a, 2, 0), ["t_old", "t_new"]);
        s.append_log("tok", "t_old", 1, 0, b"12345").expect("log");
        let done = result(Outcome::Succeeded, Some(0));
        s.finish("tok", "t_old", 1, &done, 100).expect("finish");
        s.finish("tok", "t_new", 1, &done, 1000).expect("finish");
        let p = s.prune(500).expect("prune");
        assert_eq!((p.tasks, p.log_bytes), (1, 5));
        assert!(matches!(s.task("t_old"), Err(StoreError::TaskNotFound(_))));
        assert!(s.task("t_new").is_ok() && s.task("t_queued").is_ok());
    });
}

/// Two manager nodes on one database: many leases at once hand each task out once, and
/// two reapers at once re-queue a lapsed lease once.
#[test]
fn two_nodes_on_one_postgres_lease_each_task_once_and_reap_each_lease_once() {
    let pg = Postgres::start().expect("PostgreSQL starts");
    let n1 = open_pg(&pg);
    let n2 = open_pg(&pg); // the migrations are applied already
    prepare(&n1);
    const TASKS: usize = 60;
    for i in 0..TASKS {
        n1.submit(&format!("t_{i:03}"), &shell(&[], 1), 60, i as i64)
            .expect("submit");
    }
    let delegates: Vec<String> = (0..6)
        .map(|i| {
            n1.register("tok", &reg(&format!("d{i}"), &[]), 0)
                .expect("reg")
        })
        .collect();
    let got: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = delegates
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let node = if i % 2 == 0 { &n1 } else { &n2 };
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    for _ in 0..40 {
                        mine.extend(leased(node, d, 3, 100));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("leasing thread"))
            .collect()
    });
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "a task was leased twice");
    assert_eq!(got.len(), TASKS, "every task leased");

    let late = 100 + TTL.as_millis() as i64 + 1;
    let (r1, r2) = std::thread::scope(|scope| {
        let a = scope.spawn(|| n1.reap(late).expect("reap 1"));
        let b = scope.spawn(|| n2.reap(late).expect("reap 2"));
        (a.join().expect("reaper 1"), b.join().expect("reaper 2"))
    });
    assert_eq!(
        r1.requeued + r2.requeued,
        TASKS,
        "each lapsed lease re-queued once: {r1:?} {r2:?}"
    );
    for i in 0..TASKS {
        let v = n2.task(&format!("t_{i:03}")).expect("view");
        assert_eq!((v.state, v.attempt), (TaskState::Queued, 2), "{}", v.id);
    }
}

#[test]
fn a_heartbeat_naming_two_attempts_renews_the_current_one_only_on_both_backends() {
    use delegate_protocol::{DelegateState, TaskAttempt};
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        s.submit("t_1", &shell(&[], 1), 60, 0).expect("submit");
        assert_eq!(leased(s, &a, 1, 0), ["t_1"]);
        assert_eq!(s.reap(31_000).expect("reap").requeued, 1);
        let got = s.acquire("tok", &a, 1, 31_000, None).expect("attempt 2");
        assert_eq!(got.tasks[0].attempt, 2);
        let att = |attempt| TaskAttempt {
            id: "t_1".into(),
            attempt,
        };
        let hb = HeartbeatRequest {
            state: DelegateState::Running,
            in_flight: vec!["t_1".into()],
            in_flight_attempts: vec![att(1), att(2)],
        };
        let resp = s.heartbeat("tok", &a, &hb, 40_000).expect("hb");
        assert_eq!(resp.revoked_attempts, [att(1)], "only attempt 1 is stopped");
        assert!(resp.revoked.is_empty(), "{resp:?}");
        assert!(
            !s.reap(65_000).expect("reap").any(),
            "attempt 2 renewed at 40 s"
        );
        // A revoked token's delegate is refused as such.
        s.revoke_token("tok", 66_000).expect("revoke");
        assert!(matches!(
            s.heartbeat("tok", &a, &hb, 67_000),
            Err(StoreError::TokenRevoked(_))
        ));
        assert!(matches!(
            s.acquire("tok", &a, 1, 67_000, None),
            Err(StoreError::TokenRevoked(_))
        ));
    });
}

/// An admin forgetting a delegate while it heartbeats, many times over on PostgreSQL: the
/// forget locks the delegate's row before its tasks', in the order a heartbeat takes them,
/// so one waits for the other. Locking the tasks first made PostgreSQL abort one of the two
/// as a deadlock now and then (a failed request).
#[test]
fn forgetting_a_delegate_while_it_heartbeats_never_deadlocks_on_postgres() {
    use delegate_protocol::DelegateState;
    let pg = Postgres::start().expect("PostgreSQL starts");
    let s = open_pg(&pg);
    prepare(&s);
    let mut refused = 0;
    for round in 0..60 {
        let name = format!("d{round}");
        let id = s.register("tok", &reg(&name, &[]), 0).expect("reg");
        let tasks: Vec<String> = (0..4).map(|i| format!("t{round}_{i}")).collect();
        for t in &tasks {
            s.submit(t, &shell(&[], 1), 60, 0).expect("submit");
        }
        assert_eq!(leased(&s, &id, 4, 0).len(), 4);
        let hb = HeartbeatRequest {
            state: DelegateState::Running,
            in_flight: tasks.clone(),
            in_flight_attempts: vec![],
        };
        let (beating, started) = std::sync::mpsc::channel();
        let (store, id, hb) = (&s, &id, &hb);
        std::thread::scope(|scope| {
            let beats = scope.spawn(move || {
                // Bounded: the forget below ends it within a few heartbeats.
                for i in 0..2_000 {
                    match store.heartbeat("tok", id, hb, 1_000) {
                        Ok(_) if i == 0 => drop(beating.send(())),
                        Ok(_) => {}
                        Err(StoreError::DelegateNotFound(_)) => return 1,
                        Err(e) => panic!("heartbeat in round {round}: {e:?}"),
                    }
                }
                0
            });
            // Forget while heartbeats are under way, not before the first.
            started.recv().expect("a first heartbeat");
            s.forget_delegate(&name, None, 1_000)
                .unwrap_or_else(|e| panic!("forget in round {round}: {e:?}"));
            refused += beats.join().expect("heartbeat thread");
        });
        for t in &tasks {
            assert_eq!(s.task(t).expect("view").state, TaskState::Queued, "{t}");
        }
    }
    // The premise: heartbeats did run into the forget (not all before it).
    assert!(refused > 0, "no heartbeat ever met a forgotten delegate");
}

/// Issue 17 item 9: every node stamped leases and reaped them with its own wall clock. A
/// node whose clock ran an hour behind granted leases that had lapsed already, and a
/// node an hour ahead reaped a lease another node had granted a moment before (the task
/// ran twice). Both now take the time from PostgreSQL, whatever their own clocks say.
#[test]
fn nodes_with_skewed_clocks_agree_on_leases_because_the_database_keeps_the_time() {
    use delegate_protocol::DelegateState;
    const HOUR: i64 = 3_600_000;
    let pg = Postgres::start().expect("PostgreSQL starts");
    let behind = Store::open_postgres(&pg.url(), TTL).expect("node behind");
    let ahead = Store::open_postgres(&pg.url(), TTL).expect("node ahead");
    prepare(&behind);
    let now = now_ms();
    let d = behind
        .register("tok", &reg("a", &[]), now - HOUR)
        .expect("reg");
    behind
        .submit("t_1", &shell(&[], 1), 60, now - HOUR)
        .expect("submit");
    assert_eq!(leased(&behind, &d, 1, now - HOUR), ["t_1"]);
    let r = ahead.reap(now + HOUR).expect("reap");
    assert!(
        !r.any(),
        "the node whose clock runs ahead reaped a lease granted a moment ago: {r:?}"
    );
    let hb = HeartbeatRequest {
        state: DelegateState::Running,
        in_flight: vec!["t_1".into()],
        in_flight_attempts: vec![],
    };
    let resp = behind
        .heartbeat("tok", &d, &hb, now - HOUR)
        .expect("heartbeat");
    assert!(resp.revoked.is_empty(), "{resp:?}");
    assert!(!ahead.reap(now + HOUR).expect("reap").any());
    assert_eq!(ahead.task("t_1").expect("view").state, TaskState::Assigned);
    let listed = ahead.list_delegates(now + HOUR).expect("list");
    assert!(
        listed.iter().all(|v| v.connected),
        "a delegate that just heartbeat shows disconnected: {listed:?}"
    );
    // The database's clock moves leases, not a node's: a step of this node's clock
    // shifts nothing.
    assert_eq!(ahead.shift_leases(HOUR, now + 2 * HOUR).expect("shift"), 0);
}

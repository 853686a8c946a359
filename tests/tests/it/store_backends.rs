//! The manager's store contract, run on both backends: every rule of the store (tokens,
//! register, lease, heartbeat, result, cancel, lapsed leases, forgetting, log appends and
//! the cap, retention) against SQLite and against a real PostgreSQL started for the test,
//! through the same `Store` the API uses. The PostgreSQL runs also check what only
//! several nodes can break: two stores on one database leasing and reaping at once, and
//! clocks that disagree. What only one backend has stays with it (SQLite's migrations and
//! queue index, PostgreSQL's URL parsing and notes: their unit tests).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use delegate_manager::auth;
use delegate_manager::error::StoreError;
use delegate_manager::pg::{PgClock, PgOptions};
use delegate_manager::store::{Cancel, Finish, Pruned, Store, now_ms};
use delegate_protocol::{
    DelegateState, HeartbeatRequest, Outcome, RegisterRequest, ShellSpec, SubmitTask, TaskResult,
    TaskSpec, TaskState, UnixMillis,
};
use delegate_tests::postgres::{DATABASE, Postgres};

const TTL: Duration = Duration::from_secs(30);

/// One PostgreSQL server for the contract scenarios running at the same time, each in a
/// database of its own: starting a server per scenario would cost a second of `initdb`
/// each. The server stops when the last scenario using it is done (nothing is left
/// behind); a later scenario starts another.
/// `None` when PostgreSQL is missing (or left out by `scripts/test --fast`): the test kit's
/// prerequisite policy has then said so, and the scenario has run on SQLite only.
fn shared_postgres() -> Option<Arc<Postgres>> {
    static SHARED: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pg) = shared.upgrade() {
        return Some(pg);
    }
    let pg = Arc::new(delegate_tests::require!(Postgres::for_test(), None));
    *shared = Arc::downgrade(&pg);
    Some(pg)
}

/// A fresh, empty database on `pg`; its URL.
fn fresh_database(pg: &Postgres) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = format!("contract_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    pg.psql("postgres", &format!("CREATE DATABASE {name}"))
        .expect("create a database");
    let url = pg.url();
    let base = url
        .strip_suffix(DATABASE)
        .expect("the test server's URL ends with its database");
    format!("{base}{name}")
}

/// Run `scenario` on a fresh SQLite store, then on a fresh PostgreSQL one.
fn on_both(scenario: impl Fn(&Store)) {
    on_both_with(|s| s, scenario);
}

/// [`on_both`] with each attempt's log capped at `cap` bytes.
fn on_both_capped(cap: u64, scenario: impl Fn(&Store)) {
    on_both_with(|s| s.with_max_log_bytes(cap), scenario);
}

fn on_both_with(setup: impl Fn(Store) -> Store, scenario: impl Fn(&Store)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = setup(Store::open(&dir.path().join("m.db"), TTL).expect("open sqlite"));
    prepare(&sqlite);
    scenario(&sqlite);
    let Some(pg) = shared_postgres() else {
        return;
    };
    let store = setup(open_pg(&fresh_database(&pg)));
    prepare(&store);
    scenario(&store);
}

/// A PostgreSQL store that takes the time each call is given, as SQLite does: the rules'
/// tests move time by hand. (Served stores keep the database's clock; see
/// `nodes_with_skewed_clocks_agree_on_leases_because_the_database_keeps_the_time`.)
fn open_pg(url: &str) -> Store {
    Store::open_postgres_with(
        url,
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
        upgrade_group: None,
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

fn submit(s: &Store, id: &str, task: SubmitTask, now: UnixMillis) {
    s.submit(id, &task, 60, now).expect("submit");
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

/// A delegate's upgrade group (from its config) is stored on register, listed, changed
/// by a re-register that names another, and cleared by one that names none (a host whose
/// config lost the key), on both backends.
#[test]
fn the_upgrade_group_round_trips_and_a_re_register_changes_it_on_both_backends() {
    on_both(|s| {
        let group_of = |name: &str| {
            let ds = s.list_delegates(5).expect("list");
            let d = ds.iter().find(|d| d.name == name).expect("listed");
            d.upgrade_group.clone()
        };
        let with = |name: &str, group: Option<&str>| RegisterRequest {
            upgrade_group: group.map(str::to_string),
            ..reg(name, &[])
        };
        let a = s
            .register("tok", &with("a", Some("canary")), 0)
            .expect("reg");
        s.register("tok", &with("b", None), 0).expect("reg");
        assert_eq!(group_of("a").as_deref(), Some("canary"));
        assert_eq!(group_of("b"), None);

        let again = s
            .register("tok", &with("a", Some("wave-2")), 1)
            .expect("again");
        assert_eq!(again, a, "the same delegate");
        assert_eq!(group_of("a").as_deref(), Some("wave-2"));
        s.register("tok", &with("b", Some("canary")), 1)
            .expect("again");
        assert_eq!(group_of("b").as_deref(), Some("canary"));

        s.register("tok", &with("a", None), 2).expect("again");
        assert_eq!(group_of("a"), None);

        // A group that breaks the rule (an agent that skipped its own check) is refused,
        // and the stored one stays.
        s.register("tok", &with("b", Some("Bad_Group")), 3)
            .expect_err("bad group refused");
        assert!(matches!(
            s.register("tok", &with("b", Some("Bad_Group")), 3),
            Err(StoreError::Invalid(m)) if m.contains("upgrade_group \"Bad_Group\"")
        ));
        assert_eq!(group_of("b").as_deref(), Some("canary"));
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

/// A draining delegate is leased nothing, and the long poll's question right after a look
/// that leased nothing (is it draining?) is answered as of that look, never staler: a
/// drain or its end after the look is seen.
#[test]
fn a_draining_delegate_is_leased_nothing_and_its_poll_learns_it_on_both_backends() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        let hb = |state| HeartbeatRequest {
            state,
            ..Default::default()
        };
        s.heartbeat("tok", &a, &hb(DelegateState::Running), 1)
            .expect("heartbeat");
        assert!(leased(s, &a, 1, 2).is_empty(), "nothing queued");
        s.heartbeat("tok", &a, &hb(DelegateState::Draining), 3)
            .expect("drain");
        assert!(
            s.delegate_draining(&a).expect("state"),
            "a drain after the look is seen"
        );
        s.submit("t_1", &shell(&[], 0), 60, 4).expect("submit");
        assert!(
            leased(s, &a, 1, 5).is_empty(),
            "a draining delegate is leased nothing"
        );
        assert!(s.delegate_draining(&a).expect("state"));
        assert!(s.delegate_draining(&a).expect("asked again"));
        s.heartbeat("tok", &a, &hb(DelegateState::Running), 6)
            .expect("drain ends");
        assert!(!s.delegate_draining(&a).expect("state"));
        assert_eq!(leased(s, &a, 1, 7), ["t_1"]);
        assert!(leased(s, &a, 1, 8).is_empty(), "nothing queued");
        s.heartbeat("tok", &a, &hb(DelegateState::Stopping), 9)
            .expect("stopping");
        assert!(
            s.delegate_draining(&a).expect("state"),
            "the look before the stop does not answer for after it"
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
    let Some(pg) = shared_postgres() else {
        return;
    };
    let url = fresh_database(&pg);
    let n1 = open_pg(&url);
    let n2 = open_pg(&url); // the migrations are applied already
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
    use delegate_protocol::TaskAttempt;
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
    let Some(pg) = shared_postgres() else {
        return;
    };
    let s = open_pg(&fresh_database(&pg));
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

/// Nodes whose wall clocks disagree must not disagree about leases: a node whose clock
/// runs an hour behind must not grant leases that lapsed already, nor a node an hour ahead
/// reap a lease another node granted a moment before (the task would run twice). Both
/// take the time from PostgreSQL, whatever their own clocks say.
#[test]
fn nodes_with_skewed_clocks_agree_on_leases_because_the_database_keeps_the_time() {
    const HOUR: i64 = 3_600_000;
    let Some(pg) = shared_postgres() else {
        return;
    };
    let url = fresh_database(&pg);
    let behind = Store::open_postgres(&url, TTL).expect("node behind");
    let ahead = Store::open_postgres(&url, TTL).expect("node ahead");
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

// ---- the store's rules, each on both backends ----------------------------------------

#[test]
fn tokens_duplicate_empty_and_revoked() {
    on_both(|s| {
        assert!(matches!(
            s.create_token("tok", "x", None, 1),
            Err(StoreError::TokenExists(_))
        ));
        assert!(matches!(
            s.create_token(" ", "y", None, 1),
            Err(StoreError::Invalid(_))
        ));
        let h = auth::hash_token("dlg_a");
        assert_eq!(s.token_name(&h).expect("q").as_deref(), Some("tok"));
        s.revoke_token("tok", 5).expect("revoke");
        s.revoke_token("tok", 6).expect("revoke twice");
        assert_eq!(s.token_name(&h).expect("q"), None);
        assert!(matches!(
            s.revoke_token("nope", 1),
            Err(StoreError::TokenNotFound(_))
        ));
        let list = s.list_tokens().expect("list");
        assert_eq!(list.len(), 2);
        assert!(list.iter().any(|t| t.name == "tok" && t.revoked));
    });
}

#[test]
fn claim_is_atomic_and_oldest_first() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        let b = s.register("tok", &reg("b", &[]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 0), 10);
        submit(s, "t_2", shell(&[], 0), 20);
        let got_a = s.acquire("tok", &a, 1, 30, None).expect("acquire");
        assert_eq!(got_a.tasks.len(), 1);
        assert_eq!(got_a.tasks[0].task_id, "t_1");
        assert_eq!(got_a.tasks[0].attempt, 1);
        let got_b = s.acquire("tok", &b, 5, 30, None).expect("acquire");
        assert_eq!(got_b.tasks.len(), 1);
        assert_eq!(got_b.tasks[0].task_id, "t_2");
        assert!(
            s.acquire("tok", &a, 5, 30, None)
                .expect("acquire")
                .tasks
                .is_empty()
        );
        let v = s.task("t_1").expect("view");
        assert_eq!(v.state, TaskState::Assigned);
        assert_eq!(v.delegate_name.as_deref(), Some("a"));
        assert_eq!(v.assigned_at, Some(30));
    });
}

#[test]
fn claim_from_many_threads_hands_each_task_out_once() {
    on_both(|s| {
        for i in 0..50 {
            submit(s, &format!("t_{i:03}"), shell(&[], 0), i);
        }
        let ids: Vec<String> = (0..4)
            .map(|n| {
                s.register("tok", &reg(&format!("d{n}"), &[]), 0)
                    .expect("reg")
            })
            .collect();
        let mut all: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = ids
                .iter()
                .map(|id| {
                    scope.spawn(move || {
                        let mut mine = Vec::new();
                        loop {
                            let got = s.acquire("tok", id, 3, 100, None).expect("acquire");
                            if got.tasks.is_empty() {
                                return mine;
                            }
                            mine.extend(got.tasks.into_iter().map(|a| a.task_id));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        all.sort();
        let before = all.len();
        all.dedup();
        assert_eq!(before, 50);
        assert_eq!(all.len(), 50);
    });
}

#[test]
fn selectors_must_all_be_among_the_tags() {
    on_both(|s| {
        let plain = s
            .register("tok", &reg("plain", &["linux"]), 0)
            .expect("reg");
        let gpu = s
            .register("tok", &reg("gpu", &["linux", "gpu"]), 0)
            .expect("reg");
        submit(s, "t_gpu", shell(&["linux", "gpu"], 0), 1);
        submit(s, "t_any", shell(&[], 0), 2);
        let got = s.acquire("tok", &plain, 5, 3, None).expect("acquire");
        let ids: Vec<_> = got.tasks.iter().map(|a| a.task_id.as_str()).collect();
        assert_eq!(ids, ["t_any"]);
        let got = s.acquire("tok", &gpu, 5, 3, None).expect("acquire");
        assert_eq!(got.tasks[0].task_id, "t_gpu");
    });
}

#[test]
fn draining_delegate_gets_cancellations_but_no_new_tasks() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 0), 0);
        s.acquire("tok", &a, 1, 0, None).expect("acquire");
        submit(s, "t_2", shell(&[], 0), 1);
        let hb = HeartbeatRequest {
            state: DelegateState::Draining,
            in_flight: vec!["t_1".into()],
            ..Default::default()
        };
        s.heartbeat("tok", &a, &hb, 2).expect("hb");
        assert!(s.delegate_draining(&a).expect("state"));
        s.cancel("t_1", 3).expect("cancel");
        let got = s.acquire("tok", &a, 5, 4, None).expect("acquire");
        assert!(got.tasks.is_empty());
        assert_eq!(got.cancel, ["t_1"]);
        assert_eq!(s.task("t_2").expect("view").state, TaskState::Queued);
    });
}

#[test]
fn delegate_id_with_another_token_is_not_found() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        assert!(matches!(
            s.acquire("other", &a, 1, 1, None),
            Err(StoreError::DelegateNotFound(_))
        ));
        let hb = HeartbeatRequest {
            state: DelegateState::Running,
            in_flight: vec![],
            ..Default::default()
        };
        assert!(matches!(
            s.heartbeat("other", &a, &hb, 1),
            Err(StoreError::DelegateNotFound(_))
        ));
    });
}

#[test]
fn lapsed_lease_requeues_then_loses() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 1), 0);
        s.acquire("tok", &a, 1, 1000, None).expect("acquire");
        s.started("tok", "t_1", 1, 1001).expect("started");
        // Still inside the lease: nothing happens.
        assert!(!s.reap(1000 + 29_000).expect("reap").any());
        let r = s.reap(1000 + 31_000).expect("reap");
        assert_eq!(r.requeued, 1);
        let v = s.task("t_1").expect("view");
        assert_eq!(v.state, TaskState::Queued);
        assert_eq!(v.attempt, 2);
        assert_eq!(v.delegate_id, None);
        assert_eq!(
            v.message.as_deref(),
            Some("lease lapsed on delegate a; re-queued (attempt 2)")
        );
        // The old attempt's reports are refused now.
        assert!(matches!(
            s.append_log("tok", "t_1", 1, 0, b"x"),
            Err(StoreError::StaleAttempt { .. })
        ));
        let got = s.acquire("tok", &a, 1, 40_000, None).expect("acquire");
        assert_eq!(got.tasks[0].attempt, 2);
        let r = s.reap(40_000 + 31_000).expect("reap");
        assert_eq!(r.lost, 1);
        assert_eq!(s.task("t_1").expect("view").state, TaskState::Lost);
    });
}

#[test]
fn heartbeat_renews_leases_and_reports_cancel_and_revoked() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 0), 0);
        submit(s, "t_2", shell(&[], 0), 1);
        s.acquire("tok", &a, 2, 0, None).expect("acquire");
        s.cancel("t_2", 5).expect("cancel");
        let hb = HeartbeatRequest {
            state: DelegateState::Running,
            in_flight: vec!["t_1".into(), "t_2".into(), "t_gone".into()],
            ..Default::default()
        };
        let resp = s.heartbeat("tok", &a, &hb, 25_000).expect("hb");
        assert_eq!(resp.cancel, ["t_2"]);
        assert_eq!(resp.revoked, ["t_gone"]);
        // Renewed at 25 s: alive at 50 s, gone after 55 s.
        assert!(!s.reap(50_000).expect("reap").any());
        let r = s.reap(56_000).expect("reap");
        assert_eq!((r.lost, r.cancelled), (1, 1));
        assert_eq!(s.task("t_2").expect("view").state, TaskState::Cancelled);
    });
}

#[test]
fn heartbeat_with_attempts_renews_the_current_attempt_and_revokes_only_the_old_one() {
    use delegate_protocol::TaskAttempt;
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 1), 0);
        s.acquire("tok", &a, 1, 0, None).expect("acquire attempt 1");
        // Attempt 1's lease lapses; the task is re-queued and leased again to the same
        // delegate, which still holds attempt 1 as well.
        let r = s.reap(31_000).expect("reap");
        assert_eq!(r.requeued, 1, "{r:?}");
        let got = s
            .acquire("tok", &a, 1, 31_000, None)
            .expect("acquire attempt 2");
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
        assert!(resp.revoked.is_empty(), "no id-wide revoke: {resp:?}");
        // Attempt 2's lease was renewed at 40 s: alive at 65 s.
        assert!(!s.reap(65_000).expect("reap").any());
        assert_eq!(s.task("t_1").expect("view").attempt, 2);
    });
}

#[test]
fn logs_are_stored_once_and_gaps_refused() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 0), 0);
        s.acquire("tok", &a, 1, 0, None).expect("acquire");
        assert_eq!(s.append_log("tok", "t_1", 1, 0, b"hello ").expect("log"), 6);
        // Resend of the same range: stored once.
        assert_eq!(s.append_log("tok", "t_1", 1, 0, b"hello ").expect("log"), 6);
        // Overlap: only the new part is kept.
        assert_eq!(
            s.append_log("tok", "t_1", 1, 3, b"lo world").expect("log"),
            11
        );
        match s.append_log("tok", "t_1", 1, 20, b"x") {
            Err(StoreError::LogGap { expected: 11, .. }) => {}
            other => panic!("expected a gap, got {other:?}"),
        }
        assert!(matches!(
            s.append_log("other", "t_1", 1, 11, b"x"),
            Err(StoreError::StaleAttempt { .. })
        ));
        assert_eq!(
            s.read_log("t_1", 0, usize::MAX).expect("read").data,
            b"hello world"
        );
        assert_eq!(s.read_log("t_1", 4, 3).expect("read").data, b"o w");
        assert_eq!(s.read_log("t_1", 8, 100).expect("read").data, b"rld");
        // Regression: an unbounded read from inside a chunk overflowed `skip + room`.
        assert_eq!(
            s.read_log("t_1", 2, usize::MAX).expect("read").data,
            b"llo world"
        );
        assert!(s.read_log("t_1", 11, 100).expect("read").data.is_empty());
        // Logs of the same attempt are still accepted after the result.
        s.finish("tok", "t_1", 1, &result(Outcome::Succeeded, Some(0)), 5)
            .expect("finish");
        assert_eq!(s.append_log("tok", "t_1", 1, 11, b"!").expect("log"), 12);
        assert_eq!(s.task("t_1").expect("view").log_bytes, 12);
    });
}

#[test]
fn result_is_idempotent_and_a_different_one_conflicts() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 0), 0);
        s.acquire("tok", &a, 1, 0, None).expect("acquire");
        assert!(matches!(
            s.finish("tok", "t_1", 2, &result(Outcome::Failed, Some(1)), 1),
            Err(StoreError::StaleAttempt { .. })
        ));
        let (v, f) = s
            .finish("tok", "t_1", 1, &result(Outcome::Failed, Some(3)), 7)
            .expect("finish");
        assert_eq!(
            (v.state, v.exit_code, v.finished_at),
            (TaskState::Failed, Some(3), Some(7))
        );
        assert_eq!(f, Finish::Done);
        s.finish("tok", "t_1", 1, &result(Outcome::Failed, Some(3)), 8)
            .expect("same result again");
        assert!(matches!(
            s.finish("tok", "t_1", 1, &result(Outcome::Succeeded, Some(0)), 9),
            Err(StoreError::ResultConflict { .. })
        ));
        assert_eq!(s.task("t_1").expect("view").finished_at, Some(7));
    });
}

#[test]
fn lost_result_requeues_while_retries_last() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 1), 0);
        s.acquire("tok", &a, 1, 0, None).expect("acquire");
        let (v, f) = s
            .finish("tok", "t_1", 1, &result(Outcome::Lost, None), 1)
            .expect("finish");
        assert_eq!(
            (v.state, v.attempt, f),
            (TaskState::Queued, 2, Finish::Requeued)
        );
        s.acquire("tok", &a, 1, 2, None).expect("acquire");
        let (v, f) = s
            .finish("tok", "t_1", 2, &result(Outcome::Lost, None), 3)
            .expect("finish");
        assert_eq!((v.state, v.attempt, f), (TaskState::Lost, 2, Finish::Done));
    });
}

#[test]
fn started_moves_to_running_once() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 0), 0);
        assert!(matches!(
            s.started("tok", "t_1", 1, 1),
            Err(StoreError::StaleAttempt { .. })
        ));
        s.acquire("tok", &a, 1, 1, None).expect("acquire");
        let v = s.started("tok", "t_1", 1, 2).expect("started");
        assert_eq!((v.state, v.started_at), (TaskState::Running, Some(2)));
        let v = s.started("tok", "t_1", 1, 3).expect("again");
        assert_eq!(v.started_at, Some(2));
    });
}

#[test]
fn cancel_paths() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(s, "t_q", shell(&[], 0), 0);
        let (v, c) = s.cancel("t_q", 1).expect("cancel queued");
        assert_eq!((v.state, c), (TaskState::Cancelled, Cancel::Cancelled));
        assert!(matches!(
            s.cancel("t_q", 2),
            Err(StoreError::Finished {
                state: TaskState::Cancelled,
                ..
            })
        ));
        submit(s, "t_r", shell(&[], 0), 3);
        s.acquire("tok", &a, 1, 3, None).expect("acquire");
        let (v, c) = s.cancel("t_r", 4).expect("cancel held");
        assert_eq!(
            (v.state, v.cancel_requested, c),
            (TaskState::Assigned, true, Cancel::Requested)
        );
        // Delivered once through acquire, then not again.
        assert_eq!(
            s.acquire("tok", &a, 0, 5, None).expect("acquire").cancel,
            ["t_r"]
        );
        assert!(
            s.acquire("tok", &a, 0, 6, None)
                .expect("acquire")
                .cancel
                .is_empty()
        );
        let r = TaskResult {
            signal: Some(15),
            ..result(Outcome::Cancelled, None)
        };
        let (v, _) = s.finish("tok", "t_r", 1, &r, 7).expect("finish");
        assert_eq!((v.state, v.signal), (TaskState::Cancelled, Some(15)));
        assert!(matches!(
            s.finish("tok", "t_q", 1, &r, 8),
            Err(StoreError::StaleAttempt { .. })
        ));
    });
}

#[test]
fn reregister_keeps_id_and_tasks() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &["x"]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 0), 0);
        s.acquire("tok", &a, 1, 0, None).expect("acquire");
        s.started("tok", "t_1", 1, 1).expect("started");
        let again = s
            .register("tok", &reg("a", &["x", "y"]), 10)
            .expect("re-reg");
        assert_eq!(again, a);
        let v = s.task("t_1").expect("view");
        assert_eq!(
            (v.state, v.delegate_id.as_deref()),
            (TaskState::Running, Some(a.as_str()))
        );
        let ds = s.list_delegates(10).expect("list");
        assert_eq!(ds.len(), 1);
        assert_eq!(ds[0].tags, ["x", "y"]);
        assert_eq!(ds[0].in_flight, 1);
        assert!(ds[0].connected);
        assert!(!s.list_delegates(10 + 31_000).expect("list")[0].connected);
    });
}

#[test]
fn another_token_cannot_take_over_a_registered_name() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 0), 0);
        s.acquire("tok", &a, 1, 0, None).expect("acquire");
        match s.register("other", &reg("a", &[]), 1) {
            Err(StoreError::NameTaken { owner, .. }) => assert_eq!(owner, "tok"),
            other => panic!("expected name_taken, got {other:?}"),
        }
        // The victim keeps its id and its task.
        assert_eq!(s.task("t_1").expect("view").delegate_id, Some(a.clone()));
        assert_eq!(s.register("tok", &reg("a", &[]), 2).expect("re-reg"), a);
    });
}

#[test]
fn forget_frees_the_name_and_releases_its_tasks() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 1), 0);
        s.acquire("tok", &a, 1, 0, None).expect("acquire");
        assert!(matches!(
            s.forget_delegate("nope", None, 1),
            Err(StoreError::NoSuchDelegate { .. })
        ));
        let gone = s.forget_delegate("a", None, 1).expect("forget");
        assert_eq!((gone.id.as_str(), gone.released_tasks), (a.as_str(), 1));
        let v = s.task("t_1").expect("view");
        assert_eq!((v.state, v.attempt), (TaskState::Queued, 2));
        let b = s.register("other", &reg("a", &[]), 2).expect("free now");
        assert_ne!(b, a);
        // The old id is gone for its token too.
        assert!(matches!(
            s.acquire("tok", &a, 1, 3, None),
            Err(StoreError::DelegateNotFound(_))
        ));
    });
}

#[test]
fn forget_needs_the_host_when_the_name_is_on_several() {
    on_both(|s| {
        s.register("tok", &reg("a", &[]), 0).expect("reg");
        let other_host = RegisterRequest {
            hostname: "host2".into(),
            ..reg("a", &[])
        };
        s.register("tok", &other_host, 0).expect("reg");
        assert!(matches!(
            s.forget_delegate("a", None, 1),
            Err(StoreError::AmbiguousDelegate { .. })
        ));
        let gone = s.forget_delegate("a", Some("host2"), 1).expect("forget");
        assert_eq!(gone.hostname, "host2");
    });
}

#[test]
fn revoking_a_token_frees_its_names() {
    on_both(|s| {
        s.register("tok", &reg("a", &[]), 0).expect("reg");
        s.revoke_token("tok", 1).expect("revoke");
        assert!(s.list_delegates(1).expect("list").is_empty());
        s.register("other", &reg("a", &[]), 2).expect("free now");
        assert!(matches!(
            s.register("tok", &reg("b", &[]), 3),
            Err(StoreError::TokenRevoked(_))
        ));
    });
}

#[test]
fn a_token_with_tags_registers_only_those() {
    on_both(|s| {
        let tags = vec!["linux".to_string(), "eu".to_string()];
        s.create_token("tagged", &auth::hash_token("dlg_c"), Some(&tags), 0)
            .expect("token");
        match s.register("tagged", &reg("a", &["linux", "gpu"]), 1) {
            Err(StoreError::TagsNotAllowed {
                refused, allowed, ..
            }) => {
                assert_eq!(refused, ["gpu"]);
                assert_eq!(allowed, tags);
            }
            other => panic!("expected tags_not_allowed, got {other:?}"),
        }
        s.register("tagged", &reg("a", &["linux"]), 2)
            .expect("allowed tags");
        s.register("tok", &reg("b", &["anything"]), 2)
            .expect("a token without tags allows any");
        let listed = s.list_tokens().expect("list");
        let t = listed.iter().find(|t| t.name == "tagged").expect("listed");
        assert_eq!(t.tags.as_ref(), Some(&tags));
        assert!(matches!(
            s.create_token("bad", "h", Some(&["a b".to_string()]), 0),
            Err(StoreError::Invalid(_))
        ));
    });
}

#[test]
fn a_log_is_cut_at_the_cap_and_prune_deletes_old_finished_tasks() {
    on_both_capped(10, |s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 0), 0);
        submit(s, "t_2", shell(&[], 0), 0);
        s.acquire("tok", &a, 2, 0, None).expect("acquire");
        assert_eq!(
            s.append_log("tok", "t_1", 1, 0, b"0123456").expect("log"),
            7
        );
        assert_eq!(
            s.append_log("tok", "t_1", 1, 7, b"789abc").expect("log"),
            13
        );
        assert_eq!(s.append_log("tok", "t_1", 1, 13, b"def").expect("log"), 16);
        let log = s.read_log("t_1", 0, usize::MAX).expect("read").data;
        let text = String::from_utf8_lossy(&log);
        assert!(
            text.starts_with("0123456789\n[delegate-manager] log truncated"),
            "{text}"
        );
        let v = s.task("t_1").expect("view");
        assert!(v.log_truncated);
        assert_eq!(v.log_bytes, log.len() as u64);
        s.finish("tok", "t_1", 1, &result(Outcome::Succeeded, Some(0)), 100)
            .expect("finish");
        s.finish("tok", "t_2", 1, &result(Outcome::Succeeded, Some(0)), 200)
            .expect("finish");
        submit(s, "t_3", shell(&["nobody"], 0), 0);
        assert_eq!(
            s.prune(150).expect("prune"),
            Pruned {
                tasks: 1,
                log_bytes: log.len() as u64
            }
        );
        assert!(matches!(s.task("t_1"), Err(StoreError::TaskNotFound(_))));
        assert!(matches!(
            s.read_log("t_1", 0, 10),
            Err(StoreError::TaskNotFound(_))
        ));
        assert_eq!(s.task("t_2").expect("kept").state, TaskState::Succeeded);
        assert_eq!(s.task("t_3").expect("queued kept").state, TaskState::Queued);
    });
}

#[test]
fn startup_extends_leases() {
    on_both(|s| {
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(s, "t_1", shell(&[], 0), 0);
        s.acquire("tok", &a, 1, 0, None).expect("acquire");
        // Manager was down for an hour; at startup leases are extended.
        assert_eq!(s.extend_leases(3_600_000).expect("extend"), 1);
        assert!(!s.reap(3_600_001).expect("reap").any());
    });
}

#[test]
fn task_list_is_newest_first_and_filters() {
    on_both(|s| {
        submit(s, "t_1", shell(&[], 0), 1);
        submit(s, "t_2", shell(&[], 0), 2);
        s.cancel("t_1", 3).expect("cancel");
        let all: Vec<_> = s
            .list_tasks(None, 10)
            .expect("list")
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(all, ["t_2", "t_1"]);
        let q = s.list_tasks(Some(TaskState::Queued), 10).expect("list");
        assert_eq!(q.len(), 1);
        assert_eq!(s.list_tasks(None, 1).expect("list").len(), 1);
    });
}

/// The task the hub handed a poll is leased first, then the oldest the delegate may take;
/// a hand-off the delegate may not take leases nothing and stays queued. (SQLite's queue
/// index, which also says a hand-off again, has a unit test of its own.)
#[test]
fn a_handed_task_is_leased_first_and_one_it_may_not_take_stays_queued() {
    on_both(|s| {
        submit(s, "t_old", shell(&[], 0), 1);
        submit(s, "t_gpu", shell(&["gpu"], 0), 2);
        submit(s, "t_new", shell(&[], 0), 3);
        let a = s.register("tok", &reg("a", &[]), 4).expect("reg");
        let got = s.acquire("tok", &a, 2, 5, Some("t_new")).expect("acquire");
        let ids: Vec<_> = got.tasks.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["t_new", "t_old"]);
        let got = s.acquire("tok", &a, 1, 6, Some("t_gpu")).expect("acquire");
        assert!(got.tasks.is_empty(), "{got:?}");
        assert_eq!(s.task("t_gpu").expect("view").state, TaskState::Queued);
    });
}

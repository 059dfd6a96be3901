//! Scale-out against the real broker: standby replicas (a takeover restores only the changelog's
//! tail; a standby never writes; a standby whose changelog was recreated rebuilds), a graceful
//! hand-over on SIGTERM well before the session timeout, and a static member that gets its tasks
//! back when started again with its instance id.

mod common;

use std::time::{Duration, Instant};

use common::saga_env::{Reply, SagaEnv};
use common::{http_get, poll_until, BinProcess};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(90);

fn ready(addr: &str) -> Value {
    let (_, body) = http_get(&format!("http://{addr}/ready"));
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

fn running(addr: &str) -> u64 {
    ready(addr)["running_tasks"].as_u64().unwrap_or(0)
}

/// The standby lag `/ready` shows for `partition`, if this instance keeps that standby.
fn standby_lag(addr: &str, partition: i32) -> Option<i64> {
    ready(addr)["standby_lag"][partition.to_string()].as_i64()
}

fn metric_sum(addr: &str, name: &str) -> f64 {
    let (_, metrics) = http_get(&format!("http://{addr}/metrics"));
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// The `restore finished` log lines of the saga store: (from_checkpoint, records).
fn restores(process: &BinProcess) -> Vec<(Option<i64>, u64)> {
    process
        .log_lines()
        .iter()
        .filter(|l| l["message"] == "restore finished" && l["store"] == "sagas")
        .map(|l| {
            let from = l["from_checkpoint"]
                .as_str()
                .and_then(|s| s.strip_prefix("Some(")?.strip_suffix(')')?.parse().ok());
            (from, l["records"].as_u64().unwrap_or(0))
        })
        .collect()
}

/// The partitions an instance's log says it started tasks for.
fn tasks_started(process: &BinProcess) -> Vec<i64> {
    process
        .log_lines()
        .iter()
        .filter(|l| l["message"] == "task running")
        .filter_map(|l| l["task"].as_i64())
        .collect()
}

fn start_orders(env: &mut SagaEnv, prefix: &str, n: usize) -> Vec<String> {
    let orders: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for order in &orders {
        env.create(order, &[]);
    }
    let command = env.def.steps[0].command.event_type.clone();
    let wanted = orders.clone();
    env.wait(&format!("{command} for every {prefix} order"), move |env| {
        wanted.iter().all(|o| env.count(o, &command) == 1)
    });
    orders
}

/// One standby, failure detected after 6 s; steps wait long enough for the test's replies.
const FAST_FAILOVER: [&str; 10] = [
    "--standby-replicas",
    "1",
    "--session-timeout",
    "6s",
    "--heartbeat-interval",
    "1s",
    "--step-timeout",
    "payment=10m",
    "--step-timeout",
    "inventory=10m",
];

/// Two instances with one partition: waits until one runs the task and the other keeps its
/// standby (the broker's assignor may move the task once when the second joins); returns
/// (active, standby) as indexes into `addrs`.
fn settle(addrs: [&str; 2]) -> (usize, usize) {
    let mut roles = None;
    let mut since = Instant::now();
    let settled = poll_until(LIMIT, || {
        let joined = addrs
            .iter()
            .all(|a| ready(a)["joined"] == true && ready(a)["warming_up"] == false);
        let now = match (running(addrs[0]), running(addrs[1])) {
            (1, 0) if joined && standby_lag(addrs[1], 0).is_some() => Some((0, 1)),
            (0, 1) if joined && standby_lag(addrs[0], 0).is_some() => Some((1, 0)),
            _ => None,
        };
        if now != roles {
            roles = now;
            since = Instant::now();
        }
        // The same roles for a few heartbeats: the assignment has settled.
        roles.is_some() && since.elapsed() >= Duration::from_secs(3)
    });
    assert!(
        settled,
        "no active/standby pair: {} / {}",
        ready(addrs[0]),
        ready(addrs[1])
    );
    let (active, standby) = roles.unwrap_or_default();
    assert_eq!(
        ready(addrs[active])["standby_lag"]
            .as_object()
            .map(|o| o.len()),
        Some(0),
        "the active instance keeps a standby of its own task"
    );
    (active, standby)
}

/// What an instance has written so far: transactions and records produced.
fn writes(addr: &str) -> (f64, f64) {
    (
        metric_sum(addr, "saga_streams_transactions_total"),
        metric_sum(addr, "saga_streams_records_produced_total"),
    )
}

#[test]
fn a_standby_takes_over_after_sigkill_restoring_only_the_tail_and_never_writes_before() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let mut procs = [
        env.orchestrator("a", &FAST_FAILOVER),
        env.orchestrator("b", &FAST_FAILOVER),
    ];
    let addrs = [procs[0].http_addr(LIMIT), procs[1].http_addr(LIMIT)];
    let (active, standby) = settle([&addrs[0], &addrs[1]]);
    let before = writes(&addrs[standby]);

    let orders = start_orders(&mut env, "warm", 300);
    assert!(
        poll_until(LIMIT, || standby_lag(&addrs[standby], 0) == Some(0)),
        "the standby did not catch up: {}",
        ready(&addrs[standby])
    );
    assert_eq!(running(&addrs[standby]), 0);
    assert_eq!(running(&addrs[active]), 1);
    // While the active processed 300 orders, the standby wrote nothing.
    assert_eq!(writes(&addrs[standby]), before);
    assert!(metric_sum(&addrs[active], "saga_streams_records_produced_total") >= 300.0);

    procs[active].sigkill();
    let killed = Instant::now();
    assert!(
        poll_until(LIMIT, || running(&addrs[standby]) == 1),
        "the standby never took the task over:\n{}",
        procs[standby].log_text()
    );
    let took = killed.elapsed();
    let restored = restores(&procs[standby]);
    let Some(&(from, records)) = restored.last() else {
        panic!("no restore: {}", procs[standby].log_text())
    };
    assert!(
        from.is_some_and(|c| c >= 300),
        "the takeover did not start from the standby's checkpoint: {restored:?}"
    );
    assert!(
        records < 10,
        "the takeover replayed {records} records, not only the tail: {restored:?}"
    );
    eprintln!("takeover after {took:?}, restored {records} records from {from:?}");

    // The state is whole: every saga goes on, exactly once.
    for order in &orders {
        env.reply(0, Reply::Success, order);
    }
    let next = env.def.steps[1].command.event_type.clone();
    let wanted = orders.clone();
    env.wait("the next command for every order", move |env| {
        wanted.iter().all(|o| env.count(o, &next) >= 1)
    });
    let first = env.def.steps[0].command.event_type.clone();
    for order in &orders {
        assert_eq!(
            env.count(order, &first),
            1,
            "{order}: {:?}",
            env.trail(order)
        );
        assert_eq!(
            env.count(order, &env.def.steps[1].command.event_type),
            1,
            "{order}: {:?}",
            env.trail(order)
        );
    }
    procs[standby].assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_whose_changelog_was_recreated_rebuilds_its_copy() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let mut procs = [
        env.orchestrator("a", &FAST_FAILOVER),
        env.orchestrator("b", &FAST_FAILOVER),
    ];
    let addrs = [procs[0].http_addr(LIMIT), procs[1].http_addr(LIMIT)];
    let (_, standby) = settle([&addrs[0], &addrs[1]]);
    let old = start_orders(&mut env, "old", 20);
    assert!(
        poll_until(LIMIT, || standby_lag(&addrs[standby], 0) == Some(0)),
        "{}",
        ready(&addrs[standby])
    );
    for p in &mut procs {
        p.sigterm(Duration::from_secs(30)).expect("stops");
    }

    // The changelog is deleted; the next start creates it again, empty.
    let changelog = format!("{}order_saga-sagas-changelog", env.prefix);
    let admin = common::admin(&env.bootstrap);
    for result in admin
        .delete_topics(&[changelog.as_str()], &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap()
    {
        result.unwrap();
    }
    assert!(poll_until(Duration::from_secs(60), || {
        common::topic_names(&env.bootstrap).is_some_and(|t| !t.contains(&changelog))
    }));

    // Started again with their state directories under new instance ids (fresh log files).
    for (old_id, new_id) in [("a", "a2"), ("b", "b2")] {
        std::fs::rename(env.state_dir(old_id), env.state_dir(new_id)).unwrap();
    }
    let mut procs = [
        env.orchestrator("a2", &FAST_FAILOVER),
        env.orchestrator("b2", &FAST_FAILOVER),
    ];
    let addrs = [procs[0].http_addr(LIMIT), procs[1].http_addr(LIMIT)];
    let (active, standby) = settle([&addrs[0], &addrs[1]]);
    // More than before the deletion: the new changelog's end passes the old checkpoints, so a
    // copy that was not rebuilt could not be told from a current one by its offsets.
    let new = start_orders(&mut env, "new", 60);
    assert!(
        poll_until(LIMIT, || standby_lag(&addrs[standby], 0) == Some(0)),
        "{}",
        ready(&addrs[standby])
    );
    // Whichever instance kept a standby at its start found its copy from another history.
    assert!(
        procs.iter().any(|p| p
            .log_text()
            .contains("standby checkpoint outside the changelog")),
        "{}\n{}",
        procs[0].log_text(),
        procs[1].log_text()
    );
    let (code, _) = http_get(&format!("http://{}/sagas/{}", addrs[active], old[0]));
    assert_eq!(code, 404);

    procs[active].sigkill();
    assert!(
        poll_until(LIMIT, || running(&addrs[standby]) == 1),
        "{}",
        procs[standby].log_text()
    );
    // The copy holds the new history only: the sagas of the deleted changelog are gone from it.
    let (code, _) = http_get(&format!("http://{}/sagas/{}", addrs[standby], new[0]));
    assert_eq!(code, 200);
    let (code, body) = http_get(&format!("http://{}/sagas/{}", addrs[standby], old[0]));
    assert_eq!(code, 404, "{body}");
    let restored = restores(&procs[standby]);
    assert!(
        restored
            .last()
            .is_some_and(|(from, records)| from.is_some() && *records < 10),
        "{restored:?}"
    );
}

/// A standby whose writes fail (a full disk: once, or every time) stops and is tried again from
/// what it last wrote; the instance stays ready, and a task that moves to it has its whole state.
#[test]
fn a_standby_that_cannot_write_never_touches_processing() {
    for spec in ["standby-write=2*off->1*return", "standby-write=return"] {
        standby_write_failing(spec);
    }
}

fn standby_write_failing(spec: &str) {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let failing = [("SAGA_STREAMS_FAILPOINTS", spec)];
    let mut procs = [
        env.orchestrator_with_env("a", &FAST_FAILOVER, &failing),
        env.orchestrator_with_env("b", &FAST_FAILOVER, &failing),
    ];
    let addrs = [procs[0].http_addr(LIMIT), procs[1].http_addr(LIMIT)];
    assert!(
        poll_until(LIMIT, || running(&addrs[0]) + running(&addrs[1]) == 1),
        "{} / {}",
        ready(&addrs[0]),
        ready(&addrs[1])
    );
    let orders = start_orders(&mut env, "disk-full", 50);
    let failed = |p: &BinProcess| p.log_text().contains("writing a standby's changes failed");
    assert!(
        poll_until(LIMIT, || procs.iter().any(failed)),
        "no standby write failed"
    );
    for a in &addrs {
        assert_eq!(ready(a)["ready"], true, "{}", ready(a));
    }
    // The active one is killed; the other restores the task from the changelog.
    let active = if running(&addrs[0]) == 1 { 0 } else { 1 };
    let other = 1 - active;
    procs[active].sigkill();
    assert!(
        poll_until(LIMIT, || running(&addrs[other]) == 1),
        "{}",
        procs[other].log_text()
    );
    for order in &orders {
        env.reply(0, Reply::Success, order);
    }
    let next = env.def.steps[1].command.event_type.clone();
    let wanted = orders.clone();
    env.wait("the next command for every order", move |env| {
        wanted.iter().all(|o| env.count(o, &next) == 1)
    });
    procs[other].assert_alive();
}

/// A static member joining a running application first warms the task the broker will give it
/// (its share of the range assignment), so the task moves with only the changelog's tail to
/// restore, though the newcomer never ran it.
#[test]
fn a_static_newcomer_warms_its_task_before_joining_and_restores_only_the_tail() {
    let mut env = SagaEnv::new("order_saga.yaml", 2);
    let flags = [
        "--static-membership",
        "--standby-replicas",
        "1",
        "--step-timeout",
        "payment=10m",
    ];
    let mut a = env.orchestrator("a", &flags);
    let a_addr = a.http_addr(LIMIT);
    assert!(poll_until(LIMIT, || running(&a_addr) == 2));
    start_orders(&mut env, "before", 200);

    let mut b = env.orchestrator("b", &flags);
    let b_addr = b.http_addr(LIMIT);
    assert!(
        poll_until(LIMIT, || running(&a_addr) == 1 && running(&b_addr) == 1),
        "{}\n{}",
        ready(&a_addr),
        b.log_text()
    );
    let log = b.log_text();
    assert!(log.contains("warming up the partitions"), "{log}");
    assert!(log.contains("warm-up finished"), "{log}");
    // b runs partition 1 (the second half of the range), restored from its warm copy.
    assert_eq!(tasks_started(&b), [1], "{log}");
    let restored = restores(&b);
    let Some(&(from, records)) = restored.last() else {
        panic!("no restore: {log}")
    };
    assert!(
        from.is_some_and(|c| c > 0) && records < 10,
        "the newcomer restored {records} records from {from:?}: {restored:?}"
    );
    start_orders(&mut env, "after", 20);
    a.assert_alive();
    b.assert_alive();
}

#[test]
fn sigterm_hands_the_tasks_over_well_before_the_session_timeout() {
    let mut env = SagaEnv::new("order_saga.yaml", 2);
    // The broker's default session timeout (45 s) and no static membership.
    let mut a = env.orchestrator("a", &[]);
    let a_addr = a.http_addr(LIMIT);
    assert!(poll_until(LIMIT, || running(&a_addr) == 2));
    let mut b = env.orchestrator("b", &[]);
    let b_addr = b.http_addr(LIMIT);
    assert!(
        poll_until(LIMIT, || running(&a_addr) == 1 && running(&b_addr) == 1),
        "the tasks were not shared"
    );
    let stopped = Instant::now();
    a.sigterm(Duration::from_secs(20))
        .expect("a stops within 20 s");
    let handed = poll_until(Duration::from_secs(25), || running(&b_addr) == 2);
    assert!(
        handed,
        "b did not get a's task within 25 s of the SIGTERM (session timeout 45 s):\n{}",
        b.log_text()
    );
    eprintln!("hand-over took {:?}", stopped.elapsed());
    // Both partitions are processed by b.
    let orders = start_orders(&mut env, "after", 20);
    assert_eq!(orders.len(), 20);
    b.assert_alive();
}

#[test]
fn a_static_member_started_again_with_its_id_gets_its_tasks_back_and_nothing_else_moves() {
    let mut env = SagaEnv::new("order_saga.yaml", 2);
    let flags = [
        "--static-membership",
        "--session-timeout",
        "6s",
        "--heartbeat-interval",
        "1s",
    ];
    let mut a = env.orchestrator("a", &flags);
    let a_addr = a.http_addr(LIMIT);
    assert!(poll_until(LIMIT, || running(&a_addr) == 2));
    let mut b = env.orchestrator("b", &flags);
    let b_addr = b.http_addr(LIMIT);
    assert!(poll_until(LIMIT, || running(&a_addr) == 1 && running(&b_addr) == 1));
    let b_tasks = tasks_started(&b);
    start_orders(&mut env, "before", 10);

    a.sigterm(Duration::from_secs(20)).expect("a stops");
    let mut a = env.orchestrator("a", &flags);
    let restarted = Instant::now();
    // The log file keeps the first run's lines: wait for the second address.
    let listening = |p: &BinProcess| {
        p.log_lines()
            .iter()
            .filter(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("http endpoints listening"))
            })
            .count()
    };
    assert!(poll_until(LIMIT, || listening(&a) == 2));
    let a_addr = a.http_addr(LIMIT);
    assert!(
        poll_until(Duration::from_secs(20), || running(&a_addr) == 1),
        "the restarted static member did not get its task back within 20 s:\n{}",
        a.log_text()
    );
    eprintln!(
        "static member running again {:?} after its start",
        restarted.elapsed()
    );
    // b never took a's task: it started only its own.
    assert_eq!(tasks_started(&b), b_tasks, "{}", b.log_text());
    // a restored its task from its local state: only the tail.
    let restored = restores(&a);
    assert!(
        restored
            .last()
            .is_some_and(|(from, records)| from.is_some() && *records < 10),
        "{restored:?}"
    );
    start_orders(&mut env, "after", 10);

    // Killed, it cannot leave: the broker refuses the new incarnation its id until the old
    // session expires (6 s here), and the instance keeps trying until then.
    a.sigkill();
    let mut a = env.orchestrator("a", &flags);
    assert!(poll_until(LIMIT, || listening(&a) == 3));
    let a_addr = a.http_addr(LIMIT);
    assert!(
        poll_until(LIMIT, || running(&a_addr) == 1),
        "the static member did not get its task back after its session expired:\n{}",
        a.log_text()
    );
    assert_eq!(running(&b_addr), 1);
    start_orders(&mut env, "killed", 10);
    a.assert_alive();
}

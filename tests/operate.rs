//! Operating sagas on a running deployment of two instances: `GET /sagas` and `sagas list`
//! across both, with filters and paging; `sagas retry|cancel|resume` through any instance, as
//! records of the control topic applied by the owning task in its transaction, exactly once even
//! when the owner is SIGKILLed with the action's outputs written but not committed.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::saga_env::{Reply, SagaEnv, LIMIT};
use common::{poll_until, BinProcess, TopicReader};
use saga_streams::saga::query::Partitioner;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_saga-streams");
const TOKEN: &str = "operator-token-7f3a";

/// `saga-streams sagas ...` against `url`: exit code, stdout, stderr.
fn sagas(args: &[&str], url: &str, token: Option<&std::path::Path>) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command.arg("sagas").args(args).args(["--url", url]);
    if let Some(token) = token {
        command.arg("--token-file").arg(token);
    }
    let out = command
        .env("RUST_LOG", "warn")
        .output()
        .expect("running saga-streams sagas");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn url(instance: &mut BinProcess) -> String {
    format!("http://{}", instance.http_addr(LIMIT))
}

/// GET `path` with the token: status, the instance that served it, body.
fn get(instance: &mut BinProcess, path: &str) -> (u16, Option<String>, Value) {
    let response = reqwest::blocking::Client::new()
        .get(format!("{}{path}", url(instance)))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(20))
        .send()
        .unwrap();
    let status = response.status().as_u16();
    let served_by = response
        .headers()
        .get("x-saga-streams-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, served_by, response.json().unwrap_or(Value::Null))
}

fn ready_with(instance: &mut BinProcess, tasks: usize) -> bool {
    let (code, body) = common::http_get(&format!("{}/ready", url(instance)));
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    code == 200 && body["assigned_tasks"] == tasks
}

/// Every saga id `sagas list ... --json --all` prints, page after page (one JSON per line).
fn listed(args: &[&str], url: &str, token: &std::path::Path) -> Vec<String> {
    let mut all = vec!["list", "--json", "--all"];
    all.extend_from_slice(args);
    let (code, out, err) = sagas(&all, url, Some(token));
    assert_eq!(code, 0, "sagas list {args:?} failed: {out}\n{err}");
    out.lines()
        .flat_map(|line| {
            let page: Value = serde_json::from_str(line).unwrap();
            assert_eq!(page["unavailable"], serde_json::json!([]), "{page}");
            page["sagas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["saga_id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn history_entries(saga: &Value, cause: &str) -> Vec<Value> {
    saga["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["cause"] == cause)
        .cloned()
        .collect()
}

#[test]
fn sagas_are_listed_and_acted_on_from_any_instance_exactly_once_across_a_kill() {
    let mut env = SagaEnv::new("order_saga.yaml", 4);
    let token = env.dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let token_arg = token.display().to_string();
    // Steps never time out during the test; b commits every 5 s, so that its outputs stay
    // uncommitted long enough to kill it between writing and committing.
    let common = [
        "--http-token-file",
        token_arg.as_str(),
        "--step-timeout",
        "payment=10m",
        "--step-timeout",
        "inventory=10m",
    ];
    let mut a = env.orchestrator("a", &common);
    let mut b_args = common.to_vec();
    b_args.extend(["--commit-interval", "5s"]);
    let mut b = env.orchestrator("b", &b_args);
    assert!(
        poll_until(LIMIT, || ready_with(&mut a, 2) && ready_with(&mut b, 2)),
        "the two instances never shared the four partitions"
    );

    let pending: Vec<String> = (0..6).map(|n| format!("p-{n}")).collect();
    for id in &pending {
        env.create(id, &[]);
    }
    let completed = ["c-0", "c-1"];
    for id in completed {
        env.complete(id);
    }
    for id in &pending {
        env.expect(id, "ProcessPayment");
    }
    let (url_a, url_b) = (url(&mut a), url(&mut b));

    // Listing: every instance lists every partition's sagas, a page at a time, each once.
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let expected_pending = sorted(pending.clone());
    let mut pages_of_two = listed(&["--status", "PENDING", "--limit", "2"], &url_a, &token);
    let unique: BTreeSet<&String> = pages_of_two.iter().collect();
    assert_eq!(
        unique.len(),
        pages_of_two.len(),
        "listed twice: {pages_of_two:?}"
    );
    pages_of_two.sort();
    assert_eq!(pages_of_two, expected_pending);
    assert_eq!(
        sorted(listed(&["--status", "COMPLETED"], &url_b, &token)),
        completed.map(String::from).to_vec()
    );
    assert_eq!(listed(&[], &url_b, &token).len(), 8);
    assert_eq!(
        sorted(listed(&["--step", "payment"], &url_a, &token)),
        expected_pending
    );
    assert!(listed(&["--older-than", "1h"], &url_a, &token).is_empty());
    // Without the token, nothing is listed.
    let (code, _, err) = sagas(&["list"], &url_a, None);
    assert_ne!(code, 0);
    assert!(err.contains("401"), "{err}");

    // Retry through the instance that does not own the saga: the same command, same event id.
    let (_, served_by, _) = get(&mut a, "/sagas/p-0");
    let other = if served_by.is_some() { &url_a } else { &url_b };
    let (code, out, err) = sagas(&["retry", "p-0", "--by", "alice"], other, Some(&token));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("applied"), "{out}");
    env.wait("the retried ProcessPayment", |env| {
        env.count("p-0", "ProcessPayment") == 2
    });
    let ids: BTreeSet<String> = env
        .of("p-0", "ProcessPayment")
        .iter()
        .map(|r| common::saga_env::body(r)["event_id"].to_string())
        .collect();
    assert_eq!(ids.len(), 1, "a retry re-sends the same event id");

    // An action that does not apply is refused, and says so.
    let (code, out, _) = sagas(
        &["cancel", "c-0", "--reason", "too late"],
        &url_b,
        Some(&token),
    );
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("refused") && out.contains("ended"), "{out}");

    // Cancel a saga b owns, waiting on inventory: accepted by a, written to the control topic,
    // applied by b, which is killed once its refund is written but (b commits every 5 s)
    // before it is committed.
    let victim = pending
        .iter()
        .skip(1)
        .find(|id| get(&mut a, &format!("/sagas/{id}")).1.as_deref() == Some("b"))
        .expect("a pending order on b's partitions")
        .clone();
    env.reply(0, Reply::Success, &victim);
    env.expect(&victim, "ReserveInventory");
    let uncommitted = TopicReader::new(
        &env.bootstrap,
        &[env.def.steps[0].command.topic.as_str()],
        "read_uncommitted",
    );
    let (code, out, err) = sagas(
        &[
            "cancel",
            &victim,
            "--reason",
            "participant bug",
            "--wait",
            "0s",
        ],
        &url_a,
        Some(&token),
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let mut seen = Vec::new();
    let deadline = Instant::now() + LIMIT;
    let refund_written = loop {
        uncommitted.drain(&mut seen, Duration::from_millis(50));
        if seen
            .iter()
            .any(|(_, _, key, value)| *key == victim && value.contains("RefundPayment"))
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    assert!(refund_written, "b never wrote the refund");
    b.sigkill();
    // Restarted with its state: its open transaction is aborted, the action applied again.
    let mut b = env.orchestrator("b", &b_args);
    env.expect(&victim, "RefundPayment");
    env.reply(0, Reply::Compensated, &victim);
    let cancelled = env.expect(&victim, "OrderCancelled");
    assert_eq!(cancelled["reason"], "manual: participant bug");
    // Whatever instance applied it, and however often its cycle ran, once: a saga of the same
    // partition run to its end after it shows everything written there before.
    let partition = Partitioner::ConsistentRandom.partition(victim.as_bytes(), 4);
    let barrier = (0..)
        .map(|n| format!("barrier-{n}"))
        .find(|id| Partitioner::ConsistentRandom.partition(id.as_bytes(), 4) == partition)
        .unwrap();
    env.complete(&barrier);
    assert_eq!(
        env.count(&victim, "RefundPayment"),
        1,
        "{:?}",
        env.trail(&victim)
    );
    assert_eq!(
        env.count(&victim, "OrderCancelled"),
        1,
        "{:?}",
        env.trail(&victim)
    );
    assert_eq!(
        env.count(&victim, "ReleaseInventory"),
        0,
        "{:?}",
        env.trail(&victim)
    );
    let mut saga = Value::Null;
    assert!(poll_until(LIMIT, || {
        saga = get(&mut b, &format!("/sagas/{victim}")).2;
        saga["status"] == "REFUNDED"
    }));
    let cancels = history_entries(&saga, "manual_cancel");
    assert_eq!(cancels.len(), 1, "{saga}");
    let note = cancels[0]["note"].as_str().unwrap();
    assert!(note.contains("participant bug"), "{note}");
    assert_eq!(saga["outcome"]["reason"], "manual: participant bug");
    let (code, out, _) = sagas(&["get", &victim], &url_a, Some(&token));
    assert_eq!(code, 0);
    assert!(
        out.contains("manual_cancel") && out.contains("REFUNDED"),
        "{out}"
    );
    // Every action is an audit event of the instance that applied it.
    let audit = format!("{}{}", a.log_text(), b.log_text());
    assert!(audit.contains("saga_action"), "no audit event");
}

#[test]
fn actions_need_the_token_and_a_saga_to_act_on() {
    let env = SagaEnv::new("order_saga.yaml", 1);
    let token = env.dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let mut open = env.orchestrator("open", &[]);
    assert!(poll_until(LIMIT, || ready_with(&mut open, 1)));
    env.create("o-1", &[]);
    let post = |url: &str, path: &str, token: Option<&str>| {
        let mut request = reqwest::blocking::Client::new()
            .post(format!("{url}{path}"))
            .json(&serde_json::json!({ "reason": "x", "by": "t" }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().unwrap_or(Value::Null),
        )
    };
    // An instance without a token takes no action from anyone.
    let url_open = url(&mut open);
    let (code, body) = post(&url_open, "/sagas/o-1/cancel", None);
    assert_eq!(code, 403, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("--http-token-file"));
    assert!(open.sigterm(Duration::from_secs(30)).is_some());

    let mut guarded = env.orchestrator("guarded", &["--http-token-file", token.to_str().unwrap()]);
    assert!(poll_until(LIMIT, || ready_with(&mut guarded, 1)));
    let url_g = url(&mut guarded);
    // Every endpoint with order data wants the token; the inspector's page holds none.
    for path in [
        "/sagas",
        "/sagas/o-1",
        "/overview",
        "/topology",
        "/dlq",
        "/quarantine",
    ] {
        let (code, body) = common::http_get(&format!("{url_g}{path}"));
        assert_eq!(code, 401, "{path}: {body}");
    }
    let page = reqwest::blocking::get(format!("{url_g}/ui")).unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let policy = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        policy.contains("default-src 'none'") && policy.contains("script-src 'self'"),
        "{policy}"
    );
    assert!(page.text().unwrap().contains("/ui/app.js"));
    assert_eq!(post(&url_g, "/dlq/x/replay", None).0, 401);
    assert_eq!(post(&url_g, "/sagas/o-1/cancel", None).0, 401);
    assert_eq!(post(&url_g, "/sagas/o-1/cancel", Some("wrong")).0, 401);
    assert_eq!(post(&url_g, "/sagas/o-1/terminate", Some(TOKEN)).0, 404);
    assert_eq!(post(&url_g, "/sagas/nobody/cancel", Some(TOKEN)).0, 404);
    // A cancel needs a reason.
    let (code, body) = {
        let response = reqwest::blocking::Client::new()
            .post(format!("{url_g}/sagas/o-1/cancel"))
            .bearer_auth(TOKEN)
            .send()
            .unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().unwrap(),
        )
    };
    assert_eq!(code, 400, "{body}");
    let mut last = (0, Value::Null);
    assert!(
        poll_until(LIMIT, || {
            last = post(&url_g, "/sagas/o-1/cancel", Some(TOKEN));
            last.0 == 202
        }),
        "{last:?}"
    );
}

#[test]
fn a_stuck_compensation_is_resumed_with_its_first_event_id() {
    let mut env = SagaEnv::new("../tests/fixtures/order_saga_retries.yaml", 1);
    let token = env.dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let mut o = env.orchestrator("o", &["--http-token-file", token.to_str().unwrap()]);
    env.create("s-1", &[]);
    env.expect("s-1", "ProcessPayment");
    env.reply(0, Reply::Success, "s-1");
    env.expect("s-1", "ReserveInventory");
    env.reply(1, Reply::Failure, "s-1");
    let first = env.expect("s-1", "RefundPayment");
    // No confirmation: the refund is sent again, then given up.
    let mut saga = Value::Null;
    assert!(
        poll_until(LIMIT, || {
            saga = get(&mut o, "/sagas/s-1").2;
            saga["status"] == "COMPENSATION_STUCK"
        }),
        "{saga}"
    );
    env.expect("s-1", "OrderCancelled");
    let sent_before = env.count("s-1", "RefundPayment");
    let url_o = url(&mut o);
    // Retry does not apply to it; resume does.
    let (code, out, _) = sagas(&["retry", "s-1"], &url_o, Some(&token));
    assert_eq!(code, 4, "{out}");
    let (code, out, err) = sagas(&["resume", "s-1", "--by", "bob"], &url_o, Some(&token));
    assert_eq!(code, 0, "{out}\n{err}");
    env.wait("the resumed refund", |env| {
        env.count("s-1", "RefundPayment") > sent_before
    });
    let refunds = env.of("s-1", "RefundPayment");
    let resumed = common::saga_env::body(refunds.last().unwrap());
    assert_eq!(resumed["event_id"], first["event_id"]);
    env.reply(0, Reply::Compensated, "s-1");
    assert!(
        poll_until(LIMIT, || {
            saga = get(&mut o, "/sagas/s-1").2;
            saga["status"] == "REFUNDED"
        }),
        "{saga}"
    );
    // One outcome only: it was emitted before the resume.
    assert_eq!(env.count("s-1", "OrderCancelled"), 1);
    let resumes = history_entries(&saga, "manual_resume");
    assert_eq!(resumes.len(), 1, "{saga}");
    assert!(resumes[0]["note"].as_str().unwrap().contains("bob"));
}

/// Partition counts of the topics whose names start with `prefix`.
fn topics_with_prefix(bootstrap: &str, prefix: &str) -> std::collections::BTreeMap<String, usize> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    metadata
        .topics()
        .iter()
        .filter(|t| t.name().starts_with(prefix) && t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len()))
        .collect()
}

/// `saga-streams <args> --bootstrap .. --topic-prefix prefix`: exit code and all output.
fn tool(args: &[&str], bootstrap: &str, prefix: &str) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .args(["--bootstrap", bootstrap, "--topic-prefix", prefix])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn topics_create_makes_what_a_topology_needs_and_run_names_it_when_topics_are_missing() {
    let bootstrap = common::kafka_bootstrap();
    let def = saga_streams::saga::SagaDefinition::load(std::path::Path::new(
        "topologies/order_saga.yaml",
    ))
    .unwrap();
    let mut wanted: BTreeSet<String> = def.input_topics().into_iter().collect();
    wanted.extend(def.output_topics());

    // Nothing there: `run` refuses and names the command that fixes it.
    let prefix = format!("{}.", common::unique("topics"));
    let (code, out) = tool(
        &["run", "--metrics-addr", "127.0.0.1:0"],
        &bootstrap,
        &prefix,
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("does not exist") && out.contains("saga-streams topics create"),
        "{out}"
    );
    // A dry run creates nothing.
    let (code, out) = tool(&["topics", "create", "--dry-run"], &bootstrap, &prefix);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.matches("would be created").count(),
        wanted.len(),
        "{out}"
    );
    assert!(topics_with_prefix(&bootstrap, &prefix).is_empty());

    // One input exists with 2 partitions: another count for the new inputs is refused...
    let start = format!("{prefix}{}", def.start_topic);
    futures::executor::block_on(common::create_topic(&bootstrap, &start, 2));
    let (code, out) = tool(
        &["topics", "create", "--partitions", "3"],
        &bootstrap,
        &prefix,
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("--partitions 3") && out.contains(": 2"),
        "{out}"
    );
    assert_eq!(topics_with_prefix(&bootstrap, &prefix).len(), 1);
    // ...and without a count the existing one is followed.
    let (code, out) = tool(&["topics", "create"], &bootstrap, &prefix);
    assert_eq!(code, 0, "{out}");
    let made = topics_with_prefix(&bootstrap, &prefix);
    let expected: BTreeSet<String> = wanted.iter().map(|t| format!("{prefix}{t}")).collect();
    assert_eq!(made.keys().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(made.values().all(|n| *n == 2), "{made:?}");
    assert_eq!(out.matches("| created").count(), wanted.len() - 1, "{out}");
    // Again: everything exists, nothing changes.
    let (code, out) = tool(
        &["topics", "create", "--partitions", "2"],
        &bootstrap,
        &prefix,
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("exists").count(), wanted.len(), "{out}");
    assert_eq!(topics_with_prefix(&bootstrap, &prefix), made);
}

/// `saga-streams dlq ...` for `env`'s topology and prefix: exit code and all output.
fn dlq(env: &SagaEnv, args: &[&str]) -> (i32, String) {
    let mut all = vec!["dlq"];
    all.extend_from_slice(args);
    let out = Command::new(BIN)
        .args(env.args(&all, &[]))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The dead letters `dlq list --json` prints for `filters`.
fn dead_letters(env: &SagaEnv, filters: &[&str]) -> Vec<Value> {
    let mut args = vec!["list", "--json"];
    args.extend_from_slice(filters);
    let (code, out) = dlq(env, &args);
    assert_eq!(code, 0, "{out}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn dead_letters_are_listed_shown_and_replayed_with_a_loop_guard() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let _o = env.orchestrator("o", &[]);
    // A payment reply before its order exists, and an order that is not JSON.
    env.reply(0, Reply::Success, "late-1");
    env.send_raw(
        &env.def.start_topic.clone(),
        Some("bad-1"),
        b"{not json",
        &[],
    );
    let mut letters = Vec::new();
    assert!(
        poll_until(LIMIT, || {
            letters = dead_letters(&env, &[]);
            letters.len() == 2
        }),
        "{letters:?}"
    );
    let late = dead_letters(&env, &["--reason", "unknown_saga"]);
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0]["saga_id"], "late-1");
    let payments = &env.def.steps[0].reply_topic.clone();
    assert_eq!(late[0]["source"]["topic"], payments.as_str());
    assert_eq!(dead_letters(&env, &["--saga-id", "bad-1"]).len(), 1);
    assert!(dead_letters(
        &env,
        &[
            "--since",
            "2000-01-01T00:00:00Z",
            "--until",
            "2000-01-02T00:00:00Z"
        ]
    )
    .is_empty());
    let (code, out) = dlq(
        &env,
        &[
            "show",
            "--topic",
            payments,
            "--partition",
            &late[0]["partition"].to_string(),
            "--offset",
            &late[0]["offset"].to_string(),
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("reason: unknown_saga") && out.contains("late-1"),
        "{out}"
    );

    // The order arrives; a dry run writes nothing, a replay lets the payment through.
    env.create("late-1", &[]);
    env.expect("late-1", "ProcessPayment");
    let keyed = |env: &SagaEnv, topic: &str, key: &str| {
        saga_streams::sim::read_to_end(&env.bootstrap, &[topic.to_string()], LIMIT)
            .unwrap()
            .into_iter()
            .filter(|r| r.key.as_deref() == Some(key.as_bytes()))
            .count()
    };
    let (code, out) = dlq(&env, &["replay", "--reason", "unknown_saga", "--dry-run"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 would be replayed"), "{out}");
    assert_eq!(keyed(&env, payments, "late-1"), 1);
    let (code, out) = dlq(&env, &["replay", "--reason", "unknown_saga"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 replayed"), "{out}");
    env.expect("late-1", "ReserveInventory");
    // A record that went through is not replayed again, unless asked; then it is a duplicate
    // to its saga.
    let (code, out) = dlq(&env, &["replay", "--reason", "unknown_saga"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("0 replayed, 1 skipped") && out.contains("replayed before"),
        "{out}"
    );
    let (code, out) = dlq(&env, &["replay", "--reason", "unknown_saga", "--again"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 replayed"), "{out}");
    env.complete("barrier-1");
    assert_eq!(env.count("late-1", "ReserveInventory"), 1);

    // The order that is not JSON fails again when replayed: the guard stops there.
    let (code, out) = dlq(&env, &["replay", "--reason", "invalid_json"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 replayed"), "{out}");
    let mut bad = Vec::new();
    assert!(
        poll_until(LIMIT, || {
            bad = dead_letters(&env, &["--reason", "invalid_json"]);
            bad.len() == 2
        }),
        "{bad:?}"
    );
    assert_eq!(bad[1]["replay_of"]["count"], 1, "{bad:?}");
    let (code, out) = dlq(&env, &["replay", "--reason", "invalid_json"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 replayed, 2 skipped"), "{out}");
    assert!(out.contains("dead-lettered again"), "{out}");
    let (code, out) = dlq(
        &env,
        &["replay", "--reason", "invalid_json", "--again", "--dry-run"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 would be replayed, 1 skipped"), "{out}");
}

#[test]
fn reset_refuses_while_instances_run_then_starts_the_application_over() {
    let mut env = SagaEnv::new("order_saga.yaml", 2);
    let mut a = env.orchestrator("a", &[]);
    for id in ["r-0", "r-1"] {
        env.complete(id);
    }
    let app = format!("{}{}", env.prefix, env.def.name);
    let changelog = format!("{app}-sagas-changelog");
    let state_dir = env.state_dir("a");
    let state_arg = state_dir.display().to_string();
    let base = env.args(
        &["reset", "--application-id", &app, "--state-dir", &state_arg],
        &[],
    );
    let reset = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args(&base)
            .args(extra)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let bootstrap = env.bootstrap.clone();
    let exists = |topic: &str| common::topic_names(&bootstrap).unwrap().contains(topic);
    // While a runs: refused, nothing changed.
    let (code, out) = reset(&[]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("active member"), "{out}");
    assert!(exists(&changelog));
    // The plan names what a reset would do.
    let (code, out) = reset(&["--dry-run", "--to-offset", "100000"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("outside"), "{out}");

    assert!(a.sigterm(Duration::from_secs(30)).is_some());
    let (code, out) = reset(&["--dry-run"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&changelog) && out.contains("nothing changed"),
        "{out}"
    );
    assert!(exists(&changelog));
    let (code, out) = reset(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(!exists(&changelog), "{out}");
    assert!(
        out.contains(&state_dir.join(&app).display().to_string()),
        "{out}"
    );

    // Started over with its state removed: every input is processed again, from the first.
    std::fs::remove_dir_all(state_dir.join(&app)).unwrap();
    let mut a = env.orchestrator("a", &[]);
    for id in ["r-0", "r-1"] {
        let id = id.to_string();
        env.wait(&format!("{id} completed again"), |env| {
            env.count(&id, "OrderCompleted") == 2
        });
    }
    assert!(exists(&changelog));

    // To a time after every record: started again, it processes only what comes next.
    assert!(a.sigterm(Duration::from_secs(30)).is_some());
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let (code, out) = reset(&["--to-datetime", &now]);
    assert_eq!(code, 0, "{out}");
    std::fs::remove_dir_all(state_dir.join(&app)).unwrap();
    let _a = env.orchestrator("a", &[]);
    // One saga run to its end on each partition: what was before it there is processed.
    for partition in 0..2 {
        let barrier = (0..)
            .map(|n| format!("after-{n}"))
            .find(|id| Partitioner::ConsistentRandom.partition(id.as_bytes(), 2) == partition)
            .unwrap();
        env.complete(&barrier);
    }
    for id in ["r-0", "r-1"] {
        assert_eq!(env.count(id, "OrderCompleted"), 2, "{id} processed again");
    }
}

#[test]
fn a_store_written_before_the_status_index_is_brought_up_to_it() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let token = env.dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let token_arg = token.display().to_string();
    let mut o = env.orchestrator("o", &["--http-token-file", &token_arg]);
    for id in ["c-0", "c-1", "c-2"] {
        env.complete(id);
    }
    for id in ["p-0", "p-1"] {
        env.create(id, &[]);
        env.expect(id, "ProcessPayment");
    }
    assert!(o.sigterm(Duration::from_secs(30)).is_some());
    // The store as an earlier build left it: no index entries, no marker (deleted from the
    // changelog, which the next start restores from).
    let app = format!("{}{}", env.prefix, env.def.name);
    let changelog = format!("{app}-sagas-changelog");
    let producer = common::producer(&env.bootstrap);
    let mut keys: Vec<Vec<u8>> = vec![b"x/indexed".to_vec()];
    for (status, ids) in [
        ("COMPLETED", &["c-0", "c-1", "c-2"][..]),
        ("PENDING", &["p-0", "p-1"][..]),
    ] {
        for id in ids {
            keys.push([b"i/", status.as_bytes(), b"\0", id.as_bytes()].concat());
        }
    }
    for key in &keys {
        use rdkafka::producer::Producer;
        producer
            .send(
                rdkafka::producer::BaseRecord::<[u8], [u8]>::to(&changelog)
                    .key(key)
                    .partition(0),
            )
            .unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();
    }
    std::fs::remove_dir_all(env.state_dir("o").join(&app)).unwrap();
    let mut o = env.orchestrator("o", &["--http-token-file", &token_arg]);
    assert!(
        poll_until(LIMIT, || o
            .log_text()
            .contains("the status index of this task's sagas is complete")),
        "no backfill:\n{}",
        o.log_text()
    );
    let mut page = Value::Null;
    assert!(
        poll_until(LIMIT, || {
            page = get(&mut o, "/sagas?status=PENDING").2;
            page["by_index"] == true && page["sagas"].as_array().is_some_and(|s| s.len() == 2)
        }),
        "{page}"
    );
    let completed = get(&mut o, "/sagas?status=COMPLETED").2;
    assert_eq!(
        completed["sagas"].as_array().map(Vec::len),
        Some(3),
        "{completed}"
    );
    assert_eq!(completed["by_index"], true);
}

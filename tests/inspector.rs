//! The saga inspector (`/ui`) in a real browser: headless Chromium driven through chromedriver
//! (`tests/fixtures/inspector_browser.py`, Selenium) against two running instances. An operator
//! enters the token, reads the overview, finds a completed order, cancels an order waiting on a
//! participant that does not answer, sees it end compensated with the manual reason and its
//! refund in the timeline, and dry-runs a dead-letter replay. Each page's screenshot is kept in
//! `<target dir>/test-artifacts/inspector/`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::saga_env::{Reply, SagaEnv, LIMIT};
use common::{poll_until, TopicReader};
use serde_json::Value;

fn artifacts() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("test-artifacts").join("inspector")
}

#[test]
fn an_operator_cancels_a_stuck_order_in_the_inspector() {
    let mut env = SagaEnv::new("order_saga.yaml", 2);
    let token = env.dir.path().join("token");
    std::fs::write(&token, "inspector-token-5e1\n").unwrap();
    let token_arg = token.display().to_string();
    let common = [
        "--http-token-file",
        token_arg.as_str(),
        "--step-timeout",
        "payment=10m",
        "--step-timeout",
        "inventory=10m",
    ];
    let mut a = env.orchestrator("a", &common);
    let _b = env.orchestrator("b", &common);
    env.complete("done-1");
    env.create("wait-1", &[]);
    env.expect("wait-1", "ProcessPayment");
    env.reply(0, Reply::Success, "wait-1");
    env.expect("wait-1", "ReserveInventory");
    // A reply for an order that does not exist: a dead letter.
    env.reply(0, Reply::Success, "ghost-1");
    let dlq_topic = format!("{}.dlq", env.def.steps[0].reply_topic);

    // The payment service confirms the refund when it comes (the inventory service never
    // answers).
    let (refund_topic, confirmation) =
        env.reply_record(0, Reply::Compensated, "wait-1", "refunded-1");
    let commands = env.def.steps[0].command.topic.clone();
    let bootstrap = env.bootstrap.clone();
    let participant = std::thread::spawn(move || {
        let reader = TopicReader::new(&bootstrap, &[commands.as_str()], "read_committed");
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            reader.drain(&mut seen, Duration::from_millis(200));
            if seen
                .iter()
                .any(|(_, _, key, value)| key == "wait-1" && value.contains("RefundPayment"))
            {
                let producer = common::producer(&bootstrap);
                use rdkafka::producer::Producer;
                producer
                    .send(
                        rdkafka::producer::BaseRecord::to(&refund_topic)
                            .key("wait-1")
                            .payload(&confirmation),
                    )
                    .unwrap();
                producer.flush(Duration::from_secs(10)).unwrap();
                return true;
            }
        }
        false
    });

    let url = format!("http://{}", a.http_addr(LIMIT));
    assert!(
        poll_until(LIMIT, || common::http_get(&format!("{url}/ready")).0 == 200),
        "a is not ready"
    );
    let out = artifacts();
    let _ = std::fs::remove_dir_all(&out);
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inspector_browser.py");
    let python = common::venv_python();
    assert!(
        python.exists(),
        "{} not found: scripts/deps installs selenium into that venv",
        python.display()
    );
    let run = Command::new(&python)
        .arg(&script)
        .args(["--url", &url, "--token-file", &token_arg])
        .args(["--completed", "done-1", "--waiting", "wait-1"])
        .args(["--compensated-state", &env.def.compensated_state])
        .args(["--dlq-topic", &dlq_topic])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running the browser test (scripts/deps installs chromium, chromium-driver and selenium)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        run.status.success(),
        "{said}\nscreenshots: {}",
        out.display()
    );
    assert!(participant.join().unwrap(), "no refund was sent");

    // What the browser saw is what the topics hold: one refund, one cancellation, the reason.
    let cancelled = env.expect("wait-1", "OrderCancelled");
    assert_eq!(cancelled["reason"], "manual: participant down");
    assert_eq!(env.count("wait-1", "RefundPayment"), 1);
    assert_eq!(env.count("wait-1", "OrderCancelled"), 1);
    for page in [
        "1-overview",
        "2-saga-completed",
        "3-sagas-waiting",
        "4-saga-waiting",
        "5-cancel-dialog",
        "6-saga-cancelled",
        "7-dead-letters",
    ] {
        let png = std::fs::read(out.join(format!("{page}.png"))).unwrap_or_default();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{page}.png"
        );
    }
    let _: Value = Value::Null;
}

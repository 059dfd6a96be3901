//! The Schema Registry stops answering while records with a schema id saga-streams has not seen
//! yet arrive: processing waits (not ready), nothing is lost, nothing is dead-lettered, and it
//! resumes when the registry is back. A test binary of its own: it pauses the shared registry.

mod common;

use std::time::{Duration, Instant};

use common::avro_env::{first_versions, repo, schema_file, AvroEnv, LIMIT, ORDER_V1, ORDER_V2};
use common::{http_get, poll_until};
use serde_json::json;

/// The registry process stopped with SIGSTOP (it keeps its port and in-memory data, and answers
/// nothing) until dropped.
struct Paused(String);

impl Paused {
    fn registry() -> Paused {
        let out = std::process::Command::new(repo("scripts/stack"))
            .args(["pid", "registry"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "no registry pid from scripts/stack: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
        signal("-STOP", &pid);
        Paused(pid)
    }
}

fn signal(which: &str, pid: &str) {
    let status = std::process::Command::new("kill")
        .args([which, pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill {which} {pid} failed");
}

impl Drop for Paused {
    fn drop(&mut self) {
        signal("-CONT", &self.0);
    }
}

fn ready(http: &str) -> (u16, String) {
    http_get(&format!("http://{http}/ready"))
}

#[test]
fn a_registry_outage_delays_processing_but_loses_and_dead_letters_nothing() {
    let mut env = AvroEnv::new(3);
    // Version 1 and version 2 of OrderCreated are registered; the orchestrator will see only
    // version 2 before the outage, so version 1's schema is not in its cache.
    let first = first_versions();
    let (ok, out) = env.schemas("register", first.path());
    assert!(ok, "{out}");
    env.register();
    let (v1_id, v2_id) = (
        env.start_subject_id(ORDER_V1),
        env.start_subject_id(ORDER_V2),
    );
    let (v1, v2) = (schema_file(ORDER_V1), schema_file(ORDER_V2));
    env.start(&[]);
    let http = env.orchestrator().http_addr(LIMIT);

    // Before: version 2 orders complete, every schema the saga writes is fetched and cached.
    let warm: Vec<String> = (0..3).map(|i| format!("warm-{i}")).collect();
    for order in &warm {
        let fields = env.order_fields(order, &[("channel", json!("app"))]);
        env.send_raw(&env.def.start_topic, order, &env.encode(&v2, v2_id, fields));
    }
    let ids = warm.clone();
    env.wait("the warm-up orders", LIMIT, move |e| {
        ids.iter().all(|o| !e.outcomes(o).is_empty())
    });
    assert!(
        poll_until(LIMIT, || ready(&http).0 == 200),
        "{:?}",
        ready(&http)
    );

    let during: Vec<String> = (0..5).map(|i| format!("during-{i}")).collect();
    {
        let _paused = Paused::registry();
        for order in &during {
            let fields = env.order_fields(order, &[]);
            env.send_raw(&env.def.start_topic, order, &env.encode(&v1, v1_id, fields));
        }
        // The orchestrator cannot read version 1 records without the registry: it reports
        // itself not ready, naming the reason.
        let mut last = (0, String::new());
        let stalled = poll_until(LIMIT, || {
            last = ready(&http);
            last.0 == 503 && last.1.contains("registry")
        });
        assert!(stalled, "never reported not ready: {last:?}");
        // Stay stopped a while longer, watching everything the saga writes.
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            env.poll();
            env.assert_alive();
        }
        for order in &during {
            assert!(
                env.outcomes(order).is_empty(),
                "{order} finished during the outage"
            );
        }
        assert!(
            env.all_dead_letters().is_empty(),
            "dead-lettered during the outage: {:?}",
            env.all_dead_letters()
        );
    }

    // After: every order completes, once, and the instance is ready again.
    let ids = during.clone();
    env.wait("the orders sent during the outage", LIMIT, move |e| {
        ids.iter().all(|o| !e.outcomes(o).is_empty())
    });
    for order in &during {
        let outcomes = env.outcomes(order);
        assert_eq!(outcomes.len(), 1, "{order}: {outcomes:?}");
        assert_eq!(outcomes[0]["event_type"], "OrderCompleted");
    }
    assert!(env.all_dead_letters().is_empty());
    let mut last = (0, String::new());
    assert!(
        poll_until(LIMIT, || {
            last = ready(&http);
            last.0 == 200
        }),
        "not ready after the outage: {last:?}"
    );
    let log = env.orchestrator().log_text();
    assert!(log.contains("processing resumed"), "{log}");
}

//! `saga-streams test`: the scenarios shipped with each topology hold, and the runner reports
//! what does not (a diff, exit 1) and what cannot be read (exit 2). No broker is involved: the
//! runner drives the real processor in process.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs `saga-streams test ARGS...`: (exit code, stdout, stderr).
fn saga_test(args: &[&Path]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_saga-streams"))
        .arg("test")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn shipped_scenarios_hold(topology: &str) {
    let dir = repo(&format!("topologies/scenarios/{topology}"));
    let files = std::fs::read_dir(&dir).unwrap().count();
    let (code, out, err) = saga_test(&[&repo(&format!("topologies/{topology}.yaml")), &dir]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("{files} scenarios: {files} passed, 0 failed")),
        "{out}"
    );
}

#[test]
fn the_order_saga_scenarios_hold() {
    shipped_scenarios_hold("order_saga");
}

#[test]
fn the_shipping_saga_scenarios_hold() {
    shipped_scenarios_hold("order_with_shipping");
}

#[test]
fn a_topology_change_that_breaks_a_scenario_fails_it_with_a_diff() {
    // The payment step times out after 10s instead of 30s: the scenario that waits 29s for the
    // payment sees the order cancelled too early.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo("topologies/order_saga.yaml")).unwrap();
    let changed = text.replacen("timeout: 30s", "timeout: 10s", 1);
    assert_ne!(changed, text);
    let topology = dir.path().join("order_saga.yaml");
    std::fs::write(&topology, changed.replace("schemas: ../schemas", "")).unwrap();
    let scenario = repo("topologies/scenarios/order_saga/payment_times_out.yaml");
    let (code, out, _) = saga_test(&[&topology, &scenario]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED"), "{out}");
    // Expected nothing at +29s; the cancellation was written.
    assert!(out.contains("at +29s: expect did not hold"), "{out}");
    assert!(
        out.lines().any(
            |l| l.trim_start().starts_with("+ OrderCancelled saga=order-1")
                && l.contains("timeout:payment")
        ),
        "{out}"
    );
    assert!(out.contains("0 passed, 1 failed"), "{out}");
}

#[test]
fn an_expectation_that_does_not_hold_is_shown_expected_against_written() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("wrong.yaml");
    std::fs::write(
        &scenario,
        "name: wrong reason\nsaga: o-9\nsteps:\n\
         - send: { event: OrderCreated, data: { total: 12 } }\n\
         - send: { event: PaymentFailed }\n\
         - expect:\n    emitted: [ProcessPayment, { event: OrderCancelled, fields: { reason: timeout } }]\n    status: COMPLETED\n",
    )
    .unwrap();
    let (code, out, _) = saga_test(&[&repo("topologies/order_saga.yaml"), &scenario]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("- OrderCancelled"), "{out}");
    assert!(out.contains("\"reason\":\"payment_failed\""), "{out}");
    assert!(out.contains("- expected: COMPLETED"), "{out}");
    assert!(out.contains("+ actual:   FAILED"), "{out}");
    // What matched is shown as such, without a sign.
    assert!(
        out.lines()
            .any(|l| l.starts_with("        ProcessPayment saga=o-9")),
        "{out}"
    );
}

#[test]
fn an_unreadable_scenario_is_named_with_its_line_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let good = repo("topologies/scenarios/order_saga/completes.yaml");
    let bad = dir.path().join("typo.yaml");
    std::fs::write(
        &bad,
        "name: typo\nsaga: o-1\nsteps:\n  - send: { event: OrderCreated }\n  - expcet: { emitted: [] }\n",
    )
    .unwrap();
    let (code, out, err) = saga_test(&[&repo("topologies/order_saga.yaml"), &good, &bad]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("typo.yaml:5: step 2"), "{err}");
    assert!(!out.contains("ok "), "{out}");
}

//! A short soak (`examples/soak.rs`, the harness behind `scripts/soak`): the order saga with
//! three orchestrator instances under load while an instance is SIGKILLed, instances freeze past
//! the step timeout and past the session timeout, and the broker is restarted and frozen; every
//! order must end with exactly one outcome and the audit must find nothing.
//!
//! A binary of its own: it restarts and freezes the broker every other test uses.

mod common;

use std::process::Command;

#[test]
fn a_short_soak_with_every_kind_of_fault_passes_its_audit() {
    let bootstrap = common::kafka_bootstrap();
    let exe = std::env::current_exe().expect("test binary path");
    let soak = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile dir")
        .join("examples/soak");
    // Every kind of fault at least once (`--cover`: kill, freeze, broker restart, broker freeze
    // first), then random ones from a fixed seed, a fault every 12 s for 150 s.
    let output = Command::new(&soak)
        .args(["--bootstrap", &bootstrap])
        .args(["--duration", "150s", "--rate", "10", "--fault-every", "12s"])
        .args(["--seed", "7", "--drain", "5m", "--cover"])
        .output()
        .expect("running the soak");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("soak: PASSED"),
        "soak failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    for fault in [
        "instance kills",
        "instance freezes",
        "broker restarts",
        "broker freezes",
    ] {
        assert!(stdout.contains(fault), "no {fault} happened:\n{stdout}");
    }
}

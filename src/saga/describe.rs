//! `saga-streams describe`: the state machine of a topology as text and as a Mermaid diagram.
//!
//! Both are derived from one list of [`Edge`]s built from the definition, the same rules the
//! machine follows (see `machine.rs`).

use std::fmt::Write;

use super::topology::{
    RetryPolicy, SagaDefinition, COMPENSATION_STUCK, COMPLETED, FAILED, PENDING,
};

/// `timeout 30s`, or `timeout 30s x 3 attempts` when the message is sent again.
fn timeout_label(timeout: std::time::Duration, retry: &RetryPolicy) -> String {
    let base = format!("timeout {}", humantime::format_duration(timeout));
    if retry.attempts > 1 {
        format!("{base} x {} attempts", retry.attempts)
    } else {
        base
    }
}

/// One transition of the state machine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// The event type, or `timeout <duration>`.
    pub on: String,
    /// What the transition emits.
    pub emits: String,
}

fn compensating(def: &SagaDefinition, step: usize) -> String {
    format!("COMPENSATING_{}", def.steps[step].name.to_uppercase())
}

fn waiting_state(def: &SagaDefinition, step: usize) -> String {
    if step == 0 {
        PENDING.to_string()
    } else {
        def.steps[step - 1].state.clone()
    }
}

/// Where a cancellation decided while at `step` goes first, and what it emits.
fn cancel_from(def: &SagaDefinition, step: usize, reason: &str) -> (String, String) {
    if step == 0 {
        (
            FAILED.to_string(),
            format!("{} (reason {reason})", def.cancelled.event_type),
        )
    } else {
        (
            compensating(def, step - 1),
            def.steps[step - 1].compensation.event_type.clone(),
        )
    }
}

/// Every transition of the saga.
pub fn edges(def: &SagaDefinition) -> Vec<Edge> {
    let mut edges = vec![Edge {
        from: "[*]".into(),
        to: PENDING.into(),
        on: def.start_event.clone(),
        emits: def.steps[0].command.event_type.clone(),
    }];
    for (k, step) in def.steps.iter().enumerate() {
        let from = waiting_state(def, k);
        if k + 1 < def.steps.len() {
            edges.push(Edge {
                from: from.clone(),
                to: step.state.clone(),
                on: step.success.clone(),
                emits: def.steps[k + 1].command.event_type.clone(),
            });
        } else {
            edges.push(Edge {
                from: from.clone(),
                to: step.state.clone(),
                on: step.success.clone(),
                emits: String::new(),
            });
            edges.push(Edge {
                from: step.state.clone(),
                to: COMPLETED.to_string(),
                on: "all steps done".into(),
                emits: def.completed.event_type.clone(),
            });
        }
        let (to, emits) = cancel_from(def, k, &format!("{}_failed", step.name));
        edges.push(Edge {
            from: from.clone(),
            to,
            on: step.failure.clone(),
            emits,
        });
        let (to, emits) = cancel_from(def, k, &format!("timeout:{}", step.name));
        edges.push(Edge {
            from,
            to,
            on: timeout_label(step.timeout, &step.retry),
            emits,
        });
    }
    // The last step is only ever compensated late (after its own timeout), without waiting for a
    // confirmation: it has no compensating state.
    let waiting_compensations = def.steps.len() - 1;
    for (j, step) in def
        .steps
        .iter()
        .enumerate()
        .take(waiting_compensations)
        .rev()
    {
        let (to, emits) = if j == 0 {
            (
                def.compensated_state.clone(),
                format!("{} (reason of the failure)", def.cancelled.event_type),
            )
        } else {
            (
                compensating(def, j - 1),
                def.steps[j - 1].compensation.event_type.clone(),
            )
        };
        edges.push(Edge {
            from: compensating(def, j),
            to: to.clone(),
            on: step.confirmed_by.clone(),
            emits: emits.clone(),
        });
        // Given up: the remaining compensations still run; the saga ends stuck.
        let (to, emits) = if j == 0 {
            (
                COMPENSATION_STUCK.to_string(),
                format!(
                    "{} (reason of the failure, compensation_stuck)",
                    def.cancelled.event_type
                ),
            )
        } else {
            (to, emits)
        };
        edges.push(Edge {
            from: compensating(def, j),
            to,
            on: format!(
                "{} (unconfirmed: given up)",
                timeout_label(step.timeout, &step.compensation_retry)
            ),
            emits,
        });
    }
    for terminal in [
        COMPLETED,
        FAILED,
        def.compensated_state.as_str(),
        COMPENSATION_STUCK,
    ] {
        edges.push(Edge {
            from: terminal.into(),
            to: "TOMBSTONE".into(),
            on: format!("retention {}", humantime::format_duration(def.retention)),
            emits: String::new(),
        });
    }
    edges.push(Edge {
        from: "TOMBSTONE".into(),
        to: "[*]".into(),
        on: format!(
            "dedupe_retention {} after the outcome",
            humantime::format_duration(def.dedupe_retention)
        ),
        emits: String::new(),
    });
    edges
}

/// The state machine as readable text.
pub fn text(def: &SagaDefinition) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "saga {} (keyed by {})", def.name, def.key_field);
    let _ = writeln!(
        out,
        "  starts on {} from {}",
        def.start_event, def.start_topic
    );
    for (k, step) in def.steps.iter().enumerate() {
        let _ = writeln!(
            out,
            "  step {} '{}': {} -> {}; replies on {}: {} | {}; timeout {}; undone by {} -> {} (confirmed by {})",
            k + 1,
            step.name,
            step.command.event_type,
            step.command.topic,
            step.reply_topic,
            step.success,
            step.failure,
            humantime::format_duration(step.timeout),
            step.compensation.event_type,
            step.compensation.topic,
            step.confirmed_by
        );
    }
    let _ = writeln!(
        out,
        "  outcomes: {} -> {}, {} -> {}",
        def.completed.event_type,
        def.completed.topic,
        def.cancelled.event_type,
        def.cancelled.topic
    );
    let _ = writeln!(out, "transitions:");
    for e in edges(def) {
        let emits = if e.emits.is_empty() {
            String::new()
        } else {
            format!("  emits {}", e.emits)
        };
        let _ = writeln!(out, "  {:<28} --[{}]--> {}{}", e.from, e.on, e.to, emits);
    }
    let _ = writeln!(
        out,
        "  a success that arrives after its step failed or timed out (outcome or tombstone included): its compensation is queued in reverse step order; the outcome stays"
    );
    let _ = writeln!(
        out,
        "  a message sent again after its timeout (retry) carries its first send's event_id"
    );
    let _ = writeln!(
        out,
        "  COMPENSATING_<STEP> is stored as status COMPENSATING with that step awaited"
    );
    let _ = writeln!(
        out,
        "  a duplicate event_id, a second start event, or a reply the saga does not wait for: ignored, no output"
    );
    out
}

/// The state machine as a Mermaid `stateDiagram-v2`.
pub fn mermaid(def: &SagaDefinition) -> String {
    let mut out = String::from("stateDiagram-v2\n");
    for e in edges(def) {
        let label = if e.emits.is_empty() {
            e.on.clone()
        } else {
            format!("{} / {}", e.on, e.emits)
        };
        // Mermaid reads ':' as the label separator and chokes on some punctuation.
        let label = label.replace(':', " ").replace(['(', ')'], "");
        let _ = writeln!(out, "    {} --> {}: {}", e.from, e.to, label);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_state_appears_and_compensations_chain_backwards() {
        let def = SagaDefinition::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/topologies/order_with_shipping.yaml"
        )))
        .unwrap();
        let m = mermaid(&def);
        assert!(m.starts_with("stateDiagram-v2\n"));
        for step in &def.steps {
            assert!(m.contains(&step.state), "{} missing:\n{m}", step.state);
        }
        assert!(
            m.contains(
                "INVENTORY_RESERVED --> COMPENSATING_INVENTORY: ShipmentFailed / ReleaseInventory"
            ),
            "{m}"
        );
        assert!(m.contains("COMPENSATING_INVENTORY --> COMPENSATING_PAYMENT: InventoryReleased / RefundPayment"), "{m}");
        assert!(
            m.contains("COMPENSATING_PAYMENT --> REFUNDED: PaymentRefunded"),
            "{m}"
        );
        assert!(
            m.contains("SHIPMENT_SCHEDULED --> COMPLETED: all steps done / OrderCompleted"),
            "{m}"
        );
        assert!(!m.contains("COMPENSATING_SHIPPING"), "{m}");
        let t = text(&def);
        assert!(t.contains("step 3 'shipping'"), "{t}");
    }
}

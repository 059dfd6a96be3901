//! Trace context: each saga span is a child of the `traceparent` of the record it handles
//! (OpenTelemetry's W3C propagation), the outputs carry that span's context, and the spans reach
//! an OTLP collector over mutual TLS. The collector is a real HTTPS server (Python's `ssl`) that
//! decodes the exports with the official OTLP protobuf classes; the certificates are the secured
//! stack's (`scripts/stack up --secure`).

mod common;

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::poll_until;
use common::saga_env::{Reply, SagaEnv};
use serde_json::Value;

fn python() -> PathBuf {
    std::env::var("SAGA_STREAMS_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/saga-streams/venv/bin/python")
        })
}

fn certs() -> PathBuf {
    let dir = std::env::var("SAGA_STACK_SECURE_DIR").unwrap_or_else(|_| {
        panic!("SAGA_STACK_SECURE_DIR is not set: scripts/stack up --secure && eval \"$(scripts/stack secure-env)\"")
    });
    PathBuf::from(dir).join("certs")
}

/// The OTLP receiver, killed when dropped.
struct Receiver {
    child: Child,
    spans: PathBuf,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    fn start(port: u16, dir: &Path) -> Receiver {
        let certs = certs();
        let spans = dir.join("spans.jsonl");
        let mut child = Command::new(python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/otlp_receiver.py"))
            .arg(port.to_string())
            .arg(certs.join("broker.pem"))
            .arg(certs.join("broker.key"))
            .arg(certs.join("ca.pem"))
            .arg(&spans)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        Receiver { child, spans }
    }

    /// The spans received so far, by span id.
    fn spans(&self) -> HashMap<String, Value> {
        std::fs::read_to_string(&self.spans)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|s| (s["span_id"].as_str().unwrap_or_default().to_string(), s))
            .collect()
    }

    /// Waits for the span `span_id`.
    fn span(&self, span_id: &str) -> Value {
        let mut found = None;
        let ok = poll_until(Duration::from_secs(60), || {
            found = self.spans().remove(span_id);
            found.is_some()
        });
        assert!(ok, "span {span_id} not exported; got {:?}", self.spans());
        found.unwrap()
    }
}

/// (trace id, span id) of a `traceparent` header, checked for the W3C form.
fn parse(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00", "{traceparent}");
    assert_eq!(parts[1].len(), 32, "{traceparent}");
    assert_eq!(parts[2].len(), 16, "{traceparent}");
    assert_eq!(parts[3], "01", "{traceparent}");
    (parts[1].to_string(), parts[2].to_string())
}

/// The `traceparent` of the `event_type` the saga wrote for `order`.
fn traceparent_of(env: &mut SagaEnv, order: &str, event_type: &str) -> String {
    env.expect(order, event_type);
    env.of(order, event_type)[0]
        .header("traceparent")
        .unwrap_or_else(|| panic!("{event_type} of {order} has no traceparent"))
}

#[test]
fn saga_spans_continue_the_callers_trace_and_are_exported_over_mutual_tls() {
    let certs = certs();
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let port = common::free_port();
    let receiver = Receiver::start(port, env.dir.path());
    let endpoint = format!("https://localhost:{port}/v1/traces");
    let (ca, cert, key) = (
        certs.join("ca.pem"),
        certs.join("saga.pem"),
        certs.join("saga.key"),
    );
    let _orchestrator = env.orchestrator(
        "a",
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-ca",
            ca.to_str().unwrap(),
            "--otlp-cert",
            cert.to_str().unwrap(),
            "--otlp-key",
            key.to_str().unwrap(),
            "--step-timeout",
            "payment=3s",
        ],
    );

    // The order service's span starts the trace.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let caller = "b7ad6b7169203331";
    env.create(
        "o-1",
        &[("traceparent", &format!("00-{trace}-{caller}-01"))],
    );
    let (pay_trace, pay_span) = parse(&traceparent_of(&mut env, "o-1", "ProcessPayment"));
    assert_eq!(pay_trace, trace);
    assert_ne!(
        pay_span, caller,
        "the command carries the saga's span, not the caller's"
    );

    // The payment service answers in its own span of the trace.
    let participant = "00f067aa0ba902b7";
    let (topic, value) = env.reply_record(0, Reply::Success, "o-1", "paid-o-1");
    env.send_raw(
        &topic,
        Some("o-1"),
        value.as_bytes(),
        &[("traceparent", &format!("00-{trace}-{participant}-01"))],
    );
    let (reserve_trace, reserve_span) = parse(&traceparent_of(&mut env, "o-1", "ReserveInventory"));
    assert_eq!(reserve_trace, trace);
    assert_ne!(reserve_span, pay_span);

    let first = receiver.span(&pay_span);
    assert_eq!(first["trace_id"], trace);
    assert_eq!(first["parent_span_id"], caller, "{first}");
    assert_eq!(first["name"], "saga");
    let second = receiver.span(&reserve_span);
    assert_eq!(second["trace_id"], trace);
    assert_eq!(second["parent_span_id"], participant, "{second}");

    // A timeout's outputs continue the trace of the saga's last traced input.
    let trace2 = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller2 = "a3ce929d0e0e4736";
    env.create(
        "o-2",
        &[("traceparent", &format!("00-{trace2}-{caller2}-01"))],
    );
    let (_, cancel_span) = parse(&traceparent_of(&mut env, "o-2", "OrderCancelled"));
    let timer = receiver.span(&cancel_span);
    assert_eq!(timer["trace_id"], trace2);
    assert_eq!(timer["name"], "saga_timer");
    assert_eq!(timer["parent_span_id"], caller2, "{timer}");

    // Without a traceparent, the saga starts a trace of its own, carried by every output, its
    // timeout's too.
    env.create("o-3", &[]);
    let (own_trace, own_span) = parse(&traceparent_of(&mut env, "o-3", "ProcessPayment"));
    let root = receiver.span(&own_span);
    assert_eq!(root["trace_id"], own_trace);
    assert_eq!(root["parent_span_id"], "", "{root}");
    let (timeout_trace, timeout_span) = parse(&traceparent_of(&mut env, "o-3", "OrderCancelled"));
    assert_eq!(timeout_trace, own_trace);
    let timer = receiver.span(&timeout_span);
    assert_eq!(timer["parent_span_id"], own_span, "{timer}");

    // A malformed traceparent is not a parent: the saga starts a trace.
    env.create("o-4", &[("traceparent", "00-not-a-trace-01")]);
    let (bad_trace, _) = parse(&traceparent_of(&mut env, "o-4", "ProcessPayment"));
    assert_ne!(bad_trace, trace);
}

#[test]
fn a_collector_that_cannot_be_reached_or_trusted_costs_the_saga_nothing() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    // Nothing listens on this port; then a collector TLS cannot be set up with (its certificate
    // is not trusted without --otlp-ca, and it wants a client certificate).
    let dead = format!("https://localhost:{}/v1/traces", common::free_port());
    let mut orchestrator = env.orchestrator("a", &["--otlp-endpoint", &dead]);
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    env.create("o-1", &[("traceparent", traceparent)]);
    let (trace, _) = parse(&traceparent_of(&mut env, "o-1", "ProcessPayment"));
    assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
    env.reply(0, Reply::Success, "o-1");
    env.reply(1, Reply::Success, "o-1");
    env.expect("o-1", "OrderCompleted");
    // It stops in time, though its last spans cannot be delivered.
    assert!(orchestrator.sigterm(Duration::from_secs(30)).is_some());

    let port = common::free_port();
    let receiver = Receiver::start(port, env.dir.path());
    let untrusted = format!("https://localhost:{port}/v1/traces");
    let mut orchestrator = env.orchestrator("b", &["--otlp-endpoint", &untrusted]);
    env.create("o-2", &[("traceparent", traceparent)]);
    env.expect("o-2", "ProcessPayment");
    env.reply(0, Reply::Success, "o-2");
    env.expect("o-2", "ReserveInventory");
    env.reply(1, Reply::Success, "o-2");
    env.expect("o-2", "OrderCompleted");
    // Stopping flushes the spans: the export was tried, and the TLS handshake failed.
    assert!(orchestrator.sigterm(Duration::from_secs(30)).is_some());
    assert!(receiver.spans().is_empty(), "{:?}", receiver.spans());
    let refused =
        std::fs::read_to_string(receiver.spans.with_extension("refused")).unwrap_or_default();
    assert!(!refused.is_empty(), "no TLS handshake was tried");
}

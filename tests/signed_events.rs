//! Signed events against the real broker: inputs are verified, outputs signed, with signatures a
//! Python script makes from the README's description alone (Python's `hmac`); a missing or bad
//! signature dead-letters the record; a key rotation with an overlap window loses nothing.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::poll_until;
use common::saga_env::{body, Reply, SagaEnv};
use saga_streams::sim::ReadRecord;
use serde_json::json;

const TOPOLOGY: &str = "../tests/fixtures/order_saga_signed.yaml";
const S1: &str = "first-signing-secret-4f1e2d";
const S2: &str = "second-signing-secret-9a7c3b";

/// The X-Signature value `tests/fixtures/sign_event.py` computes.
fn python_sign(kid: &str, secret: &str, key: &str, value: &str, correlation: &str) -> String {
    let mut child = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sign_event.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running python3");
    let request = json!({
        "kid": kid, "secret": secret, "key": key, "value": value, "correlation_id": correlation,
    });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

struct Signed {
    env: SagaEnv,
    keys: std::path::PathBuf,
    orchestrator: common::BinProcess,
}

impl Signed {
    fn new() -> Self {
        let env = SagaEnv::new(TOPOLOGY, 2);
        let keys = env.dir.path().join("keys");
        std::fs::write(&keys, format!("k1 {S1}\n")).unwrap();
        let orchestrator = env.orchestrator("a", &["--signing-keys", &keys.display().to_string()]);
        Self {
            env,
            keys,
            orchestrator,
        }
    }

    /// Sends `value` to `topic` keyed by `order`, with a correlation id and `signature` if any.
    fn send(&self, topic: &str, order: &str, value: &str, signature: Option<&str>) {
        let correlation = format!("corr-{order}");
        let mut headers = vec![("X-Correlation-ID", correlation.as_str())];
        if let Some(s) = signature {
            headers.push(("X-Signature", s));
        }
        self.env
            .send_raw(topic, Some(order), value.as_bytes(), &headers);
    }

    /// Sends `value` signed with (kid, secret) by the Python signer.
    fn send_signed(&self, topic: &str, order: &str, value: &str, (kid, secret): (&str, &str)) {
        let signature = python_sign(kid, secret, order, value, &format!("corr-{order}"));
        self.send(topic, order, value, Some(&signature));
    }

    fn order_value(&self, order: &str) -> String {
        let mut event = saga_streams::sim::load::order_created(&self.env.def, order);
        event
            .as_object_mut()
            .unwrap()
            .insert("correlation_id".into(), json!(format!("corr-{order}")));
        json!({ "event": event }).to_string()
    }

    /// Runs `order` to OrderCompleted, every input signed with `key`; checks each command and
    /// the outcome carry a signature by `signer` that the Python signer reproduces.
    fn complete(&mut self, order: &str, key: (&str, &str), signer: (&str, &str)) {
        let topic = self.env.def.start_topic.clone();
        self.send_signed(&topic, order, &self.order_value(order), key);
        for step in 0..self.env.def.steps.len() {
            let command = self.env.def.steps[step].command.event_type.clone();
            self.env.expect(order, &command);
            self.check_signed(self.env.of(order, &command)[0], signer);
            let (topic, value) = self.env.reply_record(
                step,
                Reply::Success,
                order,
                &uuid::Uuid::new_v4().to_string(),
            );
            self.send_signed(&topic, order, &value, key);
        }
        let completed = self.env.def.completed.event_type.clone();
        self.env.expect(order, &completed);
        self.check_signed(self.env.of(order, &completed)[0], signer);
    }

    fn check_signed(&self, record: &ReadRecord, (kid, secret): (&str, &str)) {
        let text = |b: Option<&Vec<u8>>| String::from_utf8(b.cloned().unwrap_or_default()).unwrap();
        let expected = python_sign(
            kid,
            secret,
            &text(record.key.as_ref()),
            &text(record.value.as_ref()),
            &record.header("X-Correlation-ID").unwrap_or_default(),
        );
        assert_eq!(
            record.header("X-Signature").as_deref(),
            Some(expected.as_str()),
            "{} is not signed by {kid}: {:?}",
            record.topic,
            body(record)
        );
    }

    /// Writes the keys file and sends SIGHUP, returning once the orchestrator logged the request.
    fn rotate(&mut self, keys: &str) {
        std::fs::write(&self.keys, keys).unwrap();
        let before = self.requests();
        self.orchestrator.signal("HUP");
        assert!(
            poll_until(Duration::from_secs(30), || self.requests() > before),
            "SIGHUP not seen:\n{}",
            self.orchestrator.log_text()
        );
    }

    fn requests(&self) -> usize {
        self.orchestrator
            .log_text()
            .matches("secrets_rotation_requested")
            .count()
    }

    fn dead_letters(&self) -> Vec<(String, String)> {
        self.env
            .seen
            .iter()
            .filter(|r| r.topic.ends_with(".dlq"))
            .map(|r| {
                (
                    String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned(),
                    r.header("dlq.error.kind").unwrap_or_default(),
                )
            })
            .collect()
    }

    fn wait_dead_letter(&mut self, order: &str, kind: &str) {
        let (o, k) = (order.to_string(), kind.to_string());
        self.env
            .wait(&format!("{order} dead-lettered as {kind}"), move |env| {
                env.seen.iter().any(|r| {
                    r.topic.ends_with(".dlq")
                        && r.key.as_deref() == Some(o.as_bytes())
                        && r.header("dlq.error.kind").as_deref() == Some(k.as_str())
                })
            });
    }
}

#[test]
fn signed_inputs_are_accepted_unsigned_or_tampered_ones_dead_lettered_and_keys_rotate() {
    let mut t = Signed::new();
    let (k1, k2) = (("k1", S1), ("k2", S2));
    t.complete("o-1", k1, k1);

    // Unsigned, tampered, and signed with a secret the orchestrator does not have.
    let topic = t.env.def.start_topic.clone();
    t.send(&topic, "o-2", &t.order_value("o-2"), None);
    let tampered = python_sign("k1", S1, "o-3", &t.order_value("o-3"), "corr-o-3");
    t.send(
        &topic,
        "o-3",
        &t.order_value("o-3").replace("o-3", "o-3 "),
        Some(&tampered),
    );
    t.send_signed(
        &topic,
        "o-4",
        &t.order_value("o-4"),
        ("k1", "a-secret-nobody-has-0000"),
    );
    t.wait_dead_letter("o-2", "missing_signature");
    t.wait_dead_letter("o-3", "bad_signature");
    t.wait_dead_letter("o-4", "bad_signature");
    // A reply without a signature for a running saga is dead-lettered too; the saga waits on.
    t.send_signed(&topic, "o-5", &t.order_value("o-5"), k1);
    t.env
        .expect("o-5", &t.env.def.steps[0].command.event_type.clone());
    let (reply_topic, reply) = t.env.reply_record(0, Reply::Success, "o-5", "r-unsigned");
    t.send(&reply_topic, "o-5", &reply, None);
    t.wait_dead_letter("o-5", "missing_signature");
    assert_eq!(t.env.count("o-5", "ReserveInventory"), 0);

    // Rotation with an overlap: k2 accepted, then k2 signs, then k1 retired.
    t.rotate(&format!("k1 {S1}\nk2 {S2}\n"));
    t.complete("o-6", k2, k1);
    t.complete("o-7", k1, k1);
    t.rotate(&format!("k2 {S2}\nk1 {S1}\n"));
    t.complete("o-8", k1, k2);
    t.rotate(&format!("k2 {S2}\n"));
    t.complete("o-9", k2, k2);
    t.send_signed(&topic, "o-10", &t.order_value("o-10"), k1);
    t.wait_dead_letter("o-10", "bad_signature");

    let mut letters = t.dead_letters();
    letters.sort();
    let expected: Vec<(String, String)> = [
        ("o-10", "bad_signature"),
        ("o-2", "missing_signature"),
        ("o-3", "bad_signature"),
        ("o-4", "bad_signature"),
        ("o-5", "missing_signature"),
    ]
    .iter()
    .map(|(o, k)| (o.to_string(), k.to_string()))
    .collect();
    assert_eq!(
        letters, expected,
        "only the unsigned and badly signed records are dead letters"
    );
    t.orchestrator.assert_alive();
    let log = t.orchestrator.log_text();
    assert!(log.contains("signature_refused"), "no audit event:\n{log}");
    assert!(
        !log.contains(S1) && !log.contains(S2),
        "a signing secret is in the log"
    );
}

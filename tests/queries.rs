//! Queries from any instance: `/sagas/{id}` on an instance that does not own the saga's partition
//! answers for the owner (found through the members topic, reached at its advertised address),
//! says why when it cannot (503 with a reason, never a bare partition number), and answers
//! itself once it owns the partition.

mod common;

use std::time::Duration;

use common::saga_env::{SagaEnv, LIMIT};
use common::{poll_until, BinProcess};
use saga_streams::saga::query::Partitioner;
use serde_json::Value;

/// GET `/sagas/{id}` from `instance`: (status, the instance that served it, body).
fn ask(instance: &mut BinProcess, id: &str) -> (u16, Option<String>, Value) {
    let addr = instance.http_addr(LIMIT);
    let response = reqwest::blocking::Client::new()
        .get(format!("http://{addr}/sagas/{id}"))
        .timeout(Duration::from_secs(20))
        .send()
        .unwrap();
    let status = response.status().as_u16();
    let served_by = response
        .headers()
        .get("x-saga-streams-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response.json().unwrap_or(Value::Null);
    (status, served_by, body)
}

fn ready_with_one_task(instance: &mut BinProcess) -> bool {
    let addr = instance.http_addr(LIMIT);
    let (code, body) = common::http_get(&format!("http://{addr}/ready"));
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    code == 200 && body["assigned_tasks"] == 1
}

#[test]
fn any_instance_answers_for_any_saga_and_says_why_when_the_owner_is_away() {
    let mut env = SagaEnv::new("order_saga.yaml", 2);
    let mut a = env.orchestrator("a", &[]);
    let mut b = env.orchestrator("b", &[]);
    assert!(
        poll_until(LIMIT, || ready_with_one_task(&mut a)
            && ready_with_one_task(&mut b)),
        "the two instances never shared the two partitions"
    );
    // One order on each partition.
    let mut orders = Vec::new();
    for partition in 0..2 {
        let id = (0..)
            .map(|n| format!("q-{n}"))
            .find(|id| Partitioner::ConsistentRandom.partition(id.as_bytes(), 2) == partition)
            .unwrap();
        env.create(&id, &[]);
        env.expect(&id, "ProcessPayment");
        orders.push(id);
    }
    // Both instances answer for both orders; for one order each, by asking the other.
    let mut owner_of = std::collections::BTreeMap::new();
    for id in &orders {
        for (name, instance) in [("a", &mut a), ("b", &mut b)] {
            let mut last = (0, None, Value::Null);
            let answered = poll_until(LIMIT, || {
                last = ask(instance, id);
                last.0 == 200
            });
            assert!(answered, "{name} never answered for {id}: {last:?}");
            assert_eq!(last.2["saga_id"], id.as_str(), "{last:?}");
            assert_eq!(last.2["status"], "PENDING", "{last:?}");
            if let Some(owner) = last.1 {
                assert_ne!(owner, name, "an instance forwarded to itself");
                owner_of.insert(id.clone(), owner);
            }
        }
    }
    assert_eq!(
        owner_of.len(),
        2,
        "each order served once by the other instance: {owner_of:?}"
    );
    let b_order = owner_of
        .iter()
        .find(|(_, owner)| owner.as_str() == "b")
        .map(|(id, _)| id.clone())
        .expect("an order b owns");

    // b frozen: a says that b does not answer, and who b is.
    b.signal("STOP");
    let (code, _, body) = ask(&mut a, &b_order);
    b.signal("CONT");
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["owner"], "b", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("did not answer"),
        "{body}"
    );

    // b gone: a takes its partition over and answers itself.
    assert!(b.sigterm(Duration::from_secs(30)).is_some());
    let mut last = (0, None, Value::Null);
    let took_over = poll_until(LIMIT, || {
        last = ask(&mut a, &b_order);
        last.0 == 200 && last.1.is_none()
    });
    assert!(took_over, "a never answered for {b_order} itself: {last:?}");
    assert_eq!(last.2["saga_id"], b_order.as_str());
}

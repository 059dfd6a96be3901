//! The load generator (`saga-streams load`): start events at a steady rate.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::sync::atomic::{AtomicU64, Ordering};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde_json::{json, Value};

use super::participant::share_of;
use super::SimError;
use crate::codec::signing::SIGNATURE_HEADER;
use crate::codec::Codec;
use crate::runtime::client::KafkaClients;
use crate::saga::contract::{rfc3339, CORRELATION_HEADER};
use crate::saga::SagaDefinition;

/// What to produce.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub orders: u64,
    /// Orders per second; 0 produces as fast as the producer takes them.
    pub rate: f64,
    /// Saga ids are `<id_prefix><n>`.
    pub id_prefix: String,
    /// Produce inside transactions of `transaction_size` orders (read_committed consumers see them
    /// only once committed); 0 produces with a plain idempotent producer.
    pub transaction_size: usize,
    /// How long the producer keeps trying to deliver each order (a broker restarting) before
    /// the load fails.
    pub deliver_within: Duration,
}

/// The start event of order `n`: an OrderCreated with one to three items.
pub fn order_created(def: &SagaDefinition, saga_id: &str) -> Value {
    let items: Vec<Value> = (0..1 + (share_of(saga_id, "items") * 3.0) as u64)
        .map(|i| {
            json!({
                "sku": format!("sku-{}", (share_of(saga_id, &format!("sku{i}")) * 20.0) as u64 + 1),
                "quantity": 1 + (share_of(saga_id, &format!("qty{i}")) * 3.0) as u64,
            })
        })
        .collect();
    let total = 10.0 + (share_of(saga_id, "total") * 49_000.0).round() / 100.0;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let mut event = json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "event_type": def.start_event,
        "event_version": 1,
        "correlation_id": uuid::Uuid::new_v4().to_string(),
        "occurred_at": rfc3339(now),
        "user_id": format!("user-{}", (share_of(saga_id, "user") * 1000.0) as u64),
        "total": total,
        "currency": "EUR",
        "items": items,
    });
    event[def.key_field.as_str()] = Value::String(saga_id.to_string());
    event
}

/// Counts deliveries that failed, so none goes unnoticed.
#[derive(Default)]
struct DeliveryCounter {
    failed: AtomicU64,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            tracing::error!(error = %e, "an order was not delivered");
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Produces the orders; calls `progress(produced)` now and then. Returns the saga ids.
pub fn run(
    kafka: &(impl KafkaClients + ?Sized),
    def: &SagaDefinition,
    codec: &Codec,
    spec: &LoadSpec,
    progress: &dyn Fn(u64),
) -> Result<Vec<String>, SimError> {
    let mut config = kafka.client_config();
    config
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set(
            "message.timeout.ms",
            spec.deliver_within.as_millis().max(1).to_string(),
        );
    if spec.transaction_size > 0 {
        config.set(
            "transactional.id",
            format!("saga-streams-load-{}", uuid::Uuid::new_v4()),
        );
    }
    let producer: ThreadedProducer<DeliveryCounter> = config
        .create_with_context(DeliveryCounter::default())
        .map_err(SimError::kafka("create producer"))?;
    let timeout = Duration::from_secs(30);
    if spec.transaction_size > 0 {
        producer
            .init_transactions(timeout)
            .map_err(SimError::kafka("init transactions"))?;
        producer
            .begin_transaction()
            .map_err(SimError::kafka("begin transaction"))?;
    }
    let started = Instant::now();
    let mut ids = Vec::with_capacity(spec.orders as usize);
    for n in 0..spec.orders {
        if spec.rate > 0.0 {
            let due = started + Duration::from_secs_f64(n as f64 / spec.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let saga_id = format!("{}{n}", spec.id_prefix);
        let event = order_created(def, &saga_id);
        let correlation = event["correlation_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let body = match event {
            Value::Object(map) => codec
                .write(&def.start_topic, &def.start_event, map, true)
                .map_err(SimError::Other)?,
            _ => Vec::new(),
        };
        let mut headers = OwnedHeaders::new().insert(Header {
            key: CORRELATION_HEADER,
            value: Some(&correlation),
        });
        let signature = codec
            .signing()
            .sign(
                &def.start_topic,
                Some(saga_id.as_bytes()),
                Some(&body),
                Some(correlation.as_bytes()),
            )
            .map_err(SimError::Other)?;
        if let Some(signature) = &signature {
            headers = headers.insert(Header {
                key: SIGNATURE_HEADER,
                value: Some(signature),
            });
        }
        let mut record = BaseRecord::to(&def.start_topic)
            .key(saga_id.as_str())
            .payload(&body)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    return Err(SimError::Kafka {
                        operation: "produce",
                        source: e,
                    })
                }
            }
        }
        ids.push(saga_id);
        let produced = n + 1;
        if spec.transaction_size > 0 && produced.is_multiple_of(spec.transaction_size as u64) {
            producer
                .commit_transaction(timeout)
                .map_err(SimError::kafka("commit transaction"))?;
            if produced < spec.orders {
                producer
                    .begin_transaction()
                    .map_err(SimError::kafka("begin transaction"))?;
            }
        }
        if produced.is_multiple_of(500) {
            progress(produced);
        }
    }
    if spec.transaction_size > 0 && !spec.orders.is_multiple_of(spec.transaction_size as u64) {
        producer
            .commit_transaction(timeout)
            .map_err(SimError::kafka("commit transaction"))?;
    }
    producer
        .flush(spec.deliver_within.max(timeout))
        .map_err(SimError::kafka("flush"))?;
    let failed = producer.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        return Err(SimError::Other(format!(
            "{failed} of {} orders were not delivered",
            spec.orders
        )));
    }
    progress(spec.orders);
    Ok(ids)
}

//! Writes single records to an application topic on request (operators' actions to the control
//! topic), keyed so that they land on the partition of the task they are for.
//!
//! Not on the processing path: the HTTP endpoints call it, one request at a time per caller. The
//! producer is idempotent with `acks=all`, uses the application's partitioner, and is built again
//! after a secrets rotation (SIGHUP) or a fatal error.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::client::{KafkaClients, KafkaSettings};
use super::secrets;

/// How long a write may take before the caller is told it failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct KeyedWriter {
    topic: String,
    partitioner: String,
    state: Mutex<WriterState>,
}

struct WriterState {
    settings: KafkaSettings,
    generation: u64,
    producer: Option<FutureProducer>,
}

impl KeyedWriter {
    pub fn new(settings: KafkaSettings, topic: String, partitioner: String) -> Self {
        Self {
            topic,
            partitioner,
            state: Mutex::new(WriterState {
                settings,
                generation: secrets::generation(),
                producer: None,
            }),
        }
    }

    /// Writes `value` keyed by `key` and waits for the acknowledgement: partition and offset.
    pub fn write(&self, key: &[u8], value: &[u8]) -> Result<(i32, i64), String> {
        let producer = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = secrets::generation();
            if state.generation != now {
                state.generation = now;
                match state.settings.reread_files() {
                    Ok(()) => state.producer = None,
                    Err(e) => {
                        tracing::warn!(error = %e, "control writer: the rotated Kafka secrets cannot be read; the previous ones stay")
                    }
                }
            }
            if state.producer.is_none() {
                let mut config = state.settings.client_config();
                config
                    .set("acks", "all")
                    .set("enable.idempotence", "true")
                    .set("linger.ms", "0")
                    .set("partitioner", &self.partitioner)
                    .set(
                        "message.timeout.ms",
                        DELIVERY_TIMEOUT.as_millis().to_string(),
                    );
                state.producer = Some(
                    config
                        .create::<FutureProducer>()
                        // librdkafka's message may quote a setting's value: a secret's too.
                        .map_err(|_| {
                            "the Kafka settings were refused when creating the producer (see `saga-streams config show`)".to_string()
                        })?,
                );
            }
            state.producer.clone()
        };
        let Some(producer) = producer else {
            return Err("no producer".into());
        };
        let record = FutureRecord::to(&self.topic).key(key).payload(value);
        let delivered =
            futures::executor::block_on(producer.send(record, Timeout::After(DELIVERY_TIMEOUT)));
        match delivered {
            Ok(delivery) => Ok((delivery.partition, delivery.offset)),
            Err((e, _)) => {
                // A fatal producer error (fenced, or unusable) is not cured by waiting: start over.
                if producer.client().fatal_error().is_some() {
                    let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    state.producer = None;
                }
                Err(format!("writing to {}: {e}", self.topic))
            }
        }
    }
}

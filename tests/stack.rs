//! Proof that the local stack is real: the broker creates topics, keeps transactions isolated,
//! fences zombies, and the registry serves schemas in the Confluent wire format.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::{post_schema, SrSettings};
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};

use common::{create_topic, kafka_bootstrap, schema_registry_url, unique};

fn transactional_producer(
    bootstrap: &str,
    transactional_id: &str,
) -> ThreadedProducer<DefaultProducerContext> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", "30000")
        .create()
        .expect("creating a transactional producer");
    producer
        .init_transactions(Duration::from_secs(30))
        .expect("init_transactions");
    producer
}

fn send(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &str, value: &str) {
    producer
        .send(BaseRecord::to(topic).key(key).payload(value))
        .map_err(|(e, _)| e)
        .expect("enqueueing a record");
}

/// Reads partition 0 of `topic` from the start with the given isolation level until the consumer's
/// position reaches the high watermark (so nothing visible is left unread) and returns the values.
fn read_all(bootstrap: &str, topic: &str, isolation: &str) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .expect("creating a consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .expect("assignment");
    consumer.assign(&assignment).expect("assign");
    let (_, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .expect("watermarks");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut values = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "did not reach offset {high} of {topic} in 30 s"
        );
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.expect("consuming");
            values.push(String::from_utf8(message.payload().unwrap_or_default().to_vec()).unwrap());
        }
        let position = consumer.position().expect("position");
        if let Some(Offset::Offset(at)) = position.find_partition(topic, 0).map(|p| p.offset()) {
            if at >= high {
                return values;
            }
        }
    }
}

#[tokio::test]
async fn admin_client_creates_a_topic_with_the_requested_partitions() {
    let bootstrap = kafka_bootstrap();
    let topic = unique("stack-topic");
    create_topic(&bootstrap, &topic, 3).await;

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .expect("metadata");
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .expect("the new topic is in the metadata");
    assert!(found.error().is_none(), "topic error: {:?}", found.error());
    assert_eq!(found.partitions().len(), 3);
}

#[tokio::test]
async fn read_committed_sees_only_committed_transactions() {
    let bootstrap = kafka_bootstrap();
    let topic = unique("stack-txn");
    create_topic(&bootstrap, &topic, 1).await;

    let producer = transactional_producer(&bootstrap, &unique("stack-txn-id"));
    producer.begin_transaction().unwrap();
    for i in 0..5 {
        send(&producer, &topic, "k", &format!("aborted-{i}"));
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    producer.abort_transaction(Timeout::Never).expect("abort");

    producer.begin_transaction().unwrap();
    for i in 0..3 {
        send(&producer, &topic, "k", &format!("committed-{i}"));
    }
    producer.commit_transaction(Timeout::Never).expect("commit");

    let committed = read_all(&bootstrap, &topic, "read_committed");
    assert_eq!(committed, vec!["committed-0", "committed-1", "committed-2"]);

    let mut everything = read_all(&bootstrap, &topic, "read_uncommitted");
    everything.sort();
    let mut expected: Vec<String> = (0..5)
        .map(|i| format!("aborted-{i}"))
        .chain((0..3).map(|i| format!("committed-{i}")))
        .collect();
    expected.sort();
    assert_eq!(everything, expected);
}

#[tokio::test]
async fn a_second_producer_with_the_same_transactional_id_fences_the_first() {
    let bootstrap = kafka_bootstrap();
    let topic = unique("stack-fence");
    create_topic(&bootstrap, &topic, 1).await;
    let transactional_id = unique("stack-fence-id");

    let zombie = transactional_producer(&bootstrap, &transactional_id);
    zombie.begin_transaction().unwrap();
    send(&zombie, &topic, "k", "from-zombie");
    zombie.flush(Duration::from_secs(10)).unwrap();

    // init_transactions of the newcomer bumps the epoch and aborts the zombie's open transaction.
    let successor = transactional_producer(&bootstrap, &transactional_id);

    let error = zombie
        .commit_transaction(Timeout::Never)
        .expect_err("the fenced producer must not commit");
    match &error {
        KafkaError::Transaction(code) => {
            assert!(
                code.is_fatal(),
                "expected a fatal (fenced) error, got {code:?}"
            )
        }
        other => panic!("expected a transaction error, got {other:?}"),
    }

    successor.begin_transaction().unwrap();
    send(&successor, &topic, "k", "from-successor");
    successor
        .commit_transaction(Timeout::Never)
        .expect("successor commits");

    assert_eq!(
        read_all(&bootstrap, &topic, "read_committed"),
        vec!["from-successor"]
    );
}

#[tokio::test]
async fn registry_round_trip_in_the_confluent_wire_format() {
    let url = schema_registry_url();
    let topic = unique("stack-avro");
    let schema = r#"{"type":"record","name":"Probe","namespace":"io.sagastreams.test",
        "fields":[{"name":"order_id","type":"string"},{"name":"total","type":"double"}]}"#;
    let settings = SrSettings::new(url.clone());

    let registered = post_schema(
        &settings,
        format!("{topic}-value"),
        SuppliedSchema::new(None, SchemaType::Avro, schema.to_string()),
    )
    .await
    .expect("registering the schema");

    let encoder = AvroEncoder::new(SrSettings::new(url.clone()));
    let bytes = encoder
        .encode(
            vec![
                ("order_id", Value::String("o-1".into())),
                ("total", Value::Double(12.5)),
            ],
            SubjectNameStrategy::TopicNameStrategy(topic.clone(), false),
        )
        .await
        .expect("encoding");
    assert_eq!(bytes[0], 0, "magic byte");
    assert_eq!(
        u32::from_be_bytes(bytes[1..5].try_into().unwrap()),
        registered.id
    );

    // A fresh decoder knows nothing: it must fetch the writer schema by the id in the bytes.
    let decoder = AvroDecoder::new(SrSettings::new(url));
    let decoded = decoder.decode(Some(&bytes)).await.expect("decoding");
    let Value::Record(fields) = decoded.value else {
        panic!("expected a record, got {:?}", decoded.value)
    };
    let fields: HashMap<String, Value> = fields.into_iter().collect();
    assert_eq!(fields["order_id"], Value::String("o-1".into()));
    assert_eq!(fields["total"], Value::Double(12.5));
}

#!/usr/bin/env python3
"""Confluent's Python client talking to saga-streams through the Schema Registry.

  confluent_avro.py produce --bootstrap B --registry URL --topic T --schema FILE --orders o1,o2
      produces one OrderCreated per order with confluent-kafka's AvroSerializer (topic-name
      subject, the schema looked up, not registered), the record key being the order id; prints
      each order's JSON line as sent.
  confluent_avro.py consume --bootstrap B --registry URL --topics T1,T2 --count N --timeout S
      reads the topics read_committed from the beginning with AvroDeserializer (writer schema by
      the id in each record) and prints one JSON line per record until N records were read;
      exits 1 on timeout.
"""

import argparse
import json
import sys
import time
import uuid
from datetime import datetime, timezone

from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


def produce(args):
    registry = SchemaRegistryClient({"url": args.registry, "timeout": 10})
    with open(args.schema) as f:
        schema = f.read()
    serializer = AvroSerializer(
        registry,
        schema,
        conf={
            "auto.register.schemas": False,
            "use.latest.version": False,
            "subject.name.strategy.type": "TOPIC",
        },
    )
    producer = Producer({"bootstrap.servers": args.bootstrap, "enable.idempotence": True})
    failures = []

    def delivered(err, msg):
        if err is not None:
            failures.append(str(err))

    for i, order in enumerate(args.orders.split(",")):
        event = {
            "event_id": str(uuid.uuid4()),
            "event_type": "OrderCreated",
            "event_version": 2,
            "order_id": order,
            "correlation_id": f"py-corr-{order}",
            "occurred_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "user_id": f"py-user-{i}",
            "total": 10.0 + i,
            "currency": "EUR",
            "items": [{"sku": f"sku-{i + 1}", "quantity": i + 1}],
            "channel": "python",
        }
        value = serializer(event, SerializationContext(args.topic, MessageField.VALUE))
        producer.produce(args.topic, key=order.encode(), value=value, on_delivery=delivered)
        print(json.dumps(event), flush=True)
    producer.flush(30)
    if failures:
        print(f"delivery failed: {failures}", file=sys.stderr)
        sys.exit(1)


def consume(args):
    registry = SchemaRegistryClient({"url": args.registry, "timeout": 10})
    # Topic-name subjects, said explicitly: the client's default first asks for Confluent's
    # topic-to-subject associations, an API other registries (Apicurio) do not serve.
    deserializer = AvroDeserializer(registry, conf={"subject.name.strategy.type": "TOPIC"})
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": f"interop-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe(args.topics.split(","))
    deadline = time.monotonic() + args.timeout
    read = 0
    try:
        while read < args.count:
            if time.monotonic() > deadline:
                print(f"timed out after {read} of {args.count} records", file=sys.stderr)
                sys.exit(1)
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                print(f"consumer error: {msg.error()}", file=sys.stderr)
                continue
            raw = msg.value()
            value = deserializer(raw, SerializationContext(msg.topic(), MessageField.VALUE))
            line = {
                "topic": msg.topic(),
                "key": msg.key().decode() if msg.key() else None,
                "schema_id": int.from_bytes(raw[1:5], "big"),
                "value": value,
            }
            print(json.dumps(line), flush=True)
            read += 1
    finally:
        consumer.close()


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("produce")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--schema", required=True)
    p.add_argument("--orders", required=True)
    c = sub.add_parser("consume")
    c.add_argument("--bootstrap", required=True)
    c.add_argument("--registry", required=True)
    c.add_argument("--topics", required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--timeout", type=float, default=90)
    args = parser.parse_args()
    produce(args) if args.command == "produce" else consume(args)


if __name__ == "__main__":
    main()

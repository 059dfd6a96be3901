package io.sagastreams.baseline;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.time.Instant;
import java.time.temporal.ChronoUnit;
import java.util.ArrayList;
import java.util.List;
import java.util.UUID;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.processor.PunctuationType;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.processor.api.RecordMetadata;
import org.apache.kafka.streams.state.KeyValueIterator;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.StoreBuilder;
import org.apache.kafka.streams.state.Stores;

/**
 * The order saga of {@code topologies/order_saga.yaml} on the Processor API: the same topics, the
 * same JSON messages ({@code {"event": {...}}}, the same envelope and X-Correlation-ID header),
 * the same rules (compensation on inventory failure, step timeouts by a wall-clock punctuator,
 * late successes compensated, duplicates ignored, bad input to {@code <topic>.dlq}).
 */
public final class OrderSaga {
    static final String SAGAS = "saga-store";
    static final String TIMERS = "saga-timers";
    static final String[] INPUTS = {"orders.created", "payments.events", "inventory.events"};
    static final String[] OUTPUTS = {"payments.commands", "inventory.commands", "orders.completed", "orders.cancelled"};
    static final String CORRELATION_HEADER = "X-Correlation-ID";

    private OrderSaga() {}

    /**
     * The saga's topology; {@code caching}: the stores are built with Kafka Streams' record cache
     * ({@code statestore.cache.max.bytes} then bounds it), as its users run stateful processors.
     */
    public static Topology topology(String prefix, long timeoutMs, boolean caching) {
        Topology topology = new Topology();
        String[] inputs = new String[INPUTS.length];
        for (int i = 0; i < INPUTS.length; i++) {
            inputs[i] = prefix + INPUTS[i];
        }
        topology.addSource("inputs", Serdes.String().deserializer(), Serdes.ByteArray().deserializer(), inputs);
        topology.addProcessor("saga", () -> new SagaProcessor(prefix, timeoutMs), "inputs");
        StoreBuilder<KeyValueStore<String, byte[]>> sagas =
                Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore(SAGAS), Serdes.String(), Serdes.ByteArray());
        StoreBuilder<KeyValueStore<Bytes, byte[]>> timers =
                Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore(TIMERS), Serdes.Bytes(), Serdes.ByteArray());
        if (caching) {
            sagas = sagas.withCachingEnabled();
            timers = timers.withCachingEnabled();
        }
        topology.addStateStore(sagas, "saga");
        topology.addStateStore(timers, "saga");
        List<String> sinks = new ArrayList<>(List.of(OUTPUTS));
        for (String input : INPUTS) {
            sinks.add(input + ".dlq");
        }
        for (String sink : sinks) {
            topology.addSink(sink, prefix + sink, Serdes.String().serializer(), Serdes.ByteArray().serializer(), "saga");
        }
        return topology;
    }

    static final class SagaProcessor implements Processor<String, byte[], String, byte[]> {
        private final String prefix;
        private final long timeoutMs;
        private final ObjectMapper json = new ObjectMapper();
        private ProcessorContext<String, byte[]> context;
        private KeyValueStore<String, byte[]> sagas;
        private KeyValueStore<Bytes, byte[]> timers;

        SagaProcessor(String prefix, long timeoutMs) {
            this.prefix = prefix;
            this.timeoutMs = timeoutMs;
        }

        @Override
        public void init(ProcessorContext<String, byte[]> context) {
            this.context = context;
            this.sagas = context.getStateStore(SAGAS);
            this.timers = context.getStateStore(TIMERS);
            long tick = Math.max(20, Math.min(1000, timeoutMs / 10));
            context.schedule(Duration.ofMillis(tick), PunctuationType.WALL_CLOCK_TIME, this::fireTimers);
        }

        @Override
        public void process(Record<String, byte[]> record) {
            String topic = context.recordMetadata().map(RecordMetadata::topic).orElse("");
            String input = topic.startsWith(prefix) ? topic.substring(prefix.length()) : topic;
            JsonNode body;
            try {
                body = record.value() == null ? null : json.readTree(record.value());
            } catch (Exception e) {
                deadLetter(input, record, "invalid_json");
                return;
            }
            if (body != null && !body.has("event_type") && body.has("event")) {
                body = body.get("event");
            }
            String type = text(body, "event_type");
            String eventId = text(body, "event_id");
            String orderId = text(body, "order_id");
            if (body == null || type == null || eventId == null || orderId == null) {
                deadLetter(input, record, "invalid_field");
                return;
            }
            long now = System.currentTimeMillis();
            SagaState saga = load(orderId);
            if (input.equals("orders.created") && type.equals("OrderCreated")) {
                if (saga != null) {
                    return; // a duplicate start
                }
                saga = new SagaState();
                saga.remember(eventId);
                saga.correlationId = text(body, "correlation_id");
                if (saga.correlationId == null) {
                    Header h = record.headers().lastHeader(CORRELATION_HEADER);
                    saga.correlationId = h != null
                            ? new String(h.value(), StandardCharsets.UTF_8)
                            : UUID.nameUUIDFromBytes(eventId.getBytes(StandardCharsets.UTF_8)).toString();
                }
                saga.userId = text(body, "user_id");
                saga.total = body.path("total").asDouble();
                saga.currency = text(body, "currency");
                saga.items = body.get("items");
                saga.status = "PENDING";
                ObjectNode payment = json.createObjectNode();
                payment.put("amount", saga.total);
                payment.put("currency", saga.currency);
                send(orderId, saga, "payments.commands", "ProcessPayment", payment, now);
                await(orderId, saga, 0, false, now);
                save(orderId, saga);
                return;
            }
            if (saga == null) {
                deadLetter(input, record, "unknown_saga");
                return;
            }
            if (!saga.remember(eventId)) {
                return;
            }
            switch (type) {
                case "PaymentSucceeded" -> {
                    saga.paymentId = text(body, "payment_id");
                    if (saga.awaiting == 0 && !saga.compensating) {
                        saga.paid = true;
                        saga.status = "PAYMENT_COMPLETED";
                        ObjectNode reserve = json.createObjectNode();
                        reserve.set("items", saga.items);
                        send(orderId, saga, "inventory.commands", "ReserveInventory", reserve, now);
                        await(orderId, saga, 1, false, now);
                    } else if (saga.finished && !saga.paid) {
                        saga.paid = true; // paid after the payment step timed out: refund it
                        send(orderId, saga, "payments.commands", "RefundPayment", refund(saga), now);
                    }
                }
                case "PaymentFailed" -> {
                    if (saga.awaiting == 0 && !saga.compensating) {
                        saga.status = "FAILED";
                        cancel(orderId, saga, "payment_failed", now);
                    }
                }
                case "InventoryReserved" -> {
                    saga.reservationId = text(body, "reservation_id");
                    if (saga.awaiting == 1 && !saga.compensating) {
                        saga.status = "COMPLETED";
                        clearTimer(orderId, saga);
                        saga.finished = true;
                        ObjectNode done = json.createObjectNode();
                        done.put("user_id", saga.userId);
                        done.put("total", saga.total);
                        done.put("currency", saga.currency);
                        send(orderId, saga, "orders.completed", "OrderCompleted", done, now);
                    } else if (saga.finished || saga.compensating) {
                        ObjectNode release = json.createObjectNode();
                        release.set("items", saga.items);
                        release.put("reservation_id", saga.reservationId);
                        send(orderId, saga, "inventory.commands", "ReleaseInventory", release, now);
                    }
                }
                case "InventoryReservationFailed" -> {
                    if (saga.awaiting == 1 && !saga.compensating) {
                        compensatePayment(orderId, saga, "inventory_failed", now);
                    }
                }
                case "PaymentRefunded" -> {
                    if (saga.awaiting == 0 && saga.compensating) {
                        saga.status = "REFUNDED";
                        cancel(orderId, saga, saga.cancelReason, now);
                    }
                }
                case "InventoryReleased" -> { }
                default -> {
                    deadLetter(input, record, "unknown_event_type");
                    return;
                }
            }
            save(orderId, saga);
        }

        private void compensatePayment(String orderId, SagaState saga, String reason, long now) {
            saga.status = "COMPENSATING";
            saga.cancelReason = reason;
            send(orderId, saga, "payments.commands", "RefundPayment", refund(saga), now);
            await(orderId, saga, 0, true, now);
        }

        private ObjectNode refund(SagaState saga) {
            ObjectNode refund = json.createObjectNode();
            refund.put("amount", saga.total);
            refund.put("currency", saga.currency);
            refund.put("payment_id", saga.paymentId);
            return refund;
        }

        private void cancel(String orderId, SagaState saga, String reason, long now) {
            clearTimer(orderId, saga);
            saga.finished = true;
            ObjectNode cancelled = json.createObjectNode();
            cancelled.put("user_id", saga.userId);
            cancelled.put("total", saga.total);
            cancelled.put("currency", saga.currency);
            cancelled.put("reason", reason);
            send(orderId, saga, "orders.cancelled", "OrderCancelled", cancelled, now);
        }

        /** Waits for step {@code step}'s reply (or its compensation's) until the step timeout. */
        private void await(String orderId, SagaState saga, int step, boolean compensation, long now) {
            clearTimer(orderId, saga);
            saga.awaiting = step;
            saga.compensating = compensation;
            saga.deadline = now + timeoutMs;
            timers.put(timerKey(saga.deadline, orderId), new byte[0]);
        }

        private void clearTimer(String orderId, SagaState saga) {
            if (saga.deadline > 0) {
                timers.delete(timerKey(saga.deadline, orderId));
            }
            saga.deadline = 0;
            saga.awaiting = -1;
        }

        private void fireTimers(long now) {
            List<String> due = new ArrayList<>();
            try (KeyValueIterator<Bytes, byte[]> it = timers.range(timerKey(0, ""), timerKey(now + 1, ""))) {
                while (it.hasNext()) {
                    byte[] key = it.next().key.get();
                    due.add(new String(key, 8, key.length - 8, StandardCharsets.UTF_8));
                }
            }
            for (String orderId : due) {
                SagaState saga = load(orderId);
                if (saga == null || saga.deadline == 0 || saga.deadline > now) {
                    continue;
                }
                int step = saga.awaiting;
                if (saga.compensating) {
                    saga.status = "REFUNDED"; // unconfirmed compensation: the saga ends anyway
                    cancel(orderId, saga, saga.cancelReason, now);
                } else if (step == 0) {
                    saga.status = "FAILED";
                    cancel(orderId, saga, "timeout:payment", now);
                } else if (step == 1) {
                    compensatePayment(orderId, saga, "timeout:inventory", now);
                }
                save(orderId, saga);
            }
        }

        private void send(String orderId, SagaState saga, String topic, String type, ObjectNode payload, long now) {
            int n = saga.messages++;
            ObjectNode event = payload.deepCopy();
            event.put("event_id", UUID.nameUUIDFromBytes((orderId + "/" + n + "/" + type).getBytes(StandardCharsets.UTF_8)).toString());
            event.put("event_type", type);
            event.put("event_version", 1);
            event.put("order_id", orderId);
            event.put("correlation_id", saga.correlationId);
            event.put("occurred_at", Instant.ofEpochMilli(now).truncatedTo(ChronoUnit.MILLIS).toString());
            ObjectNode wrapped = json.createObjectNode();
            wrapped.set("event", event);
            RecordHeaders headers = new RecordHeaders();
            headers.add(CORRELATION_HEADER, saga.correlationId.getBytes(StandardCharsets.UTF_8));
            byte[] value;
            try {
                value = json.writeValueAsBytes(wrapped);
            } catch (Exception e) {
                throw new IllegalStateException("cannot serialise " + type, e);
            }
            context.forward(new Record<>(orderId, value, now, headers), topic);
        }

        private void deadLetter(String input, Record<String, byte[]> record, String reason) {
            RecordHeaders headers = new RecordHeaders(record.headers().toArray());
            headers.add("dlq.error.kind", reason.getBytes(StandardCharsets.UTF_8));
            context.recordMetadata().ifPresent(m -> {
                headers.add("dlq.source.topic", m.topic().getBytes(StandardCharsets.UTF_8));
                headers.add("dlq.source.partition", Integer.toString(m.partition()).getBytes(StandardCharsets.UTF_8));
                headers.add("dlq.source.offset", Long.toString(m.offset()).getBytes(StandardCharsets.UTF_8));
            });
            context.forward(new Record<>(record.key(), record.value(), record.timestamp(), headers), input + ".dlq");
        }

        private SagaState load(String orderId) {
            byte[] bytes = sagas.get(orderId);
            if (bytes == null) {
                return null;
            }
            try {
                return json.readValue(bytes, SagaState.class);
            } catch (Exception e) {
                throw new IllegalStateException("undecodable saga " + orderId, e);
            }
        }

        private void save(String orderId, SagaState saga) {
            try {
                sagas.put(orderId, json.writeValueAsBytes(saga));
            } catch (Exception e) {
                throw new IllegalStateException("unencodable saga " + orderId, e);
            }
        }

        private static Bytes timerKey(long at, String orderId) {
            byte[] id = orderId.getBytes(StandardCharsets.UTF_8);
            return Bytes.wrap(ByteBuffer.allocate(8 + id.length).putLong(at).put(id).array());
        }

        private static String text(JsonNode node, String field) {
            if (node == null) {
                return null;
            }
            JsonNode v = node.get(field);
            if (v == null || v.isNull()) {
                return null;
            }
            String s = v.asText();
            return s.isEmpty() ? null : s;
        }
    }
}

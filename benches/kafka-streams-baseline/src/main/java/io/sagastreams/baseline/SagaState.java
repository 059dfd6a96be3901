package io.sagastreams.baseline;

import java.util.ArrayDeque;
import java.util.Deque;

import com.fasterxml.jackson.databind.JsonNode;

/** One saga's state, stored as JSON in the {@code saga-store}. */
public final class SagaState {
    /** PENDING, PAYMENT_COMPLETED, COMPENSATING, COMPLETED, FAILED, REFUNDED. */
    public String status;
    /** The step whose reply is awaited (0 payment, 1 inventory), -1 when none. */
    public int awaiting = -1;
    /** True while the awaited reply is a compensation's confirmation. */
    public boolean compensating;
    /** When the awaited reply times out (epoch ms), 0 when nothing is awaited. */
    public long deadline;
    public String correlationId;
    public String userId;
    public double total;
    public String currency;
    public JsonNode items;
    public String paymentId;
    public String reservationId;
    public boolean paid;
    /** OrderCompleted or OrderCancelled was sent. */
    public boolean finished;
    public String cancelReason;
    /** Messages sent so far (part of each output's deterministic event id). */
    public int messages;
    /** Recent input event ids, for deduplication. */
    public Deque<String> seen = new ArrayDeque<>();

    static final int SEEN = 32;

    /** Remembers an event id; false when it was seen already. */
    boolean remember(String eventId) {
        if (seen.contains(eventId)) {
            return false;
        }
        seen.addLast(eventId);
        while (seen.size() > SEEN) {
            seen.removeFirst();
        }
        return true;
    }
}

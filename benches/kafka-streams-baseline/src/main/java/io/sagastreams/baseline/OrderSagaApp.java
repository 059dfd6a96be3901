package io.sagastreams.baseline;

import java.time.Duration;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;

import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.processor.StateRestoreListener;

/**
 * Runs the order saga on Kafka Streams.
 *
 * <pre>
 * java -jar kafka-streams-baseline.jar --bootstrap 127.0.0.1:19092 --application-id orders \
 *     --topic-prefix demo. --state-dir /tmp/ks-state [--step-timeout-ms 30000] [--threads 1] \
 *     [--caching true] [--cache-max-bytes 10485760] [--rocksdb-budget-bytes 67108864] \
 *     [--max-task-idle-ms 0]
 * </pre>
 *
 * {@code --caching} builds the stores with the record cache ({@code statestore.cache.max.bytes}
 * = {@code --cache-max-bytes}); {@code --rocksdb-budget-bytes} bounds all RocksDB stores together
 * ({@link BoundedRocksDb}; 0: Kafka Streams' defaults, 50 MiB of block cache per store and
 * unbounded memtables).
 *
 * Prints {@code STATE <new state> <epoch ms>} on every state change,
 * {@code RESTORING <store> <partition> <epoch ms>} when a store partition starts restoring and
 * {@code RESTORED <store> <partition> <records> <epoch ms>} when it is restored (the benchmark
 * waits for these), and stops cleanly on SIGTERM.
 */
public final class OrderSagaApp {
    private OrderSagaApp() {}

    public static void main(String[] args) throws InterruptedException {
        Map<String, String> opts = parse(args);
        String prefix = opts.getOrDefault("--topic-prefix", "");
        long timeoutMs = Long.parseLong(opts.getOrDefault("--step-timeout-ms", "30000"));

        Properties props = new Properties();
        props.put(StreamsConfig.APPLICATION_ID_CONFIG, require(opts, "--application-id"));
        props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, require(opts, "--bootstrap"));
        props.put(StreamsConfig.STATE_DIR_CONFIG, require(opts, "--state-dir"));
        props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        props.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, 100);
        props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, Integer.parseInt(opts.getOrDefault("--threads", "1")));
        props.put(StreamsConfig.MAX_TASK_IDLE_MS_CONFIG, Long.parseLong(opts.getOrDefault("--max-task-idle-ms", "0")));
        boolean caching = Boolean.parseBoolean(opts.getOrDefault("--caching", "true"));
        props.put(StreamsConfig.STATESTORE_CACHE_MAX_BYTES_CONFIG,
                Long.parseLong(opts.getOrDefault("--cache-max-bytes", "10485760")));
        long budget = Long.parseLong(opts.getOrDefault("--rocksdb-budget-bytes", "67108864"));
        if (budget > 0) {
            props.put(StreamsConfig.ROCKSDB_CONFIG_SETTER_CLASS_CONFIG, BoundedRocksDb.class);
            props.put(BoundedRocksDb.BUDGET_CONFIG, Long.toString(budget));
        }

        KafkaStreams streams = new KafkaStreams(OrderSaga.topology(prefix, timeoutMs, caching), props);
        CountDownLatch stopped = new CountDownLatch(1);
        streams.setStateListener((now, before) -> {
            System.out.println("STATE " + now + " " + System.currentTimeMillis());
            System.out.flush();
            if (now == KafkaStreams.State.NOT_RUNNING || now == KafkaStreams.State.ERROR) {
                stopped.countDown();
            }
        });
        streams.setGlobalStateRestoreListener(new StateRestoreListener() {
            @Override
            public void onRestoreStart(TopicPartition partition, String store, long start, long end) {
                System.out.println("RESTORING " + store + " " + partition.partition() + " " + System.currentTimeMillis());
                System.out.flush();
            }

            @Override
            public void onBatchRestored(TopicPartition partition, String store, long end, long restored) {}

            @Override
            public void onRestoreEnd(TopicPartition partition, String store, long restored) {
                System.out.println("RESTORED " + store + " " + partition.partition() + " " + restored
                        + " " + System.currentTimeMillis());
                System.out.flush();
            }
        });
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            streams.close(Duration.ofSeconds(30));
            stopped.countDown();
        }));
        streams.start();
        stopped.await();
    }

    private static String require(Map<String, String> opts, String name) {
        String v = opts.get(name);
        if (v == null) {
            System.err.println("missing " + name);
            System.exit(2);
        }
        return v;
    }

    private static Map<String, String> parse(String[] args) {
        Map<String, String> opts = new HashMap<>();
        for (int i = 0; i + 1 < args.length; i += 2) {
            opts.put(args[i], args[i + 1]);
        }
        return opts;
    }
}

package io.sagastreams.baseline;

import java.util.Map;

import org.apache.kafka.streams.state.RocksDBConfigSetter;
import org.rocksdb.BlockBasedTableConfig;
import org.rocksdb.Cache;
import org.rocksdb.LRUCache;
import org.rocksdb.Options;
import org.rocksdb.WriteBufferManager;

/**
 * Bounds the memory of every RocksDB store of the instance together, as the Kafka Streams
 * documentation recommends for production ("Bounded memory usage"): one LRU block cache shared by
 * all stores, holding the index and filter blocks too, and one write buffer manager whose
 * memtables are charged to that cache. The budget is {@value #BUDGET_CONFIG} (bytes, from the
 * streams properties); memtables may take half of it.
 */
public final class BoundedRocksDb implements RocksDBConfigSetter {
    static final String BUDGET_CONFIG = "saga.rocksdb.budget.bytes";

    private static Cache cache;
    private static WriteBufferManager writeBuffers;

    private static synchronized void share(long budget) {
        if (cache == null) {
            // A high-priority share keeps index and filter blocks from being evicted by data.
            cache = new LRUCache(budget, -1, false, 0.1);
            writeBuffers = new WriteBufferManager(budget / 2, cache);
        }
    }

    @Override
    public void setConfig(String storeName, Options options, Map<String, Object> configs) {
        share(Long.parseLong(String.valueOf(configs.get(BUDGET_CONFIG))));
        BlockBasedTableConfig table = (BlockBasedTableConfig) options.tableFormatConfig();
        table.setBlockCache(cache);
        table.setCacheIndexAndFilterBlocks(true);
        table.setCacheIndexAndFilterBlocksWithHighPriority(true);
        table.setPinTopLevelIndexAndFilter(true);
        options.setWriteBufferManager(writeBuffers);
        options.setTableFormatConfig(table);
    }

    @Override
    public void close(String storeName, Options options) {
        // The cache and the write buffer manager are shared by every store: never closed here.
    }
}

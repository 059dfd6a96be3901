//! The RocksDB [`StoreBackend`]: one database per task under `<state.dir>/<application.id>/<task>/`,
//! one column family per store, and a `checkpoints` column family holding, per store, the next
//! changelog offset to restore from. Data and checkpoints are written in one `WriteBatch`, which
//! RocksDB applies atomically across column families (through the WAL), so after any crash the
//! checkpoint describes exactly the data beside it.
//!
//! Restoration writes its batches without the WAL ([`StoreBackend::apply_restored`]): the
//! database flushes all column families atomically (`atomic_flush`), so whatever reaches disk
//! holds data and checkpoints of the same batches, and a crash loses unflushed restored data
//! only together with its checkpoint. The restore ends with a flush ([`StoreBackend::persist`])
//! before the task writes through the WAL again.
//!
//! Tasks share one block cache and one write-buffer manager ([`RocksResources`]) so that many tasks
//! on one instance stay within a fixed memory budget.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, Direction, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteBufferManager, WriteOptions, DB,
};

use super::{CommitBatch, Entries, ReadStore, StateError, StoreBackend};

const CHECKPOINTS: &str = "checkpoints";

fn store_cf(store: &str) -> String {
    format!("store.{store}")
}

/// Memory shared by every task's database on one instance.
#[derive(Clone)]
pub struct RocksResources {
    cache: Cache,
    write_buffers: WriteBufferManager,
}

impl RocksResources {
    /// `block_cache_bytes` for reads, `write_buffer_bytes` for all memtables together.
    pub fn new(block_cache_bytes: usize, write_buffer_bytes: usize) -> Self {
        let cache = Cache::new_lru_cache(block_cache_bytes);
        let write_buffers = WriteBufferManager::new_write_buffer_manager_with_cache(
            write_buffer_bytes,
            false,
            cache.clone(),
        );
        Self {
            cache,
            write_buffers,
        }
    }
}

impl Default for RocksResources {
    /// 64 MiB of block cache and 32 MiB of memtables per instance.
    fn default() -> Self {
        Self::new(64 << 20, 32 << 20)
    }
}

pub struct RocksBackend {
    /// Shared with the [`RocksReader`]s handed out for queries.
    db: Arc<DB>,
    path: PathBuf,
    /// The task's store names (each a column family `store.<name>`).
    stores: Vec<String>,
    write_options: WriteOptions,
}

impl RocksBackend {
    /// Opens (creating when missing) the database of one task with the given stores.
    pub fn open(
        path: &Path,
        stores: &[String],
        resources: &RocksResources,
    ) -> Result<Self, StateError> {
        std::fs::create_dir_all(path).map_err(|source| StateError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&resources.cache);
        // Most lookups are of sagas that do not exist yet (every start event): a bloom filter
        // answers them without reading a block. Filters and indexes live in the shared cache.
        table.set_bloom_filter(10.0, false);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        let mut cf_options = Options::default();
        cf_options.set_block_based_table_factory(&table);
        // Per column family; the shared write-buffer manager caps the total.
        cf_options.set_write_buffer_size(8 << 20);
        // Flushes write level 0 uncompressed (its files are compacted soon, and compressing them
        // cost restoration a seventh of its time); compactions compress. With dynamic level
        // sizes (the default) the second entry is the first level below L0, whichever that is.
        use rocksdb::DBCompressionType::{Lz4, None as Plain};
        cf_options.set_compression_per_level(&[Plain, Lz4, Lz4, Lz4, Lz4, Lz4, Lz4]);

        let mut db_options = cf_options.clone();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_write_buffer_manager(&resources.write_buffers);
        db_options.set_max_background_jobs(2);
        // Restored batches skip the WAL: column families must reach disk together.
        db_options.set_atomic_flush(true);

        let descriptors = std::iter::once(CHECKPOINTS.to_string())
            .chain(stores.iter().map(|s| store_cf(s)))
            .map(|name| ColumnFamilyDescriptor::new(name, cf_options.clone()));
        let db = DB::open_cf_descriptors(&db_options, path, descriptors).map_err(|source| {
            StateError::Rocks {
                context: format!("open {}", path.display()),
                source,
            }
        })?;
        Ok(Self {
            db: Arc::new(db),
            path: path.to_path_buf(),
            stores: stores.to_vec(),
            write_options: WriteOptions::default(),
        })
    }

    fn write_batch(&self, batch: CommitBatch, options: &WriteOptions) -> Result<(), StateError> {
        let mut write = WriteBatch::default();
        for (store, changes) in &batch.changes {
            let cf = self.cf(&store_cf(store))?;
            for (key, change) in changes {
                match change {
                    Some(value) => write.put_cf(cf, key, value),
                    None => write.delete_cf(cf, key),
                }
            }
        }
        let checkpoints = self.cf(CHECKPOINTS)?;
        for (store, offset) in &batch.checkpoints {
            write.put_cf(checkpoints, store.as_bytes(), offset.to_be_bytes());
        }
        self.db
            .write_opt(write, options)
            .map_err(|e| self.rocks_error("commit batch", e))
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StateError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| StateError::UnknownStore(name.trim_start_matches("store.").to_string()))
    }

    fn rocks_error(&self, operation: &str, source: rocksdb::Error) -> StateError {
        StateError::Rocks {
            context: format!("{operation} in {}", self.path.display()),
            source,
        }
    }
}

/// Reads committed data of a task's stores from another thread (the query endpoints).
pub struct RocksReader {
    db: Arc<DB>,
}

impl ReadStore for RocksReader {
    fn get(&self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let cf = self
            .db
            .cf_handle(&store_cf(store))
            .ok_or_else(|| StateError::UnknownStore(store.to_string()))?;
        self.db.get_cf(cf, key).map_err(|source| StateError::Rocks {
            context: format!("query get from '{store}'"),
            source,
        })
    }

    fn prefix(&self, store: &str, prefix: &[u8], limit: usize) -> Result<Entries, StateError> {
        let end = super::prefix_end(prefix);
        self.range(store, prefix, end.as_deref(), limit)
    }

    fn range(
        &self,
        store: &str,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StateError> {
        let cf = self
            .db
            .cf_handle(&store_cf(store))
            .ok_or_else(|| StateError::UnknownStore(store.to_string()))?;
        scan_cf(&self.db, cf, from, to, limit).map_err(|source| StateError::Rocks {
            context: format!("query scan of '{store}'"),
            source,
        })
    }
}

/// The first `limit` entries of `cf` with `from <= key` (and `key < to`), in key order.
fn scan_cf(
    db: &DB,
    cf: &rocksdb::ColumnFamily,
    from: &[u8],
    to: Option<&[u8]>,
    limit: usize,
) -> Result<Entries, rocksdb::Error> {
    let mut options = ReadOptions::default();
    if let Some(to) = to {
        options.set_iterate_upper_bound(to.to_vec());
    }
    let mut entries = Vec::new();
    for item in db
        .iterator_cf_opt(cf, options, IteratorMode::From(from, Direction::Forward))
        .take(limit)
    {
        let (key, value) = item?;
        entries.push((key.into_vec(), value.into_vec()));
    }
    Ok(entries)
}

impl StoreBackend for RocksBackend {
    fn reader(&self) -> Option<Arc<dyn ReadStore>> {
        Some(Arc::new(RocksReader {
            db: self.db.clone(),
        }))
    }

    fn get(&self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let cf = self.cf(&store_cf(store))?;
        self.db
            .get_cf(cf, key)
            .map_err(|e| self.rocks_error(&format!("get from '{store}'"), e))
    }

    fn scan(
        &self,
        store: &str,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StateError> {
        let cf = self.cf(&store_cf(store))?;
        scan_cf(&self.db, cf, from, to, limit)
            .map_err(|e| self.rocks_error(&format!("scan of '{store}'"), e))
    }

    fn apply(&mut self, batch: CommitBatch) -> Result<(), StateError> {
        fail::fail_point!("rocksdb-write", |_| Err(
            crate::runtime::failpoints::disk_full(&self.path.display().to_string())
        ));
        self.write_batch(batch, &self.write_options)
    }

    fn apply_restored(&mut self, batch: CommitBatch) -> Result<(), StateError> {
        fail::fail_point!("rocksdb-write", |_| Err(
            crate::runtime::failpoints::disk_full(&self.path.display().to_string())
        ));
        let mut unlogged = WriteOptions::default();
        unlogged.disable_wal(true);
        self.write_batch(batch, &unlogged)
    }

    fn persist(&mut self) -> Result<(), StateError> {
        fail::fail_point!("rocksdb-flush", |_| Err(
            crate::runtime::failpoints::disk_full(&self.path.display().to_string())
        ));
        let mut names: Vec<String> = vec![CHECKPOINTS.to_string()];
        names.extend(self.stores.iter().map(|s| store_cf(s)));
        let cfs = names
            .iter()
            .map(|n| self.cf(n))
            .collect::<Result<Vec<_>, _>>()?;
        self.db
            .flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())
            .map_err(|e| self.rocks_error("flush", e))
    }

    fn wipe(&mut self) -> Result<(), StateError> {
        // Every column family from its first key to its last, both included, in one batch.
        let mut names: Vec<String> = vec![CHECKPOINTS.to_string()];
        names.extend(self.stores.iter().map(|s| store_cf(s)));
        let mut write = WriteBatch::default();
        for name in &names {
            let cf = self.cf(name)?;
            let first = self.db.iterator_cf(cf, IteratorMode::Start).next();
            let last = self.db.iterator_cf(cf, IteratorMode::End).next();
            if let (Some(first), Some(last)) = (first, last) {
                let (first, _) = first.map_err(|e| self.rocks_error("wipe", e))?;
                let (last, _) = last.map_err(|e| self.rocks_error("wipe", e))?;
                write.delete_range_cf(cf, &first, &last);
                write.delete_cf(cf, &last);
            }
        }
        self.db
            .write_opt(write, &self.write_options)
            .map_err(|e| self.rocks_error("wipe", e))
    }

    fn checkpoint(&self, store: &str) -> Result<Option<i64>, StateError> {
        let cf = self.cf(CHECKPOINTS)?;
        let Some(bytes) = self
            .db
            .get_cf(cf, store.as_bytes())
            .map_err(|e| self.rocks_error("read checkpoint", e))?
        else {
            return Ok(None);
        };
        let bytes: [u8; 8] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| StateError::CorruptCheckpoint(store.to_string()))?;
        Ok(Some(i64::from_be_bytes(bytes)))
    }

    fn approximate_len(&self, store: &str) -> Result<u64, StateError> {
        let cf = self.cf(&store_cf(store))?;
        Ok(self
            .db
            .property_int_value_cf(cf, "rocksdb.estimate-num-keys")
            .map_err(|e| self.rocks_error("estimate keys", e))?
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn batch(store: &str, changes: &[(&str, Option<&str>)], checkpoint: i64) -> CommitBatch {
        let mut b = CommitBatch::default();
        b.changes.insert(
            store.to_string(),
            changes
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec())))
                .collect::<BTreeMap<_, _>>(),
        );
        b.checkpoints.insert(store.to_string(), checkpoint);
        b
    }

    #[test]
    fn data_and_checkpoint_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let resources = RocksResources::new(1 << 20, 1 << 20);
        let stores = vec!["counts".to_string()];
        {
            let mut db = RocksBackend::open(dir.path(), &stores, &resources).unwrap();
            assert_eq!(db.checkpoint("counts").unwrap(), None);
            db.apply(batch("counts", &[("a", Some("1")), ("b", Some("2"))], 7))
                .unwrap();
            db.apply(batch("counts", &[("a", None), ("c", Some("3"))], 9))
                .unwrap();
        }
        let db = RocksBackend::open(dir.path(), &stores, &resources).unwrap();
        assert_eq!(db.checkpoint("counts").unwrap(), Some(9));
        assert_eq!(db.get("counts", b"a").unwrap(), None);
        assert_eq!(db.get("counts", b"b").unwrap(), Some(b"2".to_vec()));
        let all = db.scan("counts", b"", None, usize::MAX).unwrap();
        assert_eq!(all.len(), 2);
        let bounded = db.scan("counts", b"b", Some(b"c"), usize::MAX).unwrap();
        assert_eq!(bounded, vec![(b"b".to_vec(), b"2".to_vec())]);
        let mut db = db;
        db.wipe().unwrap();
        assert_eq!(db.checkpoint("counts").unwrap(), None);
        assert!(db.scan("counts", b"", None, usize::MAX).unwrap().is_empty());
        assert!(matches!(
            db.get("nope", b"a"),
            Err(StateError::UnknownStore(_))
        ));
    }
}

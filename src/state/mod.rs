//! State stores: named key-value stores per task, with read-your-writes over an uncommitted
//! overlay and atomic application of the overlay plus the changelog checkpoints.
//!
//! The machinery: a [`StoreBackend`] holds the committed data of one task (all its stores and one
//! checkpoint per store). While a commit cycle is open, writes go to a [`PendingWrites`] overlay
//! per store; reads consult the overlay first. When the Kafka transaction that carried the
//! overlay's changelog records has committed, the runtime hands the overlays and the new
//! checkpoints to [`StoreBackend::apply`], which writes them in one atomic batch. If the
//! transaction aborts, the overlays are dropped. So local state is never ahead of Kafka.
//!
//! The backend trait knows nothing of RocksDB: [`rocks::RocksBackend`] is the production one,
//! [`memory::MemoryBackend`] serves unit tests.

pub mod memory;
pub mod rocks;

use std::collections::BTreeMap;
use std::ops::Bound;

/// Errors of the state layer.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// RocksDB refused an open, read or write; the message names the path or store.
    #[error("state store {context}: {source}")]
    Rocks {
        context: String,
        #[source]
        source: rocksdb::Error,
    },
    /// A store name that the task was not built with.
    #[error("unknown state store '{0}'")]
    UnknownStore(String),
    /// A checkpoint value that is not 8 bytes: the store directory is damaged.
    #[error("corrupt checkpoint for store '{0}'")]
    CorruptCheckpoint(String),
    /// Filesystem trouble around the state directory.
    #[error("state directory {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Key-value pairs in key order, as scans return them.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// One key's pending change: `Some(value)` to put, `None` to delete.
pub type Change = Option<Vec<u8>>;

/// What one commit applies to a task's backend: per store, the changed keys (last value wins) and
/// the changelog offset up to which the store is then applied.
#[derive(Debug, Default)]
pub struct CommitBatch {
    /// store name -> (key -> change)
    pub changes: BTreeMap<String, BTreeMap<Vec<u8>, Change>>,
    /// store name -> next changelog offset to restore from
    pub checkpoints: BTreeMap<String, i64>,
}

/// The committed data of one task: every store of the task and their checkpoints.
/// Read access to committed store data from another thread.
pub trait ReadStore: Send + Sync {
    fn get(&self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError>;
    /// Committed entries whose key starts with `prefix`, in key order, at most `limit`.
    fn prefix(&self, store: &str, prefix: &[u8], limit: usize) -> Result<Entries, StateError>;
    /// Committed entries with `from <= key` (and `key < to` when given), in key order, at most
    /// `limit`.
    fn range(
        &self,
        store: &str,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StateError>;
}

pub trait StoreBackend: Send {
    /// A handle that reads committed data from other threads, when the backend offers one.
    fn reader(&self) -> Option<std::sync::Arc<dyn ReadStore>> {
        None
    }

    /// The committed value of `key` in `store`.
    fn get(&self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError>;
    /// Committed entries of `store` with `from <= key` (and `key < to` when given), in key order,
    /// at most `limit` of them (the scan stops there: memory stays bounded).
    fn scan(
        &self,
        store: &str,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StateError>;
    /// Writes all changes and checkpoints of the batch atomically.
    fn apply(&mut self, batch: CommitBatch) -> Result<(), StateError>;
    /// [`StoreBackend::apply`] for restoration: the backend may leave these writes out of its
    /// write-ahead log. A crash may then lose them, but only together with the checkpoints
    /// written with them (the next restore reads them again); [`StoreBackend::persist`] makes them
    /// durable and must be called before any logged write follows.
    fn apply_restored(&mut self, batch: CommitBatch) -> Result<(), StateError> {
        self.apply(batch)
    }
    /// Makes every write so far durable.
    fn persist(&mut self) -> Result<(), StateError> {
        Ok(())
    }
    /// Deletes every store's data and checkpoint (the changelog no longer matches them).
    fn wipe(&mut self) -> Result<(), StateError>;
    /// The changelog offset to restore `store` from; `None` when the store has never been
    /// checkpointed (restore from the beginning).
    fn checkpoint(&self, store: &str) -> Result<Option<i64>, StateError>;
    /// Number of committed keys in `store` (an estimate is fine for metrics and logs).
    fn approximate_len(&self, store: &str) -> Result<u64, StateError>;
}

/// The uncommitted writes of one store during a commit cycle: the last change per key.
#[derive(Debug, Default, Clone)]
pub struct PendingWrites {
    changes: BTreeMap<Vec<u8>, Change>,
}

impl PendingWrites {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.changes.insert(key, Some(value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.changes.insert(key, None);
    }

    /// `Some(change)` when this cycle touched `key`.
    pub fn lookup(&self, key: &[u8]) -> Option<&Change> {
        self.changes.get(key)
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Vec<u8>, &Change)> {
        self.changes.iter()
    }

    pub fn take(&mut self) -> BTreeMap<Vec<u8>, Change> {
        std::mem::take(&mut self.changes)
    }

    pub fn clear(&mut self) {
        self.changes.clear();
    }

    /// Deletes in `[from, to)`: how many committed entries the overlay can hide there.
    pub fn deletes_in(&self, from: &[u8], to: Option<&[u8]>) -> usize {
        self.changes
            .range((Bound::Included(from.to_vec()), upper_bound(to)))
            .filter(|(_, change)| change.is_none())
            .count()
    }

    /// Merges committed entries with this overlay over `[from, to)` (overlay puts replace or
    /// add, overlay deletes hide) and keeps the first `limit`. `committed` holds the first
    /// `limit + deletes_in(from, to)` committed entries of the range (or all of them): each
    /// delete hides at most one, so the first `limit` merged entries are all among them.
    pub fn merge_scan(
        &self,
        committed: Vec<(Vec<u8>, Vec<u8>)>,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Entries {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = committed.into_iter().collect();
        for (key, change) in self
            .changes
            .range((Bound::Included(from.to_vec()), upper_bound(to)))
        {
            match change {
                Some(value) => merged.insert(key.clone(), value.clone()),
                None => merged.remove(key),
            };
        }
        merged.into_iter().take(limit).collect()
    }
}

fn upper_bound(to: Option<&[u8]>) -> Bound<Vec<u8>> {
    match to {
        Some(to) => Bound::Excluded(to.to_vec()),
        None => Bound::Unbounded,
    }
}

/// The smallest key greater than every key starting with `prefix`, or `None` when there is none
/// (the prefix is all 0xff bytes): the exclusive upper bound of a prefix scan.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn merge_scan_lets_the_overlay_win_and_hide() {
        let mut pending = PendingWrites::default();
        pending.put(b"b".to_vec(), b"B2".to_vec());
        pending.delete(b"c".to_vec());
        pending.put(b"d".to_vec(), b"D".to_vec());
        pending.put(b"z".to_vec(), b"Z".to_vec());
        let committed = vec![
            (b"a".to_vec(), b"A".to_vec()),
            (b"b".to_vec(), b"B".to_vec()),
            (b"c".to_vec(), b"C".to_vec()),
        ];
        let merged = pending.merge_scan(committed.clone(), b"a", Some(b"y"), usize::MAX);
        assert_eq!(
            merged,
            vec![
                (b"a".to_vec(), b"A".to_vec()),
                (b"b".to_vec(), b"B2".to_vec()),
                (b"d".to_vec(), b"D".to_vec()),
            ]
        );
        // With a limit of 2 the committed scan needs 2 + 1 (one delete) entries: a, b, c.
        assert_eq!(pending.deletes_in(b"a", Some(b"y")), 1);
        let limited = pending.merge_scan(committed, b"a", Some(b"y"), 2);
        assert_eq!(
            limited,
            vec![
                (b"a".to_vec(), b"A".to_vec()),
                (b"b".to_vec(), b"B2".to_vec()),
            ]
        );
    }
}

//! An in-memory [`StoreBackend`] with the same semantics as the RocksDB one, for unit tests.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::{CommitBatch, Entries, StateError, StoreBackend};

#[derive(Debug, Default, Clone)]
pub struct MemoryBackend {
    stores: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
    checkpoints: BTreeMap<String, i64>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }
}

impl StoreBackend for MemoryBackend {
    fn get(&self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.stores.get(store).and_then(|s| s.get(key).cloned()))
    }

    fn scan(
        &self,
        store: &str,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StateError> {
        let Some(entries) = self.stores.get(store) else {
            return Ok(Vec::new());
        };
        let upper = match to {
            Some(to) => Bound::Excluded(to.to_vec()),
            None => Bound::Unbounded,
        };
        Ok(entries
            .range((Bound::Included(from.to_vec()), upper))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&mut self, batch: CommitBatch) -> Result<(), StateError> {
        for (store, changes) in batch.changes {
            let entries = self.stores.entry(store).or_default();
            for (key, change) in changes {
                match change {
                    Some(value) => entries.insert(key, value),
                    None => entries.remove(&key),
                };
            }
        }
        self.checkpoints.extend(batch.checkpoints);
        Ok(())
    }

    fn wipe(&mut self) -> Result<(), StateError> {
        self.stores.clear();
        self.checkpoints.clear();
        Ok(())
    }

    fn checkpoint(&self, store: &str) -> Result<Option<i64>, StateError> {
        Ok(self.checkpoints.get(store).copied())
    }

    fn approximate_len(&self, store: &str) -> Result<u64, StateError> {
        Ok(self.stores.get(store).map_or(0, |s| s.len() as u64))
    }
}

//! What a running instance reports about itself: how many tasks it was assigned and how many run.
//! A cheap handle: clone it before handing the configuration to [`crate::runtime::run`] and read
//! it from any thread (readiness endpoints, the demo waiting for its components).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct RuntimeStatus(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    assigned: AtomicUsize,
    running: AtomicUsize,
}

impl RuntimeStatus {
    pub(crate) fn set(&self, assigned: usize, running: usize) {
        self.0.assigned.store(assigned, Ordering::Relaxed);
        self.0.running.store(running, Ordering::Relaxed);
    }

    /// Tasks (partition numbers) assigned to this instance.
    pub fn assigned_tasks(&self) -> usize {
        self.0.assigned.load(Ordering::Relaxed)
    }

    /// Tasks restored and processing.
    pub fn running_tasks(&self) -> usize {
        self.0.running.load(Ordering::Relaxed)
    }

    /// Assigned tasks exist and every one of them is restored and running.
    pub fn ready(&self) -> bool {
        let assigned = self.assigned_tasks();
        assigned > 0 && self.running_tasks() >= assigned
    }
}

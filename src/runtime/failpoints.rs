//! Named fault-injection points (the `fail` crate, as TiKV uses it). They exist only in builds
//! with the `failpoints` cargo feature (the test suite's); release builds compile them to nothing.
//!
//! A test arms them for a child process through `SAGA_STREAMS_FAILPOINTS`, in the `fail` crate's
//! syntax: `name=action;name=action`, where an action is `[N*]return(kind)` or `off`, chained
//! with `->`. `commit-transaction=1*return(timeout)` fails the next commit once with a timeout;
//! `seek=return` fails every seek; `rocksdb-write=2*off->1*return` fails the third batch write.
//!
//! | point | where | kinds |
//! |---|---|---|
//! | `send-offsets` | `send_offsets_to_transaction` | `timeout` (default), `abortable`, `fatal`, `unknown` |
//! | `commit-transaction` | `commit_transaction` | same |
//! | `commit-offsets` | the consumer's offset commit under at-least-once | same |
//! | `abort-transaction` | `abort_transaction` | same |
//! | `committed-offsets` | the committed-offsets lookup when a task starts | same |
//! | `seek` | seeking inputs (rewind after an abort, task start) | same |
//! | `rocksdb-write` | the RocksDB batch written after a commit | an I/O error (no space left) |
//! | `restore-batch` | a batch written while restoring a changelog | an I/O error (no space left) |
//! | `rocksdb-flush` | the flush that ends a restoration (its batches skip the WAL) | an I/O error (no space left) |
//! | `standby-write` | a standby replica's batch written from its changelog | an I/O error (no space left) |
//! | `resume-inputs` | resuming a started task's inputs | skipped: the inputs stay paused, as with a consumer that stopped fetching |

use super::error::{ErrorFacts, RuntimeError};
use rdkafka::error::RDKafkaErrorCode;

/// Reads `SAGA_STREAMS_FAILPOINTS` and arms the points it names. Without the `failpoints`
/// feature, refuses a non-empty setting rather than ignoring it silently.
pub fn setup_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var("SAGA_STREAMS_FAILPOINTS") else {
        return Ok(());
    };
    if spec.trim().is_empty() {
        return Ok(());
    }
    if !fail::has_failpoints() {
        return Err(
            "SAGA_STREAMS_FAILPOINTS is set but this build has no failpoints (build with --features failpoints)"
                .to_string(),
        );
    }
    for entry in spec.split(';').filter(|e| !e.trim().is_empty()) {
        let (name, action) = entry
            .split_once('=')
            .ok_or_else(|| format!("failpoint '{entry}' is not name=action"))?;
        fail::cfg(name.trim(), action.trim()).map_err(|e| format!("failpoint '{name}': {e}"))?;
        tracing::warn!(
            failpoint = name.trim(),
            action = action.trim(),
            "failpoint armed"
        );
    }
    Ok(())
}

/// The error an armed Kafka failpoint returns: a timeout (retriable), an error that requires an
/// abort, or a fatal one, as librdkafka would flag them.
pub fn kafka_error(operation: &'static str, kind: Option<String>) -> RuntimeError {
    let kind = kind.unwrap_or_default();
    let (code, facts) = match kind.as_str() {
        "abortable" => (
            RDKafkaErrorCode::InvalidTransactionalState,
            (false, false, true),
        ),
        "fatal" => (RDKafkaErrorCode::Fatal, (true, false, false)),
        "unknown" => (RDKafkaErrorCode::Unknown, (false, false, false)),
        _ => (RDKafkaErrorCode::OperationTimedOut, (false, true, false)),
    };
    RuntimeError::Injected {
        operation,
        facts: ErrorFacts {
            code: Some(code),
            is_fatal: facts.0,
            is_retriable: facts.1,
            txn_requires_abort: facts.2,
        },
    }
}

/// The error an armed storage failpoint returns: the disk is full.
pub fn disk_full(what: &str) -> crate::state::StateError {
    crate::state::StateError::Io {
        path: format!("{what} (injected)"),
        source: std::io::Error::from_raw_os_error(28),
    }
}

//! Errors of the runtime and the decision table of the exactly-once loop.
//!
//! librdkafka tells, for a transactional error, whether it is fatal, retriable, or requires an
//! abort. [`classify`] turns those facts into what the loop does; it is a pure function so the
//! table is unit-tested without a broker. [`ErrorFacts::of`] extracts the facts at the edge.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::state::StateError;

/// What the stream thread does about a failed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Call the same operation again (after a short backoff); the transaction stays open.
    Retriable,
    /// Abort the transaction, drop uncommitted state, rewind inputs to the committed offsets and
    /// go on. Used for a rebalance that changed the generation, a timed-out transaction, etc.
    Abortable,
    /// The producer is unusable (fenced by a newer instance, or a fatal librdkafka error): close
    /// the tasks without committing, build a new producer and consumer, rejoin the group.
    Fatal,
}

/// The facts about one librdkafka error that the decision needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorFacts {
    pub code: Option<RDKafkaErrorCode>,
    pub is_fatal: bool,
    pub is_retriable: bool,
    pub txn_requires_abort: bool,
}

impl ErrorFacts {
    pub fn of(error: &KafkaError) -> Self {
        match error {
            KafkaError::Transaction(e) => Self {
                code: Some(e.code()),
                is_fatal: e.is_fatal(),
                is_retriable: e.is_retriable(),
                txn_requires_abort: e.txn_requires_abort(),
            },
            other => Self {
                code: other.rdkafka_error_code(),
                is_fatal: false,
                is_retriable: false,
                txn_requires_abort: false,
            },
        }
    }
}

/// The decision table. Fatal wins over everything; then an explicit abort requirement; then
/// retriable. Codes that mean "a newer producer or group generation exists" are fatal even if
/// librdkafka did not flag them (a zombie must stop); codes that mean "the group moved on" are
/// abortable. Anything else is treated as abortable: aborting is always safe, at the cost of
/// reprocessing one cycle.
pub fn classify(facts: ErrorFacts) -> ErrorClass {
    use RDKafkaErrorCode::*;
    if facts.is_fatal {
        return ErrorClass::Fatal;
    }
    if matches!(
        facts.code,
        Some(ProducerFenced | InvalidProducerEpoch | Fenced | TransactionalIdAuthorizationFailed)
    ) {
        return ErrorClass::Fatal;
    }
    if facts.txn_requires_abort {
        return ErrorClass::Abortable;
    }
    if facts.is_retriable {
        return ErrorClass::Retriable;
    }
    ErrorClass::Abortable
}

/// What to do after `commit_transaction` failed. Unlike other calls, a commit cannot simply be
/// aborted: once the coordinator may have received the commit, librdkafka refuses an abort and
/// only a repeated commit (or a new producer) learns the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitDecision {
    /// The transaction did not commit and can be aborted: abort, rewind, go on.
    Abort,
    /// The commit goes on in the background (a timeout): call `commit_transaction` again.
    Retry,
    /// The producer is fenced or broken, or the outcome cannot be known: close the tasks without
    /// applying the cycle (state may only be behind) and rebuild.
    Rebuild,
}

/// The commit decision table (pure; unit-tested).
pub fn on_commit_error(facts: ErrorFacts) -> CommitDecision {
    use RDKafkaErrorCode::*;
    if classify(facts) == ErrorClass::Fatal {
        return CommitDecision::Rebuild;
    }
    if facts.txn_requires_abort {
        return CommitDecision::Abort;
    }
    if facts.is_retriable
        || matches!(
            facts.code,
            Some(OperationTimedOut | RequestTimedOut | CoordinatorLoadInProgress)
        )
    {
        return CommitDecision::Retry;
    }
    CommitDecision::Rebuild
}

/// Errors that stop the runtime or one of its operations.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The configuration cannot work; every problem is listed.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Config(Vec<String>),
    /// The topics do not fit the topology (missing, different partition counts, ...).
    #[error("topics do not fit the topology:\n  - {}", .0.join("\n  - "))]
    Topics(Vec<String>),
    /// A Kafka operation failed; `operation` names it.
    #[error("kafka {operation}: {source}")]
    Kafka {
        operation: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error(transparent)]
    State(#[from] StateError),
    /// The consumer group is not in a state to commit (no metadata yet, mid-rebalance).
    #[error("consumer group: {0}")]
    Group(String),
    /// The processor refused a record or a punctuation in a way it cannot recover from.
    #[error("processor: {0}")]
    Processor(String),
    /// A commit whose outcome is unknown (the coordinator did not answer in time, or shutdown
    /// came first): local state must not follow it, and the inputs cannot be rewound to a known
    /// point, so the stream thread closes its tasks and rebuilds; restoration from the changelog
    /// then finds whatever Kafka really committed.
    #[error("commit outcome unknown: {0}")]
    CommitOutcomeUnknown(String),
    /// The inputs could not be sought back to the committed offsets after an abort: processing
    /// on would skip records, so the consumer and producer are rebuilt.
    #[error("rewind failed: {0}")]
    RewindFailed(String),
    /// The transaction of an aborted cycle could not be aborted for a minute: a new producer
    /// (whose `init_transactions` aborts it) is the way out.
    #[error("abort failed: {0}")]
    AbortFailed(String),
    /// A Kafka client stopped making progress while the cluster answers others (librdkafka can
    /// keep a partition without a leader forever after a broker was fenced, or fail every
    /// lookup): new clients are the way out.
    #[error("kafka client stuck: {0}")]
    ClientStuck(String),
    /// Shutdown was requested while waiting.
    #[error("interrupted by shutdown while {0}")]
    Interrupted(&'static str),
    /// The cluster refused this client: its credentials, or an ACL it needs. New clients would
    /// be refused the same way, so the runtime stops, naming the principal, the listener and
    /// what was refused.
    #[error("the Kafka cluster refused this client: {0}")]
    Denied(String),
    /// An armed failpoint (test builds only).
    #[error("kafka {operation}: injected failure ({facts:?})")]
    Injected {
        operation: &'static str,
        facts: ErrorFacts,
    },
}

/// What a refusal code means, when the cluster refused the client (credentials or ACLs).
pub fn refusal(code: RDKafkaErrorCode) -> Option<&'static str> {
    use RDKafkaErrorCode::*;
    Some(match code {
        Authentication | SaslAuthenticationFailed => "authentication failed",
        // A TLS handshake the broker or this client refuses: an untrusted certificate.
        SSL => "TLS handshake refused",
        GroupAuthorizationFailed => "not authorized to Read the consumer group",
        TopicAuthorizationFailed => "not authorized on a topic",
        TransactionalIdAuthorizationFailed => "not authorized to Write the transactional id",
        ClusterAuthorizationFailed => "not authorized on the cluster",
        _ => return None,
    })
}

impl RuntimeError {
    /// A client that cannot be built from its settings (an unknown property, a CA file that
    /// cannot be read): no retry helps. The message names the property, not its value.
    pub fn misconfigured(&self) -> Option<String> {
        match self {
            RuntimeError::Kafka {
                source: KafkaError::ClientConfig(_, desc, key, _),
                ..
            } => Some(if crate::runtime::client::is_secret(key) {
                format!("librdkafka property {key}: not accepted")
            } else {
                format!("librdkafka property {key}: {desc}")
            }),
            RuntimeError::Kafka {
                source: KafkaError::ClientCreation(why),
                operation,
            } => Some(format!("{operation}: {why}")),
            _ => None,
        }
    }

    /// The refusal code of this error, when the cluster refused the client.
    pub fn refusal_code(&self) -> Option<RDKafkaErrorCode> {
        self.facts()
            .and_then(|f| f.code)
            .filter(|code| refusal(*code).is_some())
    }

    pub fn kafka(operation: &'static str) -> impl FnOnce(KafkaError) -> RuntimeError {
        move |source| RuntimeError::Kafka { operation, source }
    }

    /// The librdkafka facts of a Kafka error (or an injected one).
    pub fn facts(&self) -> Option<ErrorFacts> {
        match self {
            RuntimeError::Kafka { source, .. } => Some(ErrorFacts::of(source)),
            RuntimeError::Injected { facts, .. } => Some(*facts),
            _ => None,
        }
    }

    /// How the loop reacts to this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            RuntimeError::Kafka { source, .. } => classify(ErrorFacts::of(source)),
            RuntimeError::Injected { facts, .. } => classify(*facts),
            RuntimeError::CommitOutcomeUnknown(_)
            | RuntimeError::RewindFailed(_)
            | RuntimeError::AbortFailed(_)
            | RuntimeError::ClientStuck(_)
            | RuntimeError::Interrupted(_) => ErrorClass::Fatal,
            // State and processor errors leave the open transaction in an unknown state: abort it.
            RuntimeError::State(_) | RuntimeError::Processor(_) | RuntimeError::Group(_) => {
                ErrorClass::Abortable
            }
            RuntimeError::Config(_) | RuntimeError::Topics(_) | RuntimeError::Denied(_) => {
                ErrorClass::Fatal
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RDKafkaErrorCode::*;

    fn facts(code: RDKafkaErrorCode, fatal: bool, retriable: bool, abort: bool) -> ErrorFacts {
        ErrorFacts {
            code: Some(code),
            is_fatal: fatal,
            is_retriable: retriable,
            txn_requires_abort: abort,
        }
    }

    #[test]
    fn fatal_flag_wins_over_everything() {
        assert_eq!(
            classify(facts(RequestTimedOut, true, true, true)),
            ErrorClass::Fatal
        );
    }

    #[test]
    fn fencing_codes_are_fatal_even_unflagged() {
        for code in [ProducerFenced, InvalidProducerEpoch, Fenced] {
            assert_eq!(
                classify(facts(code, false, false, true)),
                ErrorClass::Fatal,
                "{code:?}"
            );
        }
    }

    #[test]
    fn rebalance_during_offset_commit_is_abortable() {
        for code in [IllegalGeneration, UnknownMemberId, RebalanceInProgress] {
            assert_eq!(
                classify(facts(code, false, false, true)),
                ErrorClass::Abortable,
                "{code:?}"
            );
        }
    }

    #[test]
    fn abort_requirement_wins_over_retriable() {
        assert_eq!(
            classify(facts(RequestTimedOut, false, true, true)),
            ErrorClass::Abortable
        );
    }

    #[test]
    fn retriable_alone_is_retried() {
        assert_eq!(
            classify(facts(CoordinatorLoadInProgress, false, true, false)),
            ErrorClass::Retriable
        );
    }

    #[test]
    fn commit_errors_retry_abort_or_rebuild() {
        assert_eq!(
            on_commit_error(facts(RequestTimedOut, false, true, false)),
            CommitDecision::Retry
        );
        // The flush inside commit_transaction timing out: no flags, a timeout code.
        assert_eq!(
            on_commit_error(facts(OperationTimedOut, false, false, false)),
            CommitDecision::Retry
        );
        assert_eq!(
            on_commit_error(facts(IllegalGeneration, false, false, true)),
            CommitDecision::Abort
        );
        assert_eq!(
            on_commit_error(facts(ProducerFenced, false, false, true)),
            CommitDecision::Rebuild
        );
        // Anything else leaves the outcome unknown: never guess that it did not commit.
        assert_eq!(
            on_commit_error(facts(Unknown, false, false, false)),
            CommitDecision::Rebuild
        );
    }

    #[test]
    fn unknown_errors_abort() {
        assert_eq!(
            classify(facts(Unknown, false, false, false)),
            ErrorClass::Abortable
        );
        let none = ErrorFacts {
            code: None,
            is_fatal: false,
            is_retriable: false,
            txn_requires_abort: false,
        };
        assert_eq!(classify(none), ErrorClass::Abortable);
    }
}

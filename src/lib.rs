//! saga-streams: a Kafka Streams-style saga orchestrator.
//!
//! # Layout
//!
//! - [`cli`]: the command line (`saga-streams <subcommand>`); the binary only calls
//!   [`cli::main`].
//! - [`telemetry`]: logging set-up (`tracing`).
//! - [`runtime`]: the generic Kafka Streams-style engine: processor API, tasks, the exactly-once
//!   commit cycle, rebalance and restoration.
//! - [`state`]: the state-store backend trait, its RocksDB and in-memory implementations, and the
//!   uncommitted overlay that gives read-your-writes.
//! - [`saga`]: topology files, the pure saga state machine, and the saga processor.
//! - [`codec`]: the message contract (JSON envelope, wrapped or flat bodies, headers).
//! - [`sim`]: demo participants, the load generator and the auditor.
//! - [`ops`]: operators' tools shared by the command line and the inspector (dead letters).
//!
//! `ARCHITECTURE.md` at the repository root keeps the code map and the invariants.

pub mod cli;
pub mod codec;
pub mod ops;
pub mod runtime;
pub mod saga;
pub mod sim;
pub mod state;
pub mod telemetry;

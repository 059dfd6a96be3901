//! saga-streams: a Kafka Streams-style saga orchestrator.
//!
//! # Layout
//!
//! - [`cli`]: the command line (`saga-streams <subcommand>`); the binary only calls
//!   [`cli::main`].
//! - [`telemetry`]: logging set-up (`tracing`).
//!
//! The streams runtime (`runtime/`, `state/`), the saga (`saga/`), the codecs (`codec/`) and the
//! demo participants (`sim/`) join this map as they land; `ARCHITECTURE.md` at the repository root keeps the code map and the invariants.

pub mod cli;
pub mod telemetry;

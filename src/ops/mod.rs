//! Tools for operators that talk to Kafka directly, shared by the command line and the
//! inspector's HTTP endpoints.
//!
//! - [`dlq`]: dead letters: read, filter, replay with a loop guard.

pub mod dlq;

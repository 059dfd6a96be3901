//! The streams runtime: a generic Kafka Streams-style engine. It knows nothing about sagas.
//!
//! - [`processor`]: the `Processor` trait and its context (stores, outputs, punctuation).
//! - [`task`]: one task per partition number; timestamp-ordered input queues.
//! - [`engine`]: the tasks, the transactional producer and the commit cycle.
//! - [`stream_thread`]: the poll loop, rebalance callbacks, shutdown, rebuild after fatal errors.
//! - [`restore`]: changelog replay from a store's checkpoint.
//! - [`status`]: assigned and running task counts, readable from any thread.
//! - [`control`]: single keyed writes on request (operators' actions to the control topic).
//! - [`topics`]: start-up checks of input and changelog topics.
//! - [`config`], [`error`]: settings, and the fatal/abortable/retriable decision table.
//! - [`failpoints`]: named fault-injection points (test builds only).
//! - [`input_ends`]: the inputs' high watermarks, read on a thread of their own, from which a
//!   task knows up to what time it has consumed its inputs.
//! - [`watchdog`]: bounds blocking client calls librdkafka does not bound itself.

pub mod client;
pub mod config;
pub mod control;
pub mod engine;
pub mod error;
pub mod failpoints;
pub mod input_ends;
pub mod members;
pub mod partitioner;
pub mod processor;
pub mod restore;
pub mod secrets;
pub mod standby;
pub mod status;
pub mod stream_thread;
pub mod task;
pub mod topics;
pub mod watchdog;

pub use config::{Guarantee, RuntimeConfig};
pub use error::{ErrorClass, RuntimeError};
pub use processor::{
    InputRecord, OutputRecord, Processor, ProcessorContext, ProcessorError, ProcessorSupplier,
    Store,
};
pub use restore::EofContext;
pub use status::RuntimeStatus;
pub use stream_thread::{run, Shutdown};

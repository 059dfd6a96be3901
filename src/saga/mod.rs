//! The saga: topology file -> validated definition -> pure state machine -> processor.
//!
//! - [`topology`]: the YAML topology files and their validation (every problem, with its line).
//! - [`machine`]: the pure `(SagaRecord, SagaInput) -> (SagaRecord, outputs)` function.
//! - [`processor`]: the machine on the streams runtime: store, timers, dedupe, dead letters.
//! - [`query`]: `/sagas/{id}`: a saga's state from the committed store of the task that owns it.
//! - [`describe`]: the state machine as text and as a Mermaid diagram.
//!
//! This module never touches rdkafka: Kafka is the runtime's business.

pub mod describe;
pub mod machine;
pub mod processor;
pub mod query;
pub mod topology;

pub use machine::SagaRecord;
pub use processor::{SagaProcessor, SAGA_STORE};
pub use topology::SagaDefinition;

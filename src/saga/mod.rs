//! The saga: topology file -> validated definition -> pure state machine -> processor.
//!
//! - [`topology`]: the YAML topology files and their validation (every problem, with its line),
//!   with the earlier versions live sagas still run under.
//! - [`contract`]: the message contract: envelope, checks, dead-letter reasons, headers, bodies.
//! - [`contract_export`]: the contract as JSON Schema per message and as an AsyncAPI document.
//! - [`machine`]: the pure `(SagaRecord, SagaInput) -> (SagaRecord, outputs)` function.
//! - [`record`]: how a saga record is stored (binary, versioned; earlier JSON versions read).
//! - [`processor`]: the machine on the streams runtime: store, timers, dedupe, dead letters,
//!   the quarantine of unreadable records.
//! - [`query`]: `/sagas/{id}` and `/quarantine` from the committed stores of this instance.
//! - [`actions`]: operators' actions (retry, cancel, resume) as control topic records.
//! - [`describe`]: the state machine as text and as a Mermaid diagram.
//!
//! Dependencies run one way: `saga -> codec -> runtime`. This module never touches rdkafka: Kafka
//! is the runtime's business, wire formats the codec's.

pub mod actions;
pub mod contract;
pub mod contract_export;
pub mod describe;
pub mod machine;
pub mod processor;
pub mod query;
pub mod record;
pub mod topology;

pub use machine::SagaRecord;
pub use processor::{SagaProcessor, SAGA_STORE};
pub use topology::SagaDefinition;

//! Message formats: the JSON contract (flat or wrapped bodies, the envelope, correlation headers).
//! Avro through a Schema Registry joins here.

pub mod json;

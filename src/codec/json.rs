//! JSON bodies on the wire: flat, or wrapped as `{"event": {...}}` the way junges/laravel-kafka
//! services publish them. What the fields mean is the saga's contract (`saga::contract`).

use serde_json::{Map, Value};

use super::{BadValue, BadValueKind};

/// The event object of a message body: the value of `event` when the body is wrapped, else the
/// body itself.
pub fn unwrap_body(body: Value) -> Option<Map<String, Value>> {
    match body {
        Value::Object(mut map) => {
            if !map.contains_key("event_type") {
                if let Some(Value::Object(inner)) = map.remove("event") {
                    return Some(inner);
                }
            }
            Some(map)
        }
        _ => None,
    }
}

/// Parses a JSON record value into the event object (unwrapped from `{"event": ...}`).
pub fn read_body(bytes: &[u8]) -> Result<Map<String, Value>, BadValue> {
    let body: Value = serde_json::from_slice(bytes)
        .map_err(|e| BadValue::new(BadValueKind::InvalidJson, format!("not JSON: {e}")))?;
    unwrap_body(body)
        .ok_or_else(|| BadValue::new(BadValueKind::InvalidJson, "the body is not a JSON object"))
}

/// Serialises a message body, wrapped as `{"event": {...}}` when `wrap` is set.
pub fn encode_body(map: Map<String, Value>, wrap: bool) -> Vec<u8> {
    let value = if wrap {
        let mut outer = Map::new();
        outer.insert("event".into(), Value::Object(map));
        Value::Object(outer)
    } else {
        Value::Object(map)
    };
    // A `Value` made of maps, strings and numbers always serialises.
    serde_json::to_vec(&value).unwrap_or_default()
}

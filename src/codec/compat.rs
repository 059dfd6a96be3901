//! Schema compatibility the way a registry judges it, explained field by field.
//!
//! Whether one schema can read data written with another is decided by apache-avro's
//! `SchemaCompatibility::can_read` (the Avro specification's resolution rules); this module adds
//! the registry's levels (BACKWARD, FORWARD, FULL, their TRANSITIVE forms, NONE), splits topic
//! subjects' unions into their records, and names the field that breaks.

use std::collections::BTreeMap;

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use serde_json::{Map, Value};

/// A compatibility level of a registry subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// New schemas must read data written with older ones.
    pub backward: bool,
    /// Older schemas must read data written with new ones.
    pub forward: bool,
    /// Against every registered version, not only the latest.
    pub transitive: bool,
}

impl Level {
    pub fn parse(text: &str) -> Result<Level, String> {
        let upper = text.to_ascii_uppercase();
        let (base, transitive) = match upper.strip_suffix("_TRANSITIVE") {
            Some(base) => (base.to_string(), true),
            None => (upper.clone(), false),
        };
        let (backward, forward) = match base.as_str() {
            "BACKWARD" => (true, false),
            "FORWARD" => (false, true),
            "FULL" => (true, true),
            "NONE" if !transitive => (false, false),
            _ => {
                return Err(format!(
                    "unknown compatibility level '{text}' ({})",
                    super::registry::LEVELS.join(", ")
                ))
            }
        };
        Ok(Level {
            backward,
            forward,
            transitive,
        })
    }
}

/// One thing that breaks between two schema texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// `Record.field`, or `Record` when a whole record is missing.
    pub path: String,
    pub message: String,
}

/// What breaks when data written with `writer` is read with `reader` (both full schema texts:
/// a record or a union of records). Empty: compatible.
pub fn breaks(writer: &str, reader: &str) -> Result<Vec<Break>, String> {
    let writer_json: Value = serde_json::from_str(writer).map_err(|e| format!("not JSON: {e}"))?;
    let reader_json: Value = serde_json::from_str(reader).map_err(|e| format!("not JSON: {e}"))?;
    let writers = records(&writer_json)?;
    let readers = records(&reader_json)?;
    let reader_is_union = reader_json.is_array();
    let mut found = Vec::new();
    for (name, w) in &writers {
        let Some(r) = readers.get(name) else {
            found.push(Break {
                path: short(name),
                message: if reader_is_union || readers.len() > 1 {
                    format!("the reading schema has no record {name}")
                } else {
                    format!(
                        "the record is named {name} in one and {} in the other",
                        readers.keys().next().cloned().unwrap_or_default()
                    )
                },
            });
            continue;
        };
        found.extend(record_breaks(name, w, r)?);
    }
    Ok(found)
}

/// Each record of a schema (one, or the union's), self-contained (named types it refers to that
/// another branch defines are written out in place), by full name.
fn records(schema: &Value) -> Result<BTreeMap<String, Value>, String> {
    let branches: Vec<&Value> = match schema {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let mut names = BTreeMap::new();
    for branch in &branches {
        collect_names(branch, None, &mut names);
    }
    let mut out = BTreeMap::new();
    for branch in branches {
        let Some(name) = full_name(branch, None) else {
            return Err(format!("a union member is not a named record: {branch}"));
        };
        let mut defined = std::collections::BTreeSet::new();
        out.insert(name, inline(branch.clone(), None, &names, &mut defined));
    }
    Ok(out)
}

/// The full name of a named type definition (record, enum, fixed) found in `namespace`.
pub(crate) fn full_name(v: &Value, namespace: Option<&str>) -> Option<String> {
    let map = v.as_object()?;
    if !matches!(
        map.get("type").and_then(Value::as_str),
        Some("record" | "enum" | "fixed")
    ) {
        return None;
    }
    let name = map.get("name")?.as_str()?;
    if name.contains('.') {
        return Some(name.to_string());
    }
    match map.get("namespace").and_then(Value::as_str).or(namespace) {
        Some(ns) if !ns.is_empty() => Some(format!("{ns}.{name}")),
        _ => Some(name.to_string()),
    }
}

/// The namespace a named type's full name gives the types inside it.
pub(crate) fn namespace_of(full: &str) -> Option<String> {
    full.rsplit_once('.').map(|(ns, _)| ns.to_string())
}

/// Rewrites every type position directly inside a type's JSON object (`items`, `values`, `type`,
/// and each field's `type`) with `f(child, namespace)`.
pub(crate) fn map_children(
    map: &mut Map<String, Value>,
    namespace: Option<&str>,
    f: &mut dyn FnMut(Value, Option<&str>) -> Value,
) {
    for key in ["items", "values", "type"] {
        if let Some(child) = map.remove(key) {
            map.insert(key.into(), f(child, namespace));
        }
    }
    if let Some(Value::Array(fields)) = map.remove("fields") {
        let fields = fields
            .into_iter()
            .map(|field| match field {
                Value::Object(mut field) => {
                    if let Some(t) = field.remove("type") {
                        field.insert("type".into(), f(t, namespace));
                    }
                    Value::Object(field)
                }
                other => other,
            })
            .collect();
        map.insert("fields".into(), Value::Array(fields));
    }
}

fn collect_names(v: &Value, namespace: Option<&str>, names: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(map) => {
            let mut ns = namespace.map(str::to_string);
            if let Some(full) = full_name(v, namespace) {
                names.entry(full.clone()).or_insert_with(|| v.clone());
                ns = namespace_of(&full);
            }
            for key in ["fields", "items", "values", "type"] {
                if let Some(child) = map.get(key) {
                    collect_names(child, ns.as_deref(), names);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_names(item, namespace, names);
            }
        }
        _ => {}
    }
}

/// Writes out references to named types defined elsewhere (once per record).
fn inline(
    v: Value,
    namespace: Option<&str>,
    names: &BTreeMap<String, Value>,
    defined: &mut std::collections::BTreeSet<String>,
) -> Value {
    match v {
        Value::String(s) => {
            let full = if s.contains('.') {
                s.clone()
            } else {
                namespace.map(|ns| format!("{ns}.{s}")).unwrap_or(s.clone())
            };
            match names.get(&full) {
                Some(def) if !defined.contains(&full) => inline(def.clone(), None, names, defined),
                _ => Value::String(s),
            }
        }
        Value::Object(mut map) => {
            let mut ns = namespace.map(str::to_string);
            if let Some(full) = full_name(&Value::Object(map.clone()), namespace) {
                defined.insert(full.clone());
                ns = namespace_of(&full);
                // Keep the full name, so the record reads the same wherever it is placed.
                map.insert("name".into(), Value::String(full));
                map.remove("namespace");
            }
            map_children(&mut map, ns.as_deref(), &mut |child, ns| {
                inline(child, ns, names, defined)
            });
            Value::Object(map)
        }
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|i| inline(i, namespace, names, defined))
                .collect(),
        ),
        other => other,
    }
}

fn parse(v: &Value) -> Result<Schema, String> {
    Schema::parse(v).map_err(|e| format!("not an Avro schema: {e}"))
}

fn fields(record: &Value) -> Vec<Map<String, Value>> {
    record
        .get("fields")
        .and_then(Value::as_array)
        .map(|f| f.iter().filter_map(|x| x.as_object().cloned()).collect())
        .unwrap_or_default()
}

fn field_name(f: &Map<String, Value>) -> &str {
    f.get("name").and_then(Value::as_str).unwrap_or_default()
}

fn type_text(t: Option<&Value>) -> String {
    match t {
        Some(Value::Object(m)) => match (m.get("type"), m.get("name")) {
            (Some(Value::String(kind)), Some(Value::String(name))) => format!("{kind} {name}"),
            (Some(Value::String(kind)), _) => match kind.as_str() {
                "array" => format!("array of {}", type_text(m.get("items"))),
                "map" => format!("map of {}", type_text(m.get("values"))),
                _ => kind.clone(),
            },
            _ => "?".into(),
        },
        Some(Value::Array(items)) => format!(
            "union [{}]",
            items
                .iter()
                .map(|i| type_text(Some(i)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(Value::String(s)) => s.clone(),
        _ => "?".into(),
    }
}

fn record_breaks(name: &str, writer: &Value, reader: &Value) -> Result<Vec<Break>, String> {
    let (w, r) = (parse(writer)?, parse(reader)?);
    if SchemaCompatibility::can_read(&w, &r).is_ok() {
        return Ok(Vec::new());
    }
    let record = short(name);
    let writer_fields = fields(writer);
    let mut found = Vec::new();
    for rf in fields(reader) {
        let field = field_name(&rf).to_string();
        let path = format!("{record}.{field}");
        let aliases: Vec<&str> = rf
            .get("aliases")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let wf = writer_fields
            .iter()
            .find(|wf| field_name(wf) == field || aliases.contains(&field_name(wf)));
        match wf {
            None if !rf.contains_key("default") => found.push(Break {
                path,
                message: format!(
                    "field '{field}' ({}) is read but not written, and has no default",
                    type_text(rf.get("type"))
                ),
            }),
            None => {}
            Some(wf) => {
                let one = |f: &Map<String, Value>| {
                    let mut single = f.clone();
                    single.remove("default");
                    serde_json::json!({"type": "record", "name": name, "fields": [single]})
                };
                let (ws, rs) = (parse(&one(wf))?, parse(&one(&rf))?);
                if SchemaCompatibility::can_read(&ws, &rs).is_err() {
                    found.push(Break {
                        path,
                        message: format!(
                            "field '{field}' is written as {} and cannot be read as {}",
                            type_text(wf.get("type")),
                            type_text(rf.get("type"))
                        ),
                    });
                }
            }
        }
    }
    if found.is_empty() {
        let e = SchemaCompatibility::can_read(&w, &r)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        found.push(Break {
            path: record,
            message: e,
        });
    }
    Ok(found)
}

fn short(full: &str) -> String {
    full.rsplit('.').next().unwrap_or(full).to_string()
}

/// One registered version the local schema is compared with.
#[derive(Debug, Clone)]
pub struct Against<'a> {
    pub version: u32,
    pub id: u32,
    pub schema: &'a str,
}

/// A problem between the local schema and one registered version, in the direction named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub version: u32,
    /// `backward` (the local schema cannot read that version's data) or `forward` (that version
    /// cannot read the local schema's data).
    pub direction: &'static str,
    pub broken: Break,
}

/// Checks `local` against the registered versions under `level` (`versions` oldest first; the
/// latest is the last).
pub fn check(level: Level, local: &str, versions: &[Against<'_>]) -> Result<Vec<Problem>, String> {
    let targets: &[Against<'_>] = if level.transitive {
        versions
    } else {
        versions.last().map(std::slice::from_ref).unwrap_or(&[])
    };
    let mut problems = Vec::new();
    for old in targets {
        if level.backward {
            for broken in breaks(old.schema, local)? {
                problems.push(Problem {
                    version: old.version,
                    direction: "backward",
                    broken,
                });
            }
        }
        if level.forward {
            for broken in breaks(local, old.schema)? {
                problems.push(Problem {
                    version: old.version,
                    direction: "forward",
                    broken,
                });
            }
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(dir: &str, file: &str) -> String {
        std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(dir)
                .join(file),
        )
        .unwrap()
    }

    const V1: &str =
        r#"{"type":"record","name":"E","namespace":"x","fields":[{"name":"a","type":"string"}]}"#;

    fn version_1() -> [Against<'static>; 1] {
        [Against {
            version: 1,
            id: 1,
            schema: V1,
        }]
    }

    fn with(field: &str) -> String {
        V1.replace(
            r#"{"name":"a","type":"string"}"#,
            &format!(r#"{{"name":"a","type":"string"}},{field}"#),
        )
    }

    #[test]
    fn the_shipped_second_versions_are_fully_compatible() {
        for (v1, v2) in [
            (
                "io.sagastreams.order.OrderCreated.v1.avsc",
                "io.sagastreams.order.OrderCreated.v2.avsc",
            ),
            (
                "io.sagastreams.payment.PaymentSucceeded.v1.avsc",
                "io.sagastreams.payment.PaymentSucceeded.v2.avsc",
            ),
        ] {
            let (old, new) = (schema("schemas", v1), schema("schemas", v2));
            assert_eq!(breaks(&old, &new).unwrap(), vec![], "{v2} reads {v1}");
            assert_eq!(breaks(&new, &old).unwrap(), vec![], "{v1} reads {v2}");
        }
    }

    #[test]
    fn a_new_field_without_default_breaks_backward_only() {
        let v2 = with(r#"{"name":"coupon","type":"string"}"#);
        let problems = check(Level::parse("BACKWARD").unwrap(), &v2, &version_1()).unwrap();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].broken.path, "E.coupon");
        assert!(
            problems[0].broken.message.contains("no default"),
            "{problems:?}"
        );
        assert!(check(Level::parse("FORWARD").unwrap(), &v2, &version_1())
            .unwrap()
            .is_empty());
        let with_default = with(r#"{"name":"coupon","type":"string","default":""}"#);
        assert!(
            check(Level::parse("FULL").unwrap(), &with_default, &version_1())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_removed_field_without_default_breaks_forward_only() {
        let v2 = with(r#"{"name":"b","type":"long"}"#);
        let registered = [Against {
            version: 2,
            id: 2,
            schema: &v2,
        }];
        // The local schema drops `b`: it still reads version 2's data...
        assert!(check(Level::parse("BACKWARD").unwrap(), V1, &registered)
            .unwrap()
            .is_empty());
        // ...but version 2 readers need `b`, which new data lacks.
        let problems = check(Level::parse("FORWARD").unwrap(), V1, &registered).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            (problems[0].direction, problems[0].broken.path.as_str()),
            ("forward", "E.b")
        );
    }

    #[test]
    fn a_type_change_names_the_field_and_transitive_checks_every_version() {
        let v2 = V1.replace(r#""type":"string""#, r#""type":"int""#);
        let v3 = V1.replace(r#""type":"string""#, r#""type":"long""#);
        let versions = [
            Against {
                version: 1,
                id: 1,
                schema: V1,
            },
            Against {
                version: 2,
                id: 2,
                schema: &v2,
            },
        ];
        // int -> long is a promotion: fine against v2, not against v1 (string).
        assert!(check(Level::parse("BACKWARD").unwrap(), &v3, &versions)
            .unwrap()
            .is_empty());
        let problems = check(Level::parse("BACKWARD_TRANSITIVE").unwrap(), &v3, &versions).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].version, 1);
        assert!(
            problems[0].broken.message.contains("written as string"),
            "{problems:?}"
        );
    }

    #[test]
    fn unions_are_compared_record_by_record() {
        let item = r#"{"type":"record","name":"I","namespace":"x","fields":[{"name":"s","type":"string"}]}"#;
        let a = format!(
            r#"{{"type":"record","name":"A","namespace":"x","fields":[{{"name":"i","type":{item}}}]}}"#
        );
        let b =
            r#"{"type":"record","name":"B","namespace":"x","fields":[{"name":"i","type":"x.I"}]}"#;
        let b2 = r#"{"type":"record","name":"B","namespace":"x","fields":[{"name":"i","type":"x.I"},{"name":"n","type":"int"}]}"#;
        let old = format!("[{a},{b}]");
        let new = format!("[{a},{b2}]");
        let found = breaks(&old, &new).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, "B.n");
        assert_eq!(breaks(&new, &old).unwrap(), vec![]);
        let only_a = format!("[{a}]");
        assert_eq!(breaks(&old, &only_a).unwrap()[0].path, "B");
        assert!(Level::parse("SIDEWAYS").is_err());
    }
}

//! The local Avro schemas (`schemas/`) and the registry subjects a topology's Avro topics use.
//!
//! Each file holds one record, named `<record full name>.v<N>.avsc`: the record-name subject and its
//! version. A topic's subject under the topic-name strategy is `<topic>-value`; its schema is the
//! topic's one record, or the union of its records (in the topology's order) when it carries
//! several event types. Under the record-name strategy each record is a subject of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use apache_avro::Schema;
use serde_json::Value;

use super::compat::{full_name, map_children, namespace_of};
use super::{Format, SubjectStrategy, TopicSet};

/// One schema file.
#[derive(Debug, Clone)]
pub struct SchemaFile {
    /// `namespace.Name`.
    pub full_name: String,
    /// `Name`: the event type.
    pub name: String,
    pub version: u32,
    pub path: PathBuf,
    pub json: Value,
    pub schema: Schema,
}

/// Every schema file of a directory, by event type and version.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    pub dir: PathBuf,
    files: BTreeMap<String, BTreeMap<u32, SchemaFile>>,
}

impl Catalogue {
    /// Reads every `*.avsc` of `dir`, reporting every problem at once.
    pub fn load(dir: &Path) -> Result<Catalogue, Vec<String>> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            vec![format!(
                "{}: cannot read the schema directory: {e}",
                dir.display()
            )]
        })?;
        let mut problems = Vec::new();
        let mut catalogue = Catalogue {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
            .collect();
        paths.sort();
        for path in paths {
            match read_file(&path) {
                Ok(file) => {
                    let versions = catalogue.files.entry(file.name.clone()).or_default();
                    if let Some(other) = versions.values().find(|f| f.full_name != file.full_name) {
                        problems.push(format!(
                            "{}: record name '{}' is also used by {} ({}): event types must be unique",
                            path.display(),
                            file.name,
                            other.path.display(),
                            other.full_name
                        ));
                        continue;
                    }
                    versions.insert(file.version, file);
                }
                Err(problem) => problems.push(problem),
            }
        }
        if problems.is_empty() {
            Ok(catalogue)
        } else {
            Err(problems)
        }
    }

    /// The newest version of an event type's schema.
    pub fn latest(&self, event_type: &str) -> Option<&SchemaFile> {
        self.files
            .get(event_type)
            .and_then(|v| v.values().next_back())
    }

    /// Every version of an event type's schema, oldest first.
    pub fn versions(&self, event_type: &str) -> Vec<&SchemaFile> {
        self.files
            .get(event_type)
            .map(|v| v.values().collect())
            .unwrap_or_default()
    }
}

fn read_file(path: &Path) -> Result<SchemaFile, String> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let (stem, version) = file_name
        .strip_suffix(".avsc")
        .and_then(|s| s.rsplit_once(".v"))
        .and_then(|(stem, v)| v.parse::<u32>().ok().map(|v| (stem, v)))
        .ok_or_else(|| {
            format!(
                "{}: the file name must be <record full name>.v<version>.avsc",
                path.display()
            )
        })?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let schema =
        Schema::parse(&json).map_err(|e| format!("{}: not an Avro schema: {e}", path.display()))?;
    let Schema::Record(record) = &schema else {
        return Err(format!("{}: the schema must be a record", path.display()));
    };
    let full_name = record.name.fullname(None);
    if full_name != stem {
        return Err(format!(
            "{}: the record is named '{full_name}' but the file says '{stem}'",
            path.display()
        ));
    }
    Ok(SchemaFile {
        name: record.name.name().to_string(),
        full_name,
        version,
        path: path.to_path_buf(),
        json,
        schema,
    })
}

/// A registry subject of the topology with the local schema it should hold.
#[derive(Debug, Clone)]
pub struct Subject {
    pub name: String,
    /// The topics that use it.
    pub topics: Vec<String>,
    /// The event types it covers, in union order.
    pub types: Vec<String>,
    /// The files it is made of.
    pub files: Vec<PathBuf>,
    /// The schema as registered (canonical JSON text).
    pub text: String,
    pub schema: Schema,
}

/// The subject of `topic`'s records of `event_type` under `strategy`.
pub fn subject_name(strategy: SubjectStrategy, topic: &str, file: &SchemaFile) -> String {
    match strategy {
        SubjectStrategy::TopicName => format!("{topic}-value"),
        SubjectStrategy::RecordName => file.full_name.clone(),
    }
}

/// The subjects of every Avro topic of the topology (inputs and outputs; DLQs keep the original
/// bytes and have none), built from the newest local version of each record.
pub fn subjects(def: &TopicSet, catalogue: &Catalogue) -> Result<Vec<Subject>, Vec<String>> {
    subjects_with(def, |t| catalogue.latest(t))
}

/// Like [`subjects`], with the record of each event type chosen by `pick`.
pub fn subjects_with<'a>(
    def: &TopicSet,
    pick: impl Fn(&str) -> Option<&'a SchemaFile>,
) -> Result<Vec<Subject>, Vec<String>> {
    let mut problems = Vec::new();
    let mut subjects: BTreeMap<String, Subject> = BTreeMap::new();
    for (topic, format) in &def.topics {
        let Format::Avro(strategy) = *format else {
            continue;
        };
        let mut files = Vec::new();
        for event_type in def.types_on(topic) {
            match pick(&event_type) {
                Some(file) => files.push(file),
                None => problems.push(format!(
                    "topic '{topic}' is avro but there is no schema for {event_type} ({})",
                    def.schemas_dir
                        .as_ref()
                        .map(|d| d.display().to_string())
                        .unwrap_or_else(|| "no schema directory given".into())
                )),
            }
        }
        if files.is_empty() {
            continue;
        }
        let groups: Vec<Vec<&SchemaFile>> = match strategy {
            SubjectStrategy::TopicName => vec![files],
            SubjectStrategy::RecordName => files.into_iter().map(|f| vec![f]).collect(),
        };
        for group in groups {
            let name = subject_name(strategy, topic, group[0]);
            if let Some(existing) = subjects.get_mut(&name) {
                existing.topics.push(topic.clone());
                continue;
            }
            match compose(&group) {
                Ok((text, schema)) => {
                    subjects.insert(
                        name.clone(),
                        Subject {
                            name,
                            topics: vec![topic.clone()],
                            types: group.iter().map(|f| f.name.clone()).collect(),
                            files: group.iter().map(|f| f.path.clone()).collect(),
                            text,
                            schema,
                        },
                    );
                }
                Err(e) => problems.push(format!("subject {name}: {e}")),
            }
        }
    }
    if problems.is_empty() {
        Ok(subjects.into_values().collect())
    } else {
        Err(problems)
    }
}

/// One record as it is, or several as a union in which each named type is defined once.
fn compose(files: &[&SchemaFile]) -> Result<(String, Schema), String> {
    let json = if files.len() == 1 {
        files[0].json.clone()
    } else {
        let mut defined = BTreeSet::new();
        Value::Array(
            files
                .iter()
                .map(|f| define_once(f.json.clone(), None, &mut defined))
                .collect(),
        )
    };
    let schema = Schema::parse(&json).map_err(|e| e.to_string())?;
    // The full text, docs and defaults included (the canonical form drops them).
    Ok((json.to_string(), schema))
}

/// Replaces the second and later definitions of a named type by a reference to the first.
fn define_once(value: Value, namespace: Option<&str>, defined: &mut BTreeSet<String>) -> Value {
    match value {
        Value::Object(mut map) => {
            let mut ns = namespace.map(str::to_string);
            if let Some(full) = full_name(&Value::Object(map.clone()), namespace) {
                if !defined.insert(full.clone()) {
                    return Value::String(full);
                }
                ns = namespace_of(&full);
            }
            map_children(&mut map, ns.as_deref(), &mut |child, ns| {
                define_once(child, ns, defined)
            });
            Value::Object(map)
        }
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| define_once(v, namespace, defined))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Wrong.v1.avsc"),
            r#"{"type":"record","name":"a.B","fields":[]}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("noversion.avsc"), "{}").unwrap();
        let problems = Catalogue::load(dir.path()).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().any(|p| p.contains("named 'a.B'")),
            "{problems:?}"
        );
    }
}

//! What every Kafka client of a command is built from: the bootstrap servers and any librdkafka
//! properties (security settings, timeouts, tuning), the same for the stream thread, the producer,
//! the restore consumer, the admin client and every tool (`lag`, `load`, `audit`, `simulate`).
//!
//! Secret values (passwords, keys, tokens) may come from files (`sasl.password_file`): they are
//! read when the settings are resolved, and never shown: `Debug` and [`KafkaSettings::masked`]
//! print `***` in their place.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::secrets::read_secret;

use rdkafka::config::ClientConfig;

/// The suffix of a property whose value is read from a file: `sasl.password_file`.
pub const FILE_SUFFIX: &str = "_file";

/// Bootstrap servers and librdkafka properties, secrets resolved.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaSettings {
    pub bootstrap: String,
    properties: BTreeMap<String, String>,
    /// Properties whose value came from a file, and the file (re-read on rotation).
    files: BTreeMap<String, PathBuf>,
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("bootstrap", &self.bootstrap)
            .field("properties", &self.masked())
            .finish()
    }
}

/// Whether a librdkafka property holds a secret: its value is never shown.
pub fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "token",
        "key.pem",
        "private",
        "oauthbearer.config",
    ]
    .iter()
    .any(|s| name.contains(s))
        || name == "ssl.key"
}

impl KafkaSettings {
    /// Settings with the bootstrap servers alone (a plaintext listener).
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            ..Self::default()
        }
    }

    /// Adds `name=value`; `<property>_file=PATH` reads the property's value from the file (its
    /// content without the trailing newline). Later settings of a name replace earlier ones.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let name = name.trim();
        if name.is_empty() {
            return Err("an empty property name".into());
        }
        if name == "bootstrap.servers" {
            return Err(
                "bootstrap.servers is set with --bootstrap (SAGA_STREAMS_BOOTSTRAP, or `bootstrap` in the configuration file)"
                    .into(),
            );
        }
        match name.strip_suffix(FILE_SUFFIX) {
            Some(property) => {
                let path = PathBuf::from(value);
                let secret = read_secret(property, &path)?;
                self.properties.insert(property.to_string(), secret);
                self.files.insert(property.to_string(), path);
            }
            None => {
                self.properties.insert(name.to_string(), value.to_string());
                self.files.remove(name);
            }
        }
        Ok(())
    }

    /// Reads every secret file again (rotation); on any failure nothing changes.
    pub fn reread_files(&mut self) -> Result<(), String> {
        let mut fresh = Vec::new();
        for (property, path) in &self.files {
            fresh.push((property.clone(), read_secret(property, path)?));
        }
        self.properties.extend(fresh);
        Ok(())
    }

    /// Checks every property with librdkafka (known name, valid value); the problems name the
    /// property, never a secret's value.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for (name, value) in &self.properties {
            let mut one = ClientConfig::new();
            one.set(name, value);
            if let Err(rdkafka::error::KafkaError::ClientConfig(_, desc, _, _)) =
                one.create_native_config()
            {
                problems.push(if is_secret(name) {
                    format!("librdkafka property {name}: not accepted")
                } else {
                    format!("librdkafka property {name}: {desc}")
                });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// Properties whose value came from a file, and the file.
    pub fn files(&self) -> &BTreeMap<String, PathBuf> {
        &self.files
    }

    /// Every property with its real value, secrets included: for building clients only.
    pub fn properties(&self) -> &BTreeMap<String, String> {
        &self.properties
    }

    /// Every property, secrets replaced by `***`, files named: safe to print.
    pub fn masked(&self) -> BTreeMap<String, String> {
        self.properties
            .iter()
            .map(|(name, value)| {
                let shown = match (self.files.get(name), is_secret(name)) {
                    (Some(path), _) => format!("*** (from {})", path.display()),
                    (None, true) => "***".to_string(),
                    (None, false) => value.clone(),
                };
                (name.clone(), shown)
            })
            .collect()
    }
}

/// Anything a Kafka client can be configured from: the full [`KafkaSettings`], or bootstrap
/// servers alone (`&str`, `String`: a plaintext listener, as the tests use).
pub trait KafkaClients {
    /// A client configuration with the bootstrap servers and every property set.
    fn client_config(&self) -> ClientConfig;
}

impl KafkaClients for KafkaSettings {
    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (name, value) in &self.properties {
            config.set(name, value);
        }
        config.set("bootstrap.servers", &self.bootstrap);
        config
    }
}

impl KafkaClients for str {
    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self);
        config
    }
}

impl KafkaClients for String {
    fn client_config(&self) -> ClientConfig {
        self.as_str().client_config()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_files_and_are_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret-value\n").unwrap();
        let mut settings = KafkaSettings::new("127.0.0.1:9092");
        settings.set("security.protocol", "SASL_SSL").unwrap();
        settings
            .set("sasl.password_file", file.to_str().unwrap())
            .unwrap();
        settings.set("ssl.key.password", "inline-secret").unwrap();
        assert_eq!(settings.properties()["sasl.password"], "s3cret-value");
        let shown = format!("{settings:?} {:?}", settings.masked());
        assert!(
            !shown.contains("s3cret-value") && !shown.contains("inline-secret"),
            "{shown}"
        );
        assert!(shown.contains("SASL_SSL"), "{shown}");
        // Rotation: the file changes, the value follows.
        std::fs::write(&file, "rotated\n").unwrap();
        settings.reread_files().unwrap();
        assert_eq!(settings.properties()["sasl.password"], "rotated");
        // A file that cannot be read is named, its content never.
        let err = settings
            .set("sasl.password_file", "/nonexistent/secret")
            .unwrap_err();
        assert!(err.contains("/nonexistent/secret"), "{err}");
        assert!(settings.set("bootstrap.servers", "x").is_err());
    }
}

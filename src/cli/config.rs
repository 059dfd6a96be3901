//! One configuration model for every command: a configuration file (`--config FILE`, TOML or
//! YAML), environment variables, and flags, in that order of precedence.
//!
//! Every flag `--some-flag` has the environment variable `SAGA_STREAMS_SOME_FLAG` (added to the
//! command tree by [`with_env_vars`]), and the file's key `some_flag` (or `some-flag`) gives its
//! value when neither the flag nor the variable does: the file's values become the variables'
//! defaults before the command line is parsed. librdkafka properties are the file's `kafka:` table,
//! `SAGA_STREAMS_KAFKA_<PROPERTY>` variables (dots as underscores: `SAGA_STREAMS_KAFKA_SASL_MECHANISM`;
//! `..._FILE` reads the value from a file) and `--kafka-config name=value` flags, in that order.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

use crate::runtime::client::{is_secret, KafkaSettings, FILE_SUFFIX};

/// The prefix of every environment variable of saga-streams.
pub const ENV_PREFIX: &str = "SAGA_STREAMS_";
/// The prefix of the variables that set librdkafka properties.
pub const KAFKA_ENV_PREFIX: &str = "SAGA_STREAMS_KAFKA_";
/// The variable that names the configuration file (like `--config`).
pub const CONFIG_ENV: &str = "SAGA_STREAMS_CONFIG";

/// Variables read under their older names when the new one is unset.
const ALIASES: &[(&str, &str)] = &[
    ("KAFKA_BOOTSTRAP", "SAGA_STREAMS_BOOTSTRAP"),
    ("SCHEMA_REGISTRY_URL", "SAGA_STREAMS_SCHEMA_REGISTRY_URL"),
];

/// Flags that take no environment variable: handled otherwise, or meaningless as a setting.
const NO_ENV: &[&str] = &["help", "version", "config", "kafka-config"];

/// What the configuration file held.
#[derive(Debug, Default, Clone)]
pub struct FileConfig {
    pub path: Option<PathBuf>,
    /// Setting name (as in the file) -> value, lists joined with commas.
    pub settings: BTreeMap<String, String>,
    /// The `kafka:` table.
    pub kafka: BTreeMap<String, String>,
    /// The variables whose values came from the file (not set in the environment).
    pub applied: BTreeSet<String>,
}

static FILE: OnceLock<FileConfig> = OnceLock::new();

/// The configuration file loaded at start-up (empty when there is none).
pub fn file() -> &'static FileConfig {
    FILE.get_or_init(FileConfig::default)
}

/// The environment variable of a flag.
pub fn env_name(long: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        long.replace('-', "_").to_ascii_uppercase()
    )
}

/// Gives every flag of `command` and its subcommands its `SAGA_STREAMS_...` variable (the
/// OpenTelemetry flags keep their standard names). Repeatable flags split a variable's value at
/// commas.
pub fn with_env_vars(command: clap::Command) -> clap::Command {
    let command = command.mut_args(|arg| {
        let Some(long) = arg.get_long().map(str::to_string) else {
            return arg;
        };
        // The OpenTelemetry flags keep their standard OTEL_EXPORTER_OTLP_... names.
        if NO_ENV.contains(&long.as_str()) || long.starts_with("otlp-") {
            return arg;
        }
        let repeatable = matches!(arg.get_action(), clap::ArgAction::Append);
        // Values of variables are never printed in help (a variable may hold a secret).
        let arg = arg.env(env_name(&long)).hide_env_values(true);
        if repeatable {
            arg.value_delimiter(',')
        } else {
            arg
        }
    });
    let names: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    // `demo` runs on the local stack with its own defaults; it keeps its own variables.
    names
        .into_iter()
        .filter(|name| name != "demo")
        .fold(command, |command, name| {
            command.mut_subcommand(name, with_env_vars)
        })
}

/// Every environment variable the command tree reads.
pub fn known_env_vars(command: &clap::Command) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = command
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    for sub in command.get_subcommands() {
        names.extend(known_env_vars(sub));
    }
    names
}

/// The file named by `--config FILE` (or `--config=FILE`) in `argv`, else by `SAGA_STREAMS_CONFIG`.
fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut args = argv.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os(CONFIG_ENV).map(PathBuf::from)
}

/// Reads a configuration file: TOML (`.toml`) or YAML (anything else).
pub fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("configuration file {}: {e}", path.display()))?;
    let value: Value = if path.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).map_err(|e| {
            // The error's own text quotes the line, which may hold a secret.
            let line = e.span().map_or(0, |s| {
                text[..s.start.min(text.len())].lines().count().max(1)
            });
            format!("{}:{line}: {}", path.display(), e.message())
        })?
    } else {
        marked_yaml::from_yaml(0, &text).map_err(|e| format!("{}: {e}", path.display()))?
    };
    let Value::Object(top) = value else {
        return Err(format!("{}: expected a table of settings", path.display()));
    };
    let mut file = FileConfig {
        path: Some(path.to_path_buf()),
        ..FileConfig::default()
    };
    for (key, value) in top {
        if key == "kafka" {
            let Value::Object(properties) = value else {
                return Err(format!(
                    "{}: `kafka` must be a table of librdkafka properties",
                    path.display()
                ));
            };
            for (name, value) in properties {
                let text = scalar(&value).ok_or_else(|| {
                    format!("{}: kafka.{name} must be a single value", path.display())
                })?;
                file.kafka.insert(name, text);
            }
            continue;
        }
        let text = match &value {
            Value::Array(items) => items
                .iter()
                .map(|v| {
                    scalar(v).ok_or_else(|| {
                        format!("{}: {key}: a list of single values", path.display())
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            other => scalar(other)
                .ok_or_else(|| format!("{}: {key} must be a value or a list", path.display()))?,
        };
        file.settings.insert(key, text);
    }
    Ok(file)
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Before the command line is parsed: reads the configuration file (if any) and makes its values
/// the defaults of the environment variables `command` knows, and applies the older variable
/// names. An unknown key in the file is an error.
pub fn prepare(argv: &[OsString], command: &clap::Command) -> Result<(), String> {
    for (old, new) in ALIASES {
        if std::env::var_os(new).is_none() {
            if let Some(value) = std::env::var_os(old) {
                std::env::set_var(new, value);
            }
        }
    }
    let Some(path) = config_path(argv) else {
        return Ok(());
    };
    let mut file = read_file(&path)?;
    let known = known_env_vars(command);
    let mut unknown = Vec::new();
    for (key, value) in &file.settings {
        let name = env_name(key);
        if !known.contains(&name) {
            unknown.push(key.clone());
            continue;
        }
        if std::env::var_os(&name).is_none() {
            std::env::set_var(&name, value);
            file.applied.insert(name);
        }
    }
    if !unknown.is_empty() {
        return Err(format!(
            "{}: unknown settings: {} (a setting is a flag's name, e.g. application_id for --application-id; librdkafka properties go under `kafka:`)",
            path.display(),
            unknown.join(", ")
        ));
    }
    // Set once, before any command runs.
    let _ = FILE.set(file);
    Ok(())
}

/// The librdkafka properties of the environment: `SAGA_STREAMS_KAFKA_SASL_MECHANISM=...` is
/// `sasl.mechanism`, `SAGA_STREAMS_KAFKA_SASL_PASSWORD_FILE=...` is `sasl.password_file`.
pub fn kafka_env() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(name, value)| {
            let (name, value) = (name.into_string().ok()?, value.into_string().ok()?);
            let rest = name.strip_prefix(KAFKA_ENV_PREFIX)?.to_ascii_lowercase();
            let property = match rest.strip_suffix(FILE_SUFFIX) {
                Some(p) => format!("{}{FILE_SUFFIX}", p.replace('_', ".")),
                None => rest.replace('_', "."),
            };
            Some((property, value))
        })
        .collect()
}

/// The Kafka settings of a command: the file's `kafka:` table, then the environment, then
/// `--kafka-config` flags.
pub fn kafka_settings(
    bootstrap: &str,
    flags: &[(String, String)],
) -> Result<KafkaSettings, String> {
    let mut settings = KafkaSettings::new(bootstrap);
    let mut problems = Vec::new();
    let env = kafka_env();
    let all = file()
        .kafka
        .iter()
        .map(|(k, v)| ("configuration file", k, v))
        .chain(env.iter().map(|(k, v)| ("environment", k, v)))
        .chain(flags.iter().map(|(k, v)| ("--kafka-config", k, v)));
    for (source, name, value) in all {
        if name.is_empty() {
            problems.push(format!(
                "{source}: '{}' is not NAME=VALUE, e.g. security.protocol=SASL_SSL",
                mask_value(value)
            ));
            continue;
        }
        if let Err(e) = settings.set(name, value) {
            problems.push(format!("{source}: {e}"));
        }
    }
    if problems.is_empty() {
        settings.validate()?;
        Ok(settings)
    } else {
        Err(problems.join("\n"))
    }
}

/// Parses `name=value` for `--kafka-config`. Never fails here (clap would print the value in its
/// error): a malformed one is reported, masked, by [`kafka_settings`].
pub fn parse_property(s: &str) -> Result<(String, String), String> {
    Ok(match s.split_once('=') {
        Some((name, value)) => (name.trim().to_string(), value.to_string()),
        None => (String::new(), s.to_string()),
    })
}

/// `s` with anything after a `=` hidden when the name looks secret.
fn mask_value(s: &str) -> String {
    match s.split_once('=') {
        Some((name, _)) if is_secret(name) => format!("{name}=***"),
        _ if is_secret(s) => "***".into(),
        _ => s.to_string(),
    }
}

/// The value of a setting for display: secrets (by name) masked, credentials in URLs removed.
pub fn shown(name: &str, value: &str) -> String {
    if is_secret(name) {
        return "***".into();
    }
    mask_url(value)
}

/// A URL with any `user:password@` replaced by `***@`.
pub fn mask_url(value: &str) -> String {
    let start = value.find("://").map_or(0, |i| i + 3);
    let end = value[start..]
        .find(['/', '?', '#'])
        .map_or(value.len(), |i| start + i);
    match value[start..end].rfind('@') {
        Some(at) => format!("{}***{}", &value[..start], &value[start + at..]),
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_in_both_formats_read_alike() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("c.yaml");
        std::fs::write(
            &yaml,
            "application_id: orders\nstep-timeout: [payment=5s, inventory=7s]\nkafka:\n  security.protocol: SASL_SSL\n  sasl.password_file: /run/secrets/p\n",
        )
        .unwrap();
        let toml = dir.path().join("c.toml");
        std::fs::write(
            &toml,
            "application_id = \"orders\"\nstep-timeout = [\"payment=5s\", \"inventory=7s\"]\n[kafka]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.password_file\" = \"/run/secrets/p\"\n",
        )
        .unwrap();
        for path in [yaml, toml] {
            let file = read_file(&path).unwrap();
            assert_eq!(file.settings["application_id"], "orders");
            assert_eq!(file.settings["step-timeout"], "payment=5s,inventory=7s");
            assert_eq!(file.kafka["security.protocol"], "SASL_SSL");
            assert_eq!(file.kafka["sasl.password_file"], "/run/secrets/p");
            assert_eq!(env_name("step-timeout"), "SAGA_STREAMS_STEP_TIMEOUT");
        }
    }

    #[test]
    fn every_flag_of_every_command_but_demo_has_its_variable() {
        use clap::CommandFactory;
        let command = with_env_vars(super::super::Cli::command());
        for sub in command.get_subcommands().filter(|c| c.get_name() != "demo") {
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if NO_ENV.contains(&long) || long.starts_with("otlp-") || long == "config" {
                    continue;
                }
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                assert_eq!(env, Some(env_name(long)), "{} --{long}", sub.get_name());
            }
        }
    }

    #[test]
    fn secrets_and_credentials_are_masked() {
        assert_eq!(
            mask_url("https://user:pw@registry:8081/apis"),
            "https://***@registry:8081/apis"
        );
        assert_eq!(mask_url("http://registry:8081"), "http://registry:8081");
        assert_eq!(mask_url("https://u:p@ss@host/x@y"), "https://***@host/x@y");
        assert_eq!(mask_url("u:pw@host:1"), "***@host:1");
        assert_eq!(shown("sasl.password", "pw"), "***");
        assert_eq!(mask_value("sasl.password=pw"), "sasl.password=***");
        assert_eq!(
            kafka_settings("b", &[parse_property("sasl.password:pw").unwrap()]).unwrap_err(),
            "--kafka-config: 'sasl.password:pw' is not NAME=VALUE, e.g. security.protocol=SASL_SSL"
                .replace("sasl.password:pw", "***")
        );
        let err = kafka_settings("b", &[("sasl.pasword".into(), "pw".into())]).unwrap_err();
        assert!(
            err.contains("sasl.pasword") && !err.contains("pw\""),
            "{err}"
        );
    }
}

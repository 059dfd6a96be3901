//! The configuration model through the binary: a configuration file (YAML or TOML), environment
//! variables and flags, in that order of precedence; librdkafka properties for every client;
//! secrets from files, never shown.

mod common;

use std::process::Command;
use std::time::Duration;

use common::saga_env::SagaEnv;
use common::BinProcess;

/// Runs the binary with `args` and `env` (no other `SAGA_STREAMS_` variable); (exit code, stdout,
/// stderr).
fn saga_streams(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_saga-streams"));
    command.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (name, _) in std::env::vars() {
        if name.starts_with("SAGA_STREAMS_")
            || name == "KAFKA_BOOTSTRAP"
            || name == "SCHEMA_REGISTRY_URL"
        {
            command.env_remove(name);
        }
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().expect("running saga-streams");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_show_layers_file_environment_and_flags_and_masks_every_secret() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "pw-9f3a61c2-never-shown";
    let password = dir.path().join("sasl-password");
    std::fs::write(&password, format!("{secret}\n")).unwrap();
    let yaml = dir.path().join("saga.yaml");
    std::fs::write(
        &yaml,
        format!(
            "application_id: from-file\ntopic_prefix: file.\nschema_registry_url: https://user:{secret}@registry:8081\nkafka:\n  security.protocol: SASL_SSL\n  sasl.mechanism: PLAIN\n  sasl.password_file: {}\n",
            password.display()
        ),
    )
    .unwrap();
    let (code, out, err) = saga_streams(
        &[
            "config",
            "show",
            "--config",
            yaml.to_str().unwrap(),
            "--kafka-config",
            "sasl.mechanism=SCRAM-SHA-512",
            "--kafka-config",
            &format!("ssl.key.password={secret}"),
        ],
        &[
            ("SAGA_STREAMS_TOPIC_PREFIX", "env."),
            ("SAGA_STREAMS_KAFKA_SASL_USERNAME", "orders"),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains(secret) && !err.contains(secret), "{out}{err}");
    for expected in [
        "SAGA_STREAMS_APPLICATION_ID: from-file (configuration file)",
        "SAGA_STREAMS_TOPIC_PREFIX: env. (environment)",
        "SAGA_STREAMS_SCHEMA_REGISTRY_URL: https://***@registry:8081 (configuration file)",
        "security.protocol: SASL_SSL",
        // The flag wins over the file.
        "sasl.mechanism: SCRAM-SHA-512",
        "sasl.username: orders",
        "sasl.password: *** (from",
        "ssl.key.password: ***",
    ] {
        assert!(out.contains(expected), "missing '{expected}' in:\n{out}");
    }

    // The same file in TOML reads the same.
    let toml = dir.path().join("saga.toml");
    std::fs::write(
        &toml,
        format!(
            "application_id = \"from-toml\"\n[kafka]\n\"sasl.password_file\" = \"{}\"\n",
            password.display()
        ),
    )
    .unwrap();
    let (code, out, err) =
        saga_streams(&["config", "show", "--config", toml.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("SAGA_STREAMS_APPLICATION_ID: from-toml"),
        "{out}"
    );
    assert!(!out.contains(secret), "{out}");

    // Mistakes are named: an unknown setting, a secret file that cannot be read, a refused
    // property.
    std::fs::write(&yaml, "aplication_id: typo\n").unwrap();
    let (code, _, err) = saga_streams(&["config", "show", "--config", yaml.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown settings: aplication_id"), "{err}");
    let (code, _, err) = saga_streams(
        &[
            "config",
            "show",
            "--kafka-config",
            "sasl.password_file=/nonexistent/pw",
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/pw"), "{err}");
    let (code, _, err) = saga_streams(
        &[
            "lag",
            "--bootstrap",
            "127.0.0.1:1",
            "--group",
            "g",
            "--kafka-config",
            "bootstrap.servers=x",
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("--bootstrap"), "{err}");
}

#[test]
fn the_orchestrator_runs_from_a_configuration_file_alone() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let file = env.dir.path().join("orchestrator.toml");
    std::fs::write(
        &file,
        format!(
            "bootstrap = \"{}\"\ntopology = \"{}\"\ntopic_prefix = \"{}\"\ninstance_id = \"a\"\nstate_dir = \"{}\"\nmetrics_addr = \"127.0.0.1:0\"\n[kafka]\n\"client.id\" = \"from-config-file\"\n",
            env.bootstrap,
            env.topology,
            env.prefix,
            env.dir.path().join("state").display()
        ),
    )
    .unwrap();
    let _orchestrator = BinProcess::spawn(
        &["run".into(), "--config".into(), file.display().to_string()],
        env.dir.path().join("a.log"),
    );
    env.complete("configured");
}

#[test]
fn a_kafka_property_reaches_the_tools_clients() {
    // SSL against the plaintext listener: the property is applied, so the tool fails (fast, with
    // the broker named), where without it the same command succeeds.
    let bootstrap = common::kafka_bootstrap();
    let ok = saga_streams(
        &[
            "lag",
            "--bootstrap",
            &bootstrap,
            "--group",
            "nobody",
            "--timeout",
            "5s",
        ],
        &[],
    );
    assert_eq!(ok.0, 0, "{} {}", ok.1, ok.2);
    let started = std::time::Instant::now();
    let (code, out, err) = saga_streams(
        &[
            "lag",
            "--bootstrap",
            &bootstrap,
            "--group",
            "nobody",
            "--timeout",
            "5s",
        ],
        &[("SAGA_STREAMS_KAFKA_SECURITY_PROTOCOL", "SSL")],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

//! The saga on the secured broker of `scripts/stack up --secure`: SASL_SSL with SCRAM-SHA-512
//! users and mTLS, each application with exactly the ACLs `saga-streams acls` lists.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{unique, BinProcess};
use saga_streams::runtime::client::KafkaSettings;
use saga_streams::saga::SagaDefinition;

const START_SECURE: &str =
    "start the secured broker and export its addresses: scripts/stack up --secure && eval \"$(scripts/stack secure-env)\"";

/// The secured broker of the local stack.
struct Secure {
    sasl: String,
    mtls: String,
    dir: PathBuf,
    kafka_lib: PathBuf,
}

fn secure() -> Secure {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set; {START_SECURE}"))
    };
    Secure {
        sasl: var("SAGA_STACK_SECURE_SASL"),
        mtls: var("SAGA_STACK_SECURE_MTLS"),
        dir: PathBuf::from(var("SAGA_STACK_SECURE_DIR")),
        kafka_lib: PathBuf::from(var("SAGA_STACK_KAFKA_LIB")),
    }
}

impl Secure {
    fn ca(&self) -> String {
        self.dir.join("certs/ca.pem").display().to_string()
    }

    /// `--kafka-config` properties of SCRAM user `user` on the SASL_SSL listener.
    fn sasl_properties(&self, user: &str) -> Vec<(String, String)> {
        vec![
            ("security.protocol".into(), "SASL_SSL".into()),
            ("sasl.mechanism".into(), "SCRAM-SHA-512".into()),
            ("sasl.username".into(), user.into()),
            (
                "sasl.password_file".into(),
                self.dir
                    .join(format!("users/{user}.password"))
                    .display()
                    .to_string(),
            ),
            ("ssl.ca.location".into(), self.ca()),
        ]
    }

    /// `--kafka-config` properties of the client certificate `name` on the mTLS listener.
    fn mtls_properties(&self, name: &str) -> Vec<(String, String)> {
        let cert = |ext: &str| {
            self.dir
                .join(format!("certs/{name}.{ext}"))
                .display()
                .to_string()
        };
        vec![
            ("security.protocol".into(), "SSL".into()),
            ("ssl.ca.location".into(), self.ca()),
            ("ssl.certificate.location".into(), cert("pem")),
            ("ssl.key.location".into(), cert("key")),
        ]
    }

    fn admin(&self) -> KafkaSettings {
        let mut settings = KafkaSettings::new(self.sasl.clone());
        for (k, v) in self.sasl_properties("admin") {
            settings.set(&k, &v).unwrap();
        }
        settings
    }

    /// Runs `scripts/lib/KafkaAcls.java <mode>` as the administrator with `input` on its
    /// standard input; fails the test with `what` when it fails.
    fn admin_tool(&self, mode: &str, input: &str, what: &str) {
        let mut child = Command::new("java")
            .arg("-cp")
            .arg(format!("{}/*", self.kafka_lib.display()))
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/lib/KafkaAcls.java"
            ))
            .arg(&self.sasl)
            .arg(self.dir.join("admin.properties"))
            .arg(mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running java");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Adds ACLs (lines of `saga-streams acls`) as the administrator.
    fn grant(&self, lines: &str) {
        self.admin_tool("add", lines, "adding ACLs");
    }

    /// Sets SCRAM user `user`'s password on the broker (creating the user), as the administrator.
    fn set_password(&self, user: &str, password: &str) {
        self.admin_tool(
            "scram",
            &format!("{user} {password}\n"),
            "setting a SCRAM password",
        );
    }
}

/// `--kafka-config` flags.
fn flags(properties: &[(String, String)]) -> Vec<String> {
    properties
        .iter()
        .flat_map(|(k, v)| ["--kafka-config".to_string(), format!("{k}={v}")])
        .collect()
}

/// Runs the binary to its end: (success, stdout + stderr).
fn saga_streams(args: &[String]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_saga-streams"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running saga-streams");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Topics of a fresh order saga created by the administrator: (its `--topology` and
/// `--topic-prefix` arguments, a state directory).
fn fresh_saga(secure: &Secure, label: &str, partitions: i32) -> (Vec<String>, tempfile::TempDir) {
    let prefix = format!("{}.", unique(label));
    let topology = "topologies/order_saga.yaml";
    let def = SagaDefinition::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(topology))
        .unwrap()
        .with_topic_prefix(&prefix);
    saga_streams::sim::create_topics(&secure.admin(), &def, partitions).unwrap();
    (
        strings(&["--topology", topology, "--topic-prefix", &prefix]),
        tempfile::tempdir().unwrap(),
    )
}

/// The ACL lines `saga-streams acls` prints for `principal` (`extra`: `--participant STEP`).
fn listed_acls(principal: &str, extra: &[&str], common_args: &[String]) -> String {
    let mut acls = strings(&["acls", "--principal", principal]);
    acls.extend(strings(extra));
    acls.extend(common_args.iter().cloned());
    let (ok, lines) = saga_streams(&acls);
    assert!(ok, "{lines}");
    lines
}

/// The whole saga on one listener of the secured broker: topics created by the administrator,
/// the orchestrator as `app`, each participant simulator as `participant`, each with exactly the
/// ACLs `saga-streams acls` lists; orders produced and audited by the administrator.
fn saga_on_the_secured_broker(
    bootstrap: &str,
    app: &[(String, String)],
    app_principal: &str,
    participant: &[(String, String)],
    participant_principal: &str,
) {
    let secure = secure();
    let (common_args, dir) = fresh_saga(&secure, "secure", 2);
    secure.grant(&listed_acls(app_principal, &[], &common_args));
    for step in ["payment", "inventory"] {
        let lines = listed_acls(
            participant_principal,
            &["--participant", step],
            &common_args,
        );
        secure.grant(&lines);
    }

    let base = |command: &[&str], kafka: &[(String, String)]| {
        let mut args = strings(command);
        args.extend(strings(&["--bootstrap", bootstrap]));
        args.extend(common_args.clone());
        args.extend(flags(kafka));
        args
    };
    let mut run = base(
        &["run", "--instance-id", "a", "--metrics-addr", "127.0.0.1:0"],
        app,
    );
    run.extend([
        "--state-dir".into(),
        dir.path().join("a").display().to_string(),
    ]);
    let _orchestrator = BinProcess::spawn(&run, dir.path().join("a.log"));
    let mut participants = Vec::new();
    for step in ["payment", "inventory"] {
        let mut args = base(&["simulate", step, "--instance-id", "sim"], participant);
        args.extend([
            "--state-dir".into(),
            dir.path().join(step).display().to_string(),
        ]);
        participants.push(BinProcess::spawn(
            &args,
            dir.path().join(format!("{step}.log")),
        ));
    }

    let admin = secure.sasl_properties("admin");
    let admin_on = |command: &[&str]| {
        let mut args = strings(command);
        args.extend(strings(&["--bootstrap", &secure.sasl]));
        args.extend(common_args.clone());
        args.extend(flags(&admin));
        args
    };
    let (ok, out) = saga_streams(&admin_on(&["load", "--orders", "200", "--rate", "400"]));
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (ok, out) = saga_streams(&admin_on(&["audit", "--timeout", "60s"]));
        if ok {
            assert!(out.contains("audit: PASSED (200 sagas"), "{out}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the saga did not finish on the secured broker:\n{out}\norchestrator log:\n{}",
            std::fs::read_to_string(dir.path().join("a.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[test]
fn the_saga_runs_over_sasl_ssl_with_exactly_the_listed_acls() {
    let secure = secure();
    saga_on_the_secured_broker(
        &secure.sasl,
        &secure.sasl_properties("saga"),
        "User:saga",
        &secure.sasl_properties("participant"),
        "User:participant",
    );
}

#[test]
fn the_saga_runs_over_mtls_with_exactly_the_listed_acls() {
    let secure = secure();
    saga_on_the_secured_broker(
        &secure.mtls,
        &secure.mtls_properties("saga"),
        "User:saga",
        &secure.mtls_properties("participant"),
        "User:participant",
    );
}

/// Runs the orchestrator as `saga` on the SASL_SSL listener, with the ACLs `saga-streams acls`
/// lists except those `drop` matches and the password in `password_file`; returns its log once it
/// exited, failing if it did not within a minute.
fn orchestrator_refused(drop: &dyn Fn(&str) -> bool, password_file: Option<&str>) -> String {
    let secure = secure();
    let (common_args, dir) = fresh_saga(&secure, "refused", 1);
    let lines = listed_acls("User:saga", &[], &common_args);
    let kept: String = lines
        .lines()
        .filter(|l| !drop(l))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(
        kept.lines().count(),
        lines.lines().count(),
        "nothing dropped"
    );
    secure.grant(&kept);
    let mut properties = secure.sasl_properties("saga");
    if let Some(file) = password_file {
        properties.retain(|(k, _)| k != "sasl.password_file");
        properties.push(("sasl.password_file".into(), file.into()));
    }
    let mut args = strings(&["run", "--instance-id", "a", "--metrics-addr", "127.0.0.1:0"]);
    args.extend(strings(&["--bootstrap", &secure.sasl]));
    args.extend(common_args);
    args.extend(flags(&properties));
    args.extend([
        "--state-dir".into(),
        dir.path().join("a").display().to_string(),
    ]);
    // Debug logging: no secret may appear at any level.
    let mut orchestrator =
        BinProcess::spawn_with_log_filter(&args, dir.path().join("a.log"), "debug");
    let exited = common::poll_until(Duration::from_secs(60), || {
        matches!(orchestrator.child.try_wait(), Ok(Some(_)))
    });
    let log = orchestrator.log_text();
    assert!(exited, "the orchestrator did not stop:\n{log}");
    let status = orchestrator.child.try_wait().unwrap().unwrap();
    assert!(!status.success(), "{log}");
    log
}

#[test]
fn a_wrong_password_fails_fast_naming_the_principal_and_the_listener() {
    let secure = secure();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong");
    let password = "not-the-password-5e1f";
    std::fs::write(&wrong, password).unwrap();
    let started = Instant::now();
    let log = orchestrator_refused(
        &|l| l.contains("nothing is dropped here") || l.contains("DESCRIBE TRANSACTIONAL_ID"),
        Some(&wrong.display().to_string()),
    );
    assert!(started.elapsed() < Duration::from_secs(45), "{log}");
    assert!(
        log.contains(&format!(
            "authentication as 'saga' (SCRAM-SHA-512) on the SASL_SSL listener {}",
            secure.sasl
        )),
        "{log}"
    );
    assert!(
        !log.contains(password),
        "the password is in the log:\n{log}"
    );
    let real = std::fs::read_to_string(secure.dir.join("users/saga.password")).unwrap();
    for log in [
        log,
        orchestrator_refused(&|l| l.contains("READ GROUP"), None),
    ] {
        assert!(
            !log.contains(real.trim()),
            "a password is in the debug log:\n{log}"
        );
    }
}

#[test]
fn a_missing_acl_fails_at_start_up_naming_the_operation_and_the_resource() {
    let log = orchestrator_refused(&|l| l.contains("READ GROUP"), None);
    assert!(
        log.contains("not authorized to Read consumer group"),
        "{log}"
    );
    assert!(
        log.contains("as 'saga' (SCRAM-SHA-512) on the SASL_SSL listener"),
        "{log}"
    );
    let log = orchestrator_refused(&|l| l.contains("WRITE TRANSACTIONAL_ID"), None);
    assert!(
        log.contains("not authorized to Write transactional id"),
        "{log}"
    );
    let log = orchestrator_refused(
        &|l| l.contains("READ TOPIC LITERAL") && l.contains("payments.events"),
        None,
    );
    assert!(
        log.contains("may not describe") && log.contains("payments.events"),
        "{log}"
    );
}

/// The registry proxy's URLs: TLS with basic auth, and TLS with a client certificate and a token.
fn registry_proxy() -> (String, String) {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set; {START_SECURE}"))
    };
    (
        var("SAGA_STACK_REGISTRY_BASIC_URL"),
        var("SAGA_STACK_REGISTRY_MTLS_URL"),
    )
}

fn ready(http: &str) -> (u16, String) {
    common::http_get(&format!("http://{http}/ready"))
}

#[test]
fn the_avro_saga_reads_the_registry_through_tls_and_basic_auth_and_rides_out_wrong_credentials() {
    use common::avro_env::{first_versions, schema_file, AvroEnv, LIMIT, ORDER_V1, ORDER_V2};
    use common::poll_until;

    let secure = secure();
    let (basic_url, _) = registry_proxy();
    let right = std::fs::read_to_string(secure.dir.join("users/registry.password")).unwrap();
    let right = right.trim().to_string();
    let wrong = "wrong-registry-password-77f3";
    let mut env = AvroEnv::new(2);
    let password_file = env.dir.path().join("registry-password");
    std::fs::write(&password_file, format!("{right}\n")).unwrap();
    env.registry_args = strings(&[
        "--schema-registry-url",
        &basic_url,
        "--schema-registry-user",
        "saga",
        "--schema-registry-password-file",
        &password_file.display().to_string(),
        "--schema-registry-ca",
        &secure.ca(),
    ]);
    // Registered through the proxy: versions 1 and 2 of OrderCreated.
    let (ok, out) = env.schemas("register", first_versions().path());
    assert!(ok, "{out}");
    env.register();
    let (v1_id, v2_id) = (
        env.start_subject_id(ORDER_V1),
        env.start_subject_id(ORDER_V2),
    );
    let (v1, v2) = (schema_file(ORDER_V1), schema_file(ORDER_V2));
    env.start(&[]);
    let http = env.orchestrator().http_addr(LIMIT);
    let warm: Vec<String> = (0..3).map(|i| format!("warm-{i}")).collect();
    for order in &warm {
        let fields = env.order_fields(order, &[]);
        env.send_raw(&env.def.start_topic, order, &env.encode(&v2, v2_id, fields));
    }
    let ids = warm.clone();
    env.wait("the orders before the change", LIMIT, move |e| {
        ids.iter().all(|o| !e.outcomes(o).is_empty())
    });

    // The orchestrator's credentials turn wrong (the file changes, SIGHUP): records that need a
    // schema it has not fetched yet wait; the instance says why; nothing is dead-lettered.
    std::fs::write(&password_file, wrong).unwrap();
    env.orchestrator().signal("HUP");
    let during: Vec<String> = (0..4).map(|i| format!("during-{i}")).collect();
    for order in &during {
        let fields = env.order_fields(order, &[]);
        env.send_raw(&env.def.start_topic, order, &env.encode(&v1, v1_id, fields));
    }
    let mut last = (0, String::new());
    assert!(
        poll_until(LIMIT, || {
            last = ready(&http);
            last.0 == 503 && last.1.contains("registry refused our credentials")
        }),
        "never reported the refused credentials: {last:?}"
    );
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        env.poll();
        env.assert_alive();
    }
    for order in &during {
        assert!(env.outcomes(order).is_empty(), "{order} finished");
    }
    assert!(
        env.all_dead_letters().is_empty(),
        "{:?}",
        env.all_dead_letters()
    );

    // Fixed: the file holds the right password again, SIGHUP, and every order completes once.
    std::fs::write(&password_file, &right).unwrap();
    env.orchestrator().signal("HUP");
    let ids = during.clone();
    env.wait("the orders sent with wrong credentials", LIMIT, move |e| {
        ids.iter().all(|o| !e.outcomes(o).is_empty())
    });
    for order in &during {
        let outcomes = env.outcomes(order);
        assert_eq!(outcomes.len(), 1, "{order}: {outcomes:?}");
        assert_eq!(outcomes[0]["event_type"], "OrderCompleted");
    }
    assert!(env.all_dead_letters().is_empty());
    assert!(
        poll_until(LIMIT, || ready(&http).0 == 200),
        "not ready again"
    );
    let log = env.orchestrator().log_text();
    assert!(
        log.contains("registry_credentials_refused"),
        "no audit event:\n{log}"
    );
    assert!(log.contains("secret_reloaded"), "no audit event:\n{log}");
    assert!(
        !log.contains(&right) && !log.contains(wrong),
        "a registry password is in the log:\n{log}"
    );
}

#[test]
fn the_registry_is_reached_with_a_client_certificate_and_a_bearer_token_and_refusals_are_clear() {
    use common::avro_env::{repo, AvroEnv};

    let secure = secure();
    let (basic_url, mtls_url) = registry_proxy();
    let token = std::fs::read_to_string(secure.dir.join("users/registry.token")).unwrap();
    let mut env = AvroEnv::new(1);
    let token_file = env.dir.path().join("token");
    let cert = |ext: &str| {
        secure
            .dir
            .join(format!("certs/saga.{ext}"))
            .display()
            .to_string()
    };
    let with = |url: &str, extra: &[&str]| {
        let mut args = strings(&["--schema-registry-url", url, "--schema-registry-ca"]);
        args.push(secure.ca());
        args.extend(strings(extra));
        args
    };
    let token_arg = token_file.display().to_string();
    let (pem, key) = (cert("pem"), cert("key"));
    let mtls = with(
        &mtls_url,
        &[
            "--schema-registry-token-file",
            &token_arg,
            "--schema-registry-cert",
            &pem,
            "--schema-registry-key",
            &key,
        ],
    );

    std::fs::write(&token_file, &token).unwrap();
    env.registry_args = mtls.clone();
    let (ok, out) = env.schemas("register", &repo("schemas"));
    assert!(ok, "register with a client certificate and a token:\n{out}");
    assert!(
        out.contains("schema_registration") && out.contains("saga_streams::audit"),
        "no audit event for the registration:\n{out}"
    );
    let (ok, out) = env.schemas("check", &repo("schemas"));
    assert!(ok, "{out}");

    // A wrong token: refused, said so, the token not shown.
    let wrong_token = "wrong-token-0b9c";
    std::fs::write(&token_file, wrong_token).unwrap();
    let (ok, out) = env.schemas("check", &repo("schemas"));
    assert!(!ok && out.contains("refused our credentials"), "{out}");
    assert!(
        !out.contains(wrong_token) && !out.contains(token.trim()),
        "{out}"
    );

    // No client certificate: the proxy does not let the connection through.
    std::fs::write(&token_file, &token).unwrap();
    env.registry_args = with(&mtls_url, &["--schema-registry-token-file", &token_arg]);
    let (ok, out) = env.schemas("check", &repo("schemas"));
    assert!(!ok, "{out}");

    // Credentials in the URL (an API key and secret) work, and are never echoed.
    let password = std::fs::read_to_string(secure.dir.join("users/registry.password")).unwrap();
    let in_url =
        |secret: &str| basic_url.replacen("https://", &format!("https://saga:{secret}@"), 1);
    env.registry_args = with(&in_url(password.trim()), &[]);
    let (ok, out) = env.schemas("check", &repo("schemas"));
    assert!(ok, "{out}");
    let wrong = "wrong-in-url-3d1a";
    env.registry_args = with(&in_url(wrong), &[]);
    let (ok, out) = env.schemas("check", &repo("schemas"));
    assert!(!ok && out.contains("refused our credentials"), "{out}");
    assert!(!out.contains(wrong), "{out}");

    // Without the CA the proxy's certificate is not trusted.
    env.registry_args = strings(&["--schema-registry-url", &in_url(password.trim())]);
    let (ok, out) = env.schemas("check", &repo("schemas"));
    assert!(!ok && !out.contains(password.trim()), "{out}");
}

/// `curl` over loopback with the local CA: (status, body); status 0 when no HTTP answer came.
fn curl(url: &str, ca: &str, token: Option<&str>) -> (u16, String) {
    let mut args = strings(&[
        "-sS",
        "--max-time",
        "5",
        "--cacert",
        ca,
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(token) = token {
        args.extend(strings(&["-H", &format!("Authorization: Bearer {token}")]));
    }
    args.push(url.into());
    let out = Command::new("curl")
        .args(&args)
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn saga_endpoints_require_the_bearer_token_over_tls_and_the_token_rotates() {
    let secure = secure();
    let bootstrap = common::kafka_bootstrap();
    let prefix = format!("{}.", unique("http"));
    let topology = "topologies/order_saga.yaml";
    let def = SagaDefinition::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(topology))
        .unwrap()
        .with_topic_prefix(&prefix);
    saga_streams::sim::create_topics(&bootstrap, &def, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let (first, second) = ("first-token-8c2e51", "second-token-d40a77");
    std::fs::write(&token_file, format!("{first}\n")).unwrap();
    let cert = |ext: &str| {
        secure
            .dir
            .join(format!("certs/broker.{ext}"))
            .display()
            .to_string()
    };
    let mut args = strings(&[
        "run",
        "--bootstrap",
        &bootstrap,
        "--topology",
        topology,
        "--topic-prefix",
        &prefix,
        "--instance-id",
        "a",
        "--metrics-addr",
        "127.0.0.1:0",
        "--http-tls-cert",
        &cert("pem"),
        "--http-tls-key",
        &cert("key"),
        "--state-dir",
    ]);
    args.push(dir.path().join("state").display().to_string());
    args.extend(["--http-token-file".into(), token_file.display().to_string()]);
    let mut orchestrator =
        BinProcess::spawn_with_log_filter(&args, dir.path().join("a.log"), "debug");
    let addr = orchestrator.http_addr(Duration::from_secs(60));
    let ca = secure.ca();
    let url = |path: &str| format!("https://{addr}{path}");

    // Open endpoints answer without a token.
    assert_eq!(curl(&url("/health"), &ca, None).0, 200);
    let (code, metrics) = curl(&url("/metrics"), &ca, None);
    assert_eq!(code, 200, "{metrics}");
    let (code, _) = curl(&url("/ready"), &ca, None);
    assert!(code == 200 || code == 503, "{code}");
    // Plain HTTP gets no answer from the TLS port.
    let (code, _) = common::http_get(&format!("http://{addr}/health"));
    assert_ne!(code, 200);

    // Saga data and the quarantine: 401 without a token and with a wrong one.
    for path in ["/sagas/order-1", "/quarantine"] {
        for token in [None, Some("wrong"), Some(second)] {
            let (code, body) = curl(&url(path), &ca, token);
            assert_eq!(code, 401, "{path} with {token:?}: {body}");
            assert!(!body.contains(first), "{body}");
        }
    }
    let mut last = (0, String::new());
    assert!(
        common::poll_until(Duration::from_secs(60), || {
            last = curl(&url("/sagas/order-1"), &ca, Some(first));
            last.0 == 404 && last.1.contains("no saga")
        }),
        "the token was refused or the instance never took its task: {last:?}"
    );
    let (code, body) = curl(&url("/quarantine"), &ca, Some(first));
    assert_eq!(code, 200, "{body}");

    // Rotation: the file changes, SIGHUP; the new token works and the old one no longer does.
    std::fs::write(&token_file, second).unwrap();
    orchestrator.signal("HUP");
    assert!(
        common::poll_until(Duration::from_secs(30), || {
            curl(&url("/quarantine"), &ca, Some(second)).0 == 200
        }),
        "the new token is not accepted"
    );
    assert_eq!(curl(&url("/quarantine"), &ca, Some(first)).0, 401);

    let log = orchestrator.log_text();
    assert!(log.contains("http_token_refused"), "no audit event:\n{log}");
    assert!(
        !log.contains(first) && !log.contains(second),
        "a token is in the debug log:\n{log}"
    );
}

#[test]
fn the_saga_goes_on_when_the_scram_password_rotates_under_load() {
    let secure = secure();
    let (common_args, dir) = fresh_saga(&secure, "rotate", 2);
    let user = unique("rotating").replace('.', "-");
    let (old, new) = ("old-password-61b2f0", "new-password-9ae43c");
    secure.set_password(&user, old);
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{old}\n")).unwrap();
    secure.grant(&listed_acls(&format!("User:{user}"), &[], &common_args));
    for step in ["payment", "inventory"] {
        secure.grant(&listed_acls(
            "User:participant",
            &["--participant", step],
            &common_args,
        ));
    }
    let mut app = secure.sasl_properties("saga");
    app.retain(|(k, _)| k != "sasl.username" && k != "sasl.password_file");
    app.push(("sasl.username".into(), user.clone()));
    app.push((
        "sasl.password_file".into(),
        password_file.display().to_string(),
    ));
    let on = |command: &[&str], kafka: &[(String, String)]| {
        let mut args = strings(command);
        args.extend(strings(&["--bootstrap", &secure.sasl]));
        args.extend(common_args.clone());
        args.extend(flags(kafka));
        args
    };
    let mut run = on(
        &["run", "--instance-id", "a", "--metrics-addr", "127.0.0.1:0"],
        &app,
    );
    run.extend([
        "--state-dir".into(),
        dir.path().join("a").display().to_string(),
    ]);
    let mut orchestrator =
        BinProcess::spawn_with_log_filter(&run, dir.path().join("a.log"), "debug");
    let mut participants = Vec::new();
    for step in ["payment", "inventory"] {
        let mut args = on(
            &["simulate", step, "--instance-id", "sim"],
            &secure.sasl_properties("participant"),
        );
        args.extend([
            "--state-dir".into(),
            dir.path().join(step).display().to_string(),
        ]);
        participants.push(BinProcess::spawn(
            &args,
            dir.path().join(format!("{step}.log")),
        ));
    }
    let http = orchestrator.http_addr(Duration::from_secs(60));
    assert!(
        common::poll_until(Duration::from_secs(90), || {
            common::http_get(&format!("http://{http}/ready")).0 == 200
        }),
        "not ready:\n{}",
        orchestrator.log_text()
    );
    let admin = secure.sasl_properties("admin");
    let orders = 400;
    let _load = BinProcess::spawn(
        &on(
            &["load", "--orders", &orders.to_string(), "--rate", "40"],
            &admin,
        ),
        dir.path().join("load.log"),
    );
    // Mid-load: the broker takes only the new password, then the file holds it and SIGHUP.
    std::thread::sleep(Duration::from_secs(3));
    secure.set_password(&user, new);
    std::fs::write(&password_file, new).unwrap();
    orchestrator.signal("HUP");
    assert!(
        common::poll_until(Duration::from_secs(60), || {
            let log = orchestrator.log_text();
            log.find("kafka_secrets_reloaded")
                .is_some_and(|at| log[at..].contains("partitions assigned"))
        }),
        "the clients were not rebuilt with the new password:\n{}",
        orchestrator.log_text()
    );
    // The members topic's clients too (they reconnect with the new password when they must),
    // and they go on publishing and reading without a complaint.
    assert!(
        common::poll_until(Duration::from_secs(30), || {
            orchestrator
                .log_text()
                .contains("members: the Kafka secrets changed; the clients are built again")
        }),
        "the members clients were not rebuilt:\n{}",
        orchestrator.log_text()
    );

    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let (ok, out) = saga_streams(&on(&["audit", "--timeout", "60s"], &admin));
        if ok && out.contains(&format!("audit: PASSED ({orders} sagas")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the saga did not finish after the rotation:\n{out}\norchestrator log:\n{}",
            orchestrator.log_text()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    orchestrator.assert_alive();
    let log = orchestrator.log_text();
    assert!(
        !log.contains(old) && !log.contains(new),
        "a password is in the debug log"
    );
    let rebuilt = log.find("members: the Kafka secrets changed").unwrap_or(0);
    assert!(
        !log[rebuilt..].contains("members: cannot") && !log[rebuilt..].contains("members: reading"),
        "the members clients failed after the rotation:\n{log}"
    );
}

#[test]
fn a_refused_write_on_an_output_topic_stops_the_orchestrator_naming_it() {
    let secure = secure();
    let (common_args, dir) = fresh_saga(&secure, "nowrite", 1);
    // Describe but not Write on one output: the start-up checks pass, the first write fails.
    let lines = listed_acls("User:saga", &[], &common_args);
    let kept: String = lines
        .lines()
        .map(|l| {
            if l.contains("WRITE TOPIC LITERAL") && l.contains("payments.commands") {
                l.replace("WRITE", "DESCRIBE")
            } else {
                l.to_string()
            }
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(kept, lines);
    secure.grant(&kept);
    let on = |command: &[&str], kafka: &[(String, String)]| {
        let mut args = strings(command);
        args.extend(strings(&["--bootstrap", &secure.sasl]));
        args.extend(common_args.clone());
        args.extend(flags(kafka));
        args
    };
    let mut run = on(
        &["run", "--instance-id", "a", "--metrics-addr", "127.0.0.1:0"],
        &secure.sasl_properties("saga"),
    );
    run.extend([
        "--state-dir".into(),
        dir.path().join("a").display().to_string(),
    ]);
    let mut orchestrator = BinProcess::spawn(&run, dir.path().join("a.log"));
    let http = orchestrator.http_addr(Duration::from_secs(60));
    assert!(
        common::poll_until(Duration::from_secs(90), || {
            common::http_get(&format!("http://{http}/ready")).0 == 200
        }),
        "not ready:\n{}",
        orchestrator.log_text()
    );
    // An order: its ProcessPayment cannot be written.
    let (ok, out) = saga_streams(&on(
        &["load", "--orders", "1"],
        &secure.sasl_properties("admin"),
    ));
    assert!(ok, "{out}");
    let exited = common::poll_until(Duration::from_secs(90), || {
        matches!(orchestrator.child.try_wait(), Ok(Some(_)))
    });
    let log = orchestrator.log_text();
    assert!(exited, "the orchestrator did not stop:\n{log}");
    assert!(
        log.contains("not authorized on a topic (may not write")
            && log.contains("payments.commands")
            && log.contains("as 'saga' (SCRAM-SHA-512)"),
        "{log}"
    );
}

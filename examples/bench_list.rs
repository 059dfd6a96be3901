//! What listing sagas costs on a large store: `--sagas` sagas (by default 1,000,000, of which
//! `--stuck` are `COMPENSATION_STUCK` and the rest `COMPLETED`) written into a fresh application's
//! saga changelog in the store's own format (records, status index, counts, the index marker),
//! restored by one orchestrator, then listed through its HTTP API:
//! - by status, through the status index: the first page, and every stuck saga page by page;
//! - with a filter the index does not serve (`older_than` matching none): the whole store read
//!   page by page, as an operator's `sagas list --all` would.
//!
//! Each query runs `--repeat` times; the table shows medians and the spread. Run through
//! `scripts/bench-list`, which builds the release binaries and starts the stack.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use saga_streams::saga::machine::{self, Applied, SagaEvent, SagaInput, SagaRecord};
use saga_streams::saga::processor::saga_key;
use saga_streams::saga::query::Partitioner;
use saga_streams::saga::topology::{EventRole, ENVELOPE};
use saga_streams::saga::SagaDefinition;
use saga_streams::sim::{self, load};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    bootstrap: String,
    #[arg(long, default_value_t = 1_000_000)]
    sagas: u64,
    /// Of which this many are COMPENSATION_STUCK (spread evenly).
    #[arg(long, default_value_t = 1_000)]
    stuck: u64,
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Runs of each query.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    #[arg(long, default_value = "topologies/order_saga.yaml")]
    topology: PathBuf,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn event(event_type: &str, role: EventRole, payload: Value) -> SagaEvent {
    SagaEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        event_type: event_type.to_string(),
        role,
        payload: payload.as_object().cloned().unwrap_or_default(),
        traceparent: None,
    }
}

fn apply(def: &SagaDefinition, record: SagaRecord, input: SagaInput<'_>, at: i64) -> SagaRecord {
    match machine::apply(def, &record, input, at) {
        Applied::Changed { record, .. } => *record,
        other => panic!("the template saga did not change: {other:?}"),
    }
}

/// The bytes the store holds for saga `id` of a template.
fn stored(template: &str, id: &str) -> Vec<u8> {
    let record: SagaRecord =
        serde_json::from_str(&template.replace("{ID}", id)).expect("a template saga record");
    saga_streams::saga::record::encode(&record).expect("an encodable saga record")
}

/// A completed saga and a stuck one, id `{ID}`, as JSON ([`stored`] makes their bytes).
fn templates(def: &SagaDefinition) -> (String, String) {
    let mut payload = load::order_created(def, "{ID}")
        .as_object()
        .cloned()
        .unwrap_or_default();
    for name in ENVELOPE {
        payload.remove(*name);
    }
    let now = now_ms();
    let start = event(&def.start_event, EventRole::Start, Value::Object(payload));
    let (started, _) = machine::start(def, "{ID}", &start, "corr-{ID}".into(), now);
    let paid = apply(
        def,
        started,
        SagaInput::Event(&event(
            &def.steps[0].success,
            EventRole::Success(0),
            json!({"payment_id": "payment-{ID}"}),
        )),
        now,
    );
    let completed = apply(
        def,
        paid.clone(),
        SagaInput::Event(&event(
            &def.steps[1].success,
            EventRole::Success(1),
            json!({"reservation_id": "reservation-{ID}"}),
        )),
        now,
    );
    let mut stuck = apply(
        def,
        paid,
        SagaInput::Event(&event(
            &def.steps[1].failure,
            EventRole::Failure(1),
            json!({"reason": "out of stock"}),
        )),
        now,
    );
    while !stuck.is_finished() {
        let at = stuck.next_timer_ms().expect("a timer");
        stuck = apply(def, stuck, SagaInput::Timer { input_time_ms: at }, at);
    }
    assert_eq!(completed.status, "COMPLETED");
    assert_eq!(stuck.status, "COMPENSATION_STUCK");
    (
        serde_json::to_string(&completed).unwrap(),
        serde_json::to_string(&stuck).unwrap(),
    )
}

fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

fn median_and_spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

/// Follows a list from its first page to its end: (pages, sagas, seconds).
fn list_all(client: &reqwest::blocking::Client, base: &str, query: &str) -> (usize, usize, f64) {
    let started = Instant::now();
    let mut cursor: Option<String> = None;
    let (mut pages, mut sagas) = (0, 0);
    loop {
        let mut url = format!("{base}/sagas?{query}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = client.get(&url).send().unwrap().json().unwrap();
        assert_eq!(page["unavailable"], json!([]), "{page}");
        pages += 1;
        sagas += page["sagas"].as_array().map_or(0, Vec::len);
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return (pages, sagas, started.elapsed().as_secs_f64()),
        }
    }
}

fn main() {
    let args = Args::parse();
    let prefix = format!("bench-list-{}-{}.", std::process::id(), now_ms());
    let def = SagaDefinition::load(&args.topology)
        .expect("topology")
        .with_topic_prefix(&prefix);
    sim::create_topics(&args.bootstrap, &def, args.partitions).expect("topics");
    let app = format!("{prefix}{}", def.name);
    let changelog = format!("{app}-sagas-changelog");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .create()
        .expect("admin");
    let topic = NewTopic::new(&changelog, args.partitions, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact");
    for r in futures::executor::block_on(admin.create_topics(&[topic], &AdminOptions::new()))
        .expect("create the changelog")
    {
        r.expect("changelog created");
    }

    // The store's own records: the saga, its status index entry; per partition the counts and
    // the marker saying every saga is indexed.
    let (completed, stuck) = templates(&def);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .set("queue.buffering.max.messages", "1000000")
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .create()
        .expect("producer");
    let send = |key: &[u8], value: &[u8], partition: i32| {
        let mut record = BaseRecord::to(&changelog)
            .key(key)
            .payload(value)
            .partition(partition);
        while let Err((_, back)) = producer.send(record) {
            record = back;
            producer.poll(Duration::from_millis(5));
        }
    };
    let every = (args.sagas / args.stuck.max(1)).max(1);
    let mut counts = vec![(0u64, 0u64); args.partitions as usize];
    let written = Instant::now();
    for n in 0..args.sagas {
        let id = format!("l-{n:08}");
        let partition = Partitioner::ConsistentRandom.partition(id.as_bytes(), args.partitions);
        let is_stuck = n % every == 0 && n / every < args.stuck;
        let (template, status) = if is_stuck {
            counts[partition as usize].1 += 1;
            (&stuck, "COMPENSATION_STUCK")
        } else {
            counts[partition as usize].0 += 1;
            (&completed, "COMPLETED")
        };
        send(&saga_key(&id), &stored(template, &id), partition);
        send(
            &[b"i/", status.as_bytes(), b"\0", id.as_bytes()].concat(),
            b"",
            partition,
        );
        if n % 10_000 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    for (partition, (done, stuck)) in counts.iter().enumerate() {
        let p = partition as i32;
        send(b"c/COMPLETED", done.to_string().as_bytes(), p);
        send(b"c/COMPENSATION_STUCK", stuck.to_string().as_bytes(), p);
        send(b"x/indexed", b"1", p);
    }
    producer.flush(Duration::from_secs(300)).expect("flush");
    let stuck_total: u64 = counts.iter().map(|c| c.1).sum();
    eprintln!(
        "wrote {} sagas ({stuck_total} stuck) in {:.0} s",
        args.sagas,
        written.elapsed().as_secs_f64()
    );

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("orchestrator.log");
    let file = std::fs::File::create(&log).unwrap();
    let started = Instant::now();
    let mut child: Child = Command::new(release_dir().join("saga-streams"))
        .args(["run", "--bootstrap", &args.bootstrap])
        .arg("--topology")
        .arg(&args.topology)
        .args(["--topic-prefix", &prefix, "--instance-id", "list"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .spawn()
        .expect("the orchestrator");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .no_proxy()
        .build()
        .unwrap();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the orchestrator exited ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let ready = client
            .get(format!("{base}/ready"))
            .send()
            .is_ok_and(|r| r.status().is_success());
        if ready {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1800), "not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("restored in {:.1} s", started.elapsed().as_secs_f64());

    let mut first_page = Vec::new();
    let mut all_stuck = Vec::new();
    let mut scan = Vec::new();
    let mut unfiltered = Vec::new();
    let mut scan_pages = 0;
    for run in 0..args.repeat {
        let t = Instant::now();
        let page: Value = client
            .get(format!("{base}/sagas?status=COMPENSATION_STUCK&limit=50"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        first_page.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(
            page["sagas"].as_array().map(Vec::len),
            Some(50.min(stuck_total as usize))
        );

        let (_, found, secs) = list_all(&client, &base, "status=COMPENSATION_STUCK&limit=1000");
        assert_eq!(found as u64, stuck_total);
        all_stuck.push(secs * 1000.0);

        let t = Instant::now();
        let _: Value = client
            .get(format!("{base}/sagas?limit=50"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        unfiltered.push(t.elapsed().as_secs_f64() * 1000.0);

        let (pages, found, secs) = list_all(&client, &base, "older_than=3650d&limit=1000");
        assert_eq!(found, 0);
        scan.push(secs);
        scan_pages = pages;
        eprintln!("run {}/{} done", run + 1, args.repeat);
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();

    let row = |what: &str, values: Vec<f64>, unit: &str| {
        let (m, lo, hi) = median_and_spread(values);
        println!("| {what} | {m:.1} {unit} | {lo:.1} to {hi:.1} |");
    };
    println!(
        "\n{} sagas ({stuck_total} COMPENSATION_STUCK) in {} partitions, one instance; medians of {} runs\n",
        args.sagas, args.partitions, args.repeat
    );
    println!("| query | median | spread |\n|---|---|---|");
    row(
        "first page of 50, `status=COMPENSATION_STUCK` (index)",
        first_page,
        "ms",
    );
    row(
        &format!("all {stuck_total} stuck sagas, pages of 1,000 (index)"),
        all_stuck,
        "ms",
    );
    row("first page of 50, no filter", unfiltered, "ms");
    row(
        &format!("`older_than=3650d` (no index: every saga read, {scan_pages} pages)"),
        scan,
        "s",
    );
}

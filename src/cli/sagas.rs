//! `saga-streams sagas list|get|retry|cancel|resume`: the sagas of a running deployment, through
//! the HTTP API of any of its instances.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use comfy_table::Table;
use serde_json::{json, Value};

use super::args::parse_duration;
use crate::runtime::secrets::{https_client, read_secret};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  saga-streams sagas list --url http://127.0.0.1:9464 --status COMPENSATION_STUCK\n  saga-streams sagas get o-42 --url http://127.0.0.1:9464\n  saga-streams sagas cancel o-42 --reason duplicate-order --url http://127.0.0.1:9464 --token-file token"
)]
pub struct SagasArgs {
    #[command(subcommand)]
    pub command: SagasCommand,
}

/// Where the API is and how to reach it.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The HTTP endpoints of any instance (`--metrics-addr`, or its `--advertised-http`).
    #[arg(long)]
    pub url: String,
    /// A file holding the bearer token the instances require (`--http-token-file`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// CA bundle (PEM) the instances' HTTPS certificate is checked against, besides the
    /// system's.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum SagasCommand {
    /// Sagas across all instances, filtered, a page at a time.
    #[command(
        after_help = "Examples:\n  saga-streams sagas list --url http://127.0.0.1:9464 --status COMPENSATING --older-than 10m\n  saga-streams sagas list --url http://127.0.0.1:9464 --step payment --all"
    )]
    List(ListArgs),
    /// One saga: status, step awaited, context, outcome and history.
    #[command(after_help = "Example:\n  saga-streams sagas get o-42 --url http://127.0.0.1:9464")]
    Get(GetArgs),
    /// Send the command or compensation the saga waits for again (same event id).
    #[command(
        after_help = "Example:\n  saga-streams sagas retry o-42 --url http://127.0.0.1:9464 --token-file token --by alice"
    )]
    Retry(ActionArgs),
    /// Compensate what the saga did, in reverse order, and cancel it (reason `manual: REASON`).
    #[command(
        after_help = "Example:\n  saga-streams sagas cancel o-42 --reason customer-request --url http://127.0.0.1:9464 --token-file token"
    )]
    Cancel(CancelArgs),
    /// Send a COMPENSATION_STUCK saga's given-up compensations again, once the participant is
    /// fixed.
    #[command(
        after_help = "Example:\n  saga-streams sagas resume o-42 --url http://127.0.0.1:9464 --token-file token"
    )]
    Resume(ActionArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Only sagas in this status (PENDING, a step's state, COMPENSATING, COMPLETED, ...).
    #[arg(long)]
    pub status: Option<String>,
    /// Only sagas waiting on this step.
    #[arg(long)]
    pub step: Option<String>,
    /// Only sagas unchanged for at least this long (`10m`, `2h`).
    #[arg(long)]
    pub older_than: Option<String>,
    /// Only the saga(s) with this correlation id.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Sagas per page.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Go on from where a previous page ended (its `next` cursor).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Follow the cursors to the end.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The saga id.
    pub saga_id: String,
}

#[derive(Debug, clap::Args)]
pub struct ActionArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The saga id.
    pub saga_id: String,
    /// Who asks, for the saga's history and the audit log. Default: $USER.
    #[arg(long)]
    pub by: Option<String>,
    /// The action's id: the same id sent twice applies once. Default: a new UUID.
    #[arg(long)]
    pub action_id: Option<String>,
    /// How long to wait for the saga to take the action (`0s`: do not wait).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub wait: Duration,
}

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub action: ActionArgs,
    /// Why (the cancellation's reason becomes `manual: REASON`).
    #[arg(long)]
    pub reason: String,
}

struct Api {
    base: reqwest::Url,
    client: reqwest::blocking::Client,
    token: Option<String>,
}

impl Api {
    fn new(args: &ApiArgs) -> anyhow::Result<Api> {
        let mut base =
            reqwest::Url::parse(&args.url).map_err(|e| anyhow!("--url '{}': {e}", args.url))?;
        if !matches!(base.scheme(), "http" | "https") {
            bail!("--url '{}': not an http or https URL", args.url);
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let token = match &args.token_file {
            Some(path) => Some(
                read_secret("the HTTP token (--token-file)", path).map_err(anyhow::Error::msg)?,
            ),
            None => None,
        };
        let client = https_client("the API", "--ca", args.ca.as_deref(), None, None)
            .map_err(anyhow::Error::msg)?
            .timeout(Duration::from_secs(30))
            .build()
            .context("the HTTP client")?;
        Ok(Api {
            base,
            client,
            token,
        })
    }

    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> anyhow::Result<reqwest::Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|_| anyhow!("--url cannot take a path"))?
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    /// The JSON answer and its status; an error for anything but JSON.
    fn send(&self, request: reqwest::blocking::RequestBuilder) -> anyhow::Result<(u16, Value)> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().map_err(|e| anyhow!("{}", e.without_url()))?;
        let status = response.status().as_u16();
        let body = response.text().context("reading the answer")?;
        let value = serde_json::from_str(&body).map_err(|_| {
            anyhow!(
                "HTTP {status}, not an answer of the saga API: {}",
                first_line(&body)
            )
        })?;
        Ok((status, value))
    }

    fn get(&self, segments: &[&str], query: &[(&str, String)]) -> anyhow::Result<(u16, Value)> {
        let url = self.url(segments, query)?;
        self.send(self.client.get(url))
    }
}

fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect()
}

fn error_of(status: u16, body: &Value) -> anyhow::Error {
    let error = body
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("no reason given");
    anyhow!("HTTP {status}: {error}")
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn run(args: SagasArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        SagasCommand::List(args) => list(args),
        SagasCommand::Get(args) => get(args),
        SagasCommand::Retry(args) => act(args, "retry", None),
        SagasCommand::Resume(args) => act(args, "resume", None),
        SagasCommand::Cancel(args) => act(args.action, "cancel", Some(args.reason)),
    }
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.api)?;
    let mut query: Vec<(&str, String)> = vec![("limit", args.limit.to_string())];
    for (name, value) in [
        ("status", &args.status),
        ("step", &args.step),
        ("older_than", &args.older_than),
        ("correlation_id", &args.correlation_id),
    ] {
        if let Some(value) = value {
            query.push((name, value.clone()));
        }
    }
    let mut cursor = args.cursor.clone();
    let mut table = Table::new();
    table.set_header([
        "saga id",
        "partition",
        "status",
        "step awaited",
        "updated",
        "outcome",
    ]);
    let mut rows = 0;
    let mut problems = Vec::new();
    loop {
        let mut page_query = query.clone();
        if let Some(cursor) = &cursor {
            page_query.push(("cursor", cursor.clone()));
        }
        let (status, body) = api.get(&["sagas"], &page_query)?;
        if status != 200 {
            return Err(error_of(status, &body));
        }
        if args.api.json {
            println!("{body}");
        }
        for saga in body["sagas"].as_array().into_iter().flatten() {
            rows += 1;
            let outcome = match &saga["outcome"] {
                Value::Null => "-".to_string(),
                o => format!(
                    "{}{}",
                    text(&o["kind"]),
                    o["reason"]
                        .as_str()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
            };
            table.add_row([
                text(&saga["saga_id"]),
                text(&saga["partition"]),
                text(&saga["status"]),
                text(&saga["step_awaited"]),
                text(&saga["updated_at"]),
                outcome,
            ]);
        }
        for u in body["unavailable"].as_array().into_iter().flatten() {
            problems.push(format!(
                "partition {}: {}",
                text(&u["partition"]),
                text(&u["reason"])
            ));
        }
        cursor = body["next_cursor"].as_str().map(String::from);
        // A partition that could not be listed holds the cursor: going on would ask it again.
        if !args.all || cursor.is_none() || !problems.is_empty() {
            break;
        }
    }
    if !args.api.json {
        if rows > 0 {
            println!("{table}");
        } else {
            println!("no saga matches");
        }
        if let Some(cursor) = &cursor {
            println!("more may follow: --cursor {cursor}");
        }
    }
    for problem in &problems {
        eprintln!("not listed: {problem}");
    }
    // A list that misses partitions is not the answer asked for.
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.api)?;
    let (status, saga) = api.get(&["sagas", &args.saga_id], &[])?;
    if status != 200 {
        return Err(error_of(status, &saga));
    }
    if args.api.json {
        println!("{}", serde_json::to_string_pretty(&saga)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_saga(&saga);
    Ok(ExitCode::SUCCESS)
}

fn print_saga(saga: &Value) {
    for field in [
        "saga_id",
        "status",
        "step_awaited",
        "deadline",
        "correlation_id",
        "topology_version",
        "started_at",
        "updated_at",
        "partition",
    ] {
        println!("{field:>16}: {}", text(&saga[field]));
    }
    if let Some(o) = saga["outcome"].as_object() {
        println!(
            "{:>16}: {} {}",
            "outcome",
            text(&o["kind"].clone()),
            text(&o.get("reason").cloned().unwrap_or(Value::Null))
        );
    }
    if let Some(a) = saga["awaiting"].as_object() {
        println!(
            "{:>16}: {} (event {}, attempt {})",
            "awaiting",
            text(&a["event_type"]),
            text(&a["event_id"]),
            text(&a["attempt"])
        );
    }
    println!("{:>16}: {}", "context", saga["context"]);
    let mut table = Table::new();
    table.set_header(["at", "cause", "from", "to", "note"]);
    for t in saga["history"].as_array().into_iter().flatten() {
        table.add_row([
            text(&t["at"]),
            text(&t["cause"]),
            text(&t["from"]),
            text(&t["to"]),
            text(&t["note"]),
        ]);
    }
    println!("{table}");
}

fn act(args: ActionArgs, action: &str, reason: Option<String>) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.api)?;
    let by = args
        .by
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "unnamed".into());
    let action_id = args
        .action_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let body = json!({ "reason": reason, "by": by, "action_id": action_id });
    let url = api.url(&["sagas", &args.saga_id, action], &[])?;
    let (status, answer) = api
        .send(api.client.post(url).json(&body))
        .map_err(|e| anyhow!("{e}; the action's id is {action_id}: to try again without applying it twice, add --action-id {action_id}"))?;
    if status != 202 {
        return Err(anyhow!(
            "{}; the action's id is {action_id}: to try again without applying it twice, add --action-id {action_id}",
            error_of(status, &answer)
        ));
    }
    if args.wait.is_zero() {
        if args.api.json {
            println!("{answer}");
        } else {
            println!(
                "{action} of {} accepted (action {action_id}); the saga's history shows its outcome",
                args.saga_id
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    // The owning task applies it in its next commit cycle: the history entry names the action.
    let deadline = Instant::now() + args.wait;
    loop {
        let (code, saga) = api.get(&["sagas", &args.saga_id], &[])?;
        let entry = (code == 200)
            .then(|| {
                saga["history"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|t| t["event_id"].as_str() == Some(action_id.as_str()))
                    .cloned()
            })
            .flatten();
        if let Some(entry) = entry {
            let note = text(&entry["note"]);
            let refused = entry["refused"] == Value::Bool(true);
            if args.api.json {
                println!(
                    "{}",
                    json!({ "action_id": action_id, "applied": !refused, "history": entry, "saga": saga })
                );
            } else {
                println!(
                    "{action} of {} {}: {note}\nstatus: {} -> {}",
                    args.saga_id,
                    if refused { "refused" } else { "applied" },
                    text(&entry["from"]),
                    text(&saga["status"])
                );
            }
            return Ok(if refused {
                ExitCode::from(4)
            } else {
                ExitCode::SUCCESS
            });
        }
        if Instant::now() >= deadline {
            bail!(
                "the {action} (action {action_id}) was accepted but the saga has not shown it within {}: it is applied when the saga's task next runs (see its history, or run the same command with --action-id {action_id})",
                humantime::format_duration(args.wait)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

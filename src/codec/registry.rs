//! The Schema Registry (Confluent's REST API, which Apicurio's `ccompat` API also speaks), with
//! every failure sorted into what it means for a record or a command: the thing asked for does
//! not exist, the registry refused, or the registry could not be reached (retry later).
//!
//! Schema lookups by id, version lists and registration go through schema_registry_converter; the
//! calls it does not make (compatibility configuration, looking a schema up in a subject) are
//! plain REST calls here. Every call is blocking: stream threads and commands call it directly,
//! never from inside an async runtime.

use std::path::PathBuf;
use std::time::Duration;

use schema_registry_converter::blocking::schema_registry::{
    get_all_versions, get_schema_by_id, perform_sr_call, post_schema, SrSettings,
};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SrCall, SuppliedSchema};
use serde_json::{json, Value};

use crate::runtime::secrets::{read_secret, Rotating};

/// What went wrong talking to the registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered that the schema, subject or version does not exist.
    #[error("not found in the registry: {0}")]
    NotFound(String),
    /// The registry refused the request (an incompatible or invalid schema, a bad level).
    #[error("the registry refused: {0}")]
    Refused(String),
    /// The registry refused who we are (HTTP 401 or 403): the credentials are missing, wrong or
    /// lack a permission. Nothing works until an operator fixes them.
    #[error("the registry refused our credentials: {0}")]
    Unauthorized(String),
    /// No answer, or a server-side failure: try again later.
    #[error("the registry is unavailable: {0}")]
    Unavailable(String),
}

/// A schema as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub id: u32,
    pub version: Option<u32>,
    pub schema: String,
}

/// The compatibility levels subjects can have.
pub const LEVELS: &[&str] = &[
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
    "NONE",
];

/// How to reach a secured registry: basic auth (a user and password, or an API key and secret),
/// or a bearer token; a CA bundle for its certificate, and a client certificate when it asks for
/// one. Secrets are read from files, again on each rotation (SIGHUP).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryAccess {
    /// The basic-auth user, or the API key.
    pub user: Option<String>,
    /// A file holding the basic-auth password, or the API secret.
    pub password_file: Option<PathBuf>,
    /// A file holding a bearer token.
    pub token_file: Option<PathBuf>,
    /// A PEM bundle of CA certificates trusted for the registry, besides the system's.
    pub ca: Option<PathBuf>,
    /// A PEM client certificate (with `key`, a PKCS#8 PEM key) for a registry that asks for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Credentials as read from the files (or from the URL), never printed.
#[derive(Clone, Default)]
enum Credentials {
    #[default]
    None,
    Basic(String, Option<String>),
    Token(String),
}

/// The clients of one generation of the credentials.
struct Clients {
    settings: SrSettings,
    http: reqwest::blocking::Client,
    credentials: Credentials,
}

/// A registry client; cheap to share by reference across threads.
pub struct Registry {
    url: String,
    clients: Rotating<Clients>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("url", &self.url).finish()
    }
}

/// Splits credentials out of a URL (`https://key:secret@host/`): the URL without them, and them.
fn split_url(url: &str) -> Result<(String, Credentials), String> {
    let trimmed = url.trim_end_matches('/');
    let Ok(mut parsed) = reqwest::Url::parse(trimmed) else {
        // Not shown: it may hold credentials.
        return Err(
            "the Schema Registry URL is not a valid URL (e.g. https://registry:8081)".into(),
        );
    };
    if parsed.username().is_empty() {
        return Ok((trimmed.to_string(), Credentials::None));
    }
    let decode = |s: &str| {
        percent_decode(s)
            .map_err(|_| "the registry URL's credentials are not valid UTF-8".to_string())
    };
    let user = decode(parsed.username())?;
    let password = parsed.password().map(decode).transpose()?;
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    Ok((
        parsed.as_str().trim_end_matches('/').to_string(),
        Credentials::Basic(user, password),
    ))
}

fn percent_decode(s: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
}

impl RegistryAccess {
    /// Whether anything beyond the URL is configured.
    pub fn is_empty(&self) -> bool {
        *self == RegistryAccess::default()
    }

    fn credentials(&self, from_url: &Credentials) -> Result<Credentials, String> {
        if self.token_file.is_some() && (self.user.is_some() || self.password_file.is_some()) {
            return Err("the registry takes a user and password or a token, not both".into());
        }
        if let Some(token) = &self.token_file {
            return Ok(Credentials::Token(read_secret(
                "the registry token",
                token,
            )?));
        }
        match (&self.user, &self.password_file) {
            (Some(user), password) => Ok(Credentials::Basic(
                user.clone(),
                password
                    .as_ref()
                    .map(|p| read_secret("the registry password", p))
                    .transpose()?,
            )),
            (None, Some(_)) => {
                Err("a registry password without a user (--schema-registry-user)".into())
            }
            (None, None) => Ok(from_url.clone()),
        }
    }

    fn http_client(&self, timeout: Duration) -> Result<reqwest::blocking::ClientBuilder, String> {
        crate::runtime::secrets::https_client(
            "the registry",
            "--schema-registry",
            self.ca.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
        )
        .map(|builder| builder.timeout(timeout))
    }
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

impl Registry {
    /// A client of the registry at `url` (e.g. `http://127.0.0.1:18081/apis/ccompat/v7`) without
    /// credentials (or with those in the URL); each call gives up after `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Registry, String> {
        Self::connect(url, &RegistryAccess::default(), timeout)
    }

    /// A client of the registry at `url` with `access`. Credentials in the URL
    /// (`https://key:secret@host`) are taken out of it, and used when `access` names none.
    /// Errors name files, never their content.
    pub fn connect(
        url: &str,
        access: &RegistryAccess,
        timeout: Duration,
    ) -> Result<Registry, String> {
        let (url, from_url) = split_url(url)?;
        let access = access.clone();
        let base = url.clone();
        let clients = Rotating::new("schema registry credentials", move || {
            let credentials = access.credentials(&from_url)?;
            let mut builder = SrSettings::new_builder(base.clone());
            builder.set_timeout(timeout);
            match &credentials {
                Credentials::None => {}
                Credentials::Basic(user, password) => {
                    builder.set_basic_authorization(user, password.as_deref());
                }
                Credentials::Token(token) => {
                    builder.set_token_authorization(token);
                }
            }
            let settings = builder
                .build_with(access.http_client(timeout)?)
                .map_err(|e| format!("registry client for {base}: {}", e.error))?;
            let http = access
                .http_client(timeout)?
                .build()
                .map_err(|e| format!("registry client for {base}: {e}"))?;
            Ok(Clients {
                settings,
                http,
                credentials,
            })
        })?;
        Ok(Registry { url, clients })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The schema text registered under `id`.
    pub fn schema_by_id(&self, id: u32) -> Result<String, RegistryError> {
        get_schema_by_id(id, &self.clients.get().settings)
            .map(|s| s.schema)
            .map_err(|e| classify(e, &format!("schema id {id}")))
    }

    /// The versions of `subject`, oldest first; empty when the subject does not exist.
    pub fn versions(&self, subject: &str) -> Result<Vec<u32>, RegistryError> {
        match get_all_versions(&self.clients.get().settings, subject.to_string()) {
            Ok(mut v) => {
                v.sort_unstable();
                Ok(v)
            }
            Err(e) => match classify(e, &format!("subject {subject}")) {
                RegistryError::NotFound(_) => Ok(Vec::new()),
                other => Err(other),
            },
        }
    }

    /// One version of `subject`.
    pub fn version(&self, subject: &str, version: u32) -> Result<Registered, RegistryError> {
        let what = format!("subject {subject} version {version}");
        let raw = perform_sr_call(
            &self.clients.get().settings,
            SrCall::GetBySubjectAndVersion(subject, version),
        )
        .map_err(|e| classify(e, &what))?;
        match (raw.id, raw.schema) {
            (Some(id), Some(schema)) => Ok(Registered {
                id,
                version: raw.version.or(Some(version)),
                schema,
            }),
            _ => Err(RegistryError::Unavailable(format!(
                "{what}: no id or schema in the answer"
            ))),
        }
    }

    /// Registers `schema` under `subject` (or finds it registered already) and returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> Result<Registered, RegistryError> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema.to_string());
        let registered = post_schema(&self.clients.get().settings, subject.to_string(), supplied)
            .map_err(|e| classify(e, &format!("subject {subject}")))?;
        // The answer carries the id only; the version comes from a lookup.
        let version = self
            .lookup(subject, schema)
            .ok()
            .flatten()
            .and_then(|r| r.version);
        Ok(Registered {
            id: registered.id,
            version: registered.version.or(version),
            schema: registered.schema,
        })
    }

    /// The id of `schema` when it is one of the versions of `subject`, else `None`.
    pub fn lookup(&self, subject: &str, schema: &str) -> Result<Option<Registered>, RegistryError> {
        let url = format!("{}/subjects/{}", self.url, subject);
        let body = json!({ "schema": schema, "schemaType": "AVRO" });
        match self.call(|http| http.post(&url).json(&body), &url) {
            Ok(v) => Ok(Some(Registered {
                id: v
                    .get("id")
                    .and_then(Value::as_u64)
                    .map(|id| id as u32)
                    .ok_or_else(|| RegistryError::Unavailable(format!("{url}: no id in {v}")))?,
                version: v.get("version").and_then(Value::as_u64).map(|n| n as u32),
                schema: schema.to_string(),
            })),
            Err(RegistryError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The compatibility level of `subject` and whether it is set on the subject itself (`false`:
    /// the registry's global level applies).
    pub fn compatibility(&self, subject: &str) -> Result<(String, bool), RegistryError> {
        let url = format!("{}/config/{}", self.url, subject);
        match self.call(|http| http.get(&url), &url) {
            Ok(v) => {
                if let Some(level) = level_of(&v) {
                    return Ok((level, true));
                }
            }
            Err(RegistryError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let url = format!("{}/config", self.url);
        let v = self.call(|http| http.get(&url), &url)?;
        level_of(&v)
            .map(|level| (level, false))
            .ok_or_else(|| RegistryError::Unavailable(format!("{url}: no level in {v}")))
    }

    /// Sets the compatibility level of `subject`.
    pub fn set_compatibility(&self, subject: &str, level: &str) -> Result<(), RegistryError> {
        let url = format!("{}/config/{}", self.url, subject);
        let body = json!({ "compatibility": level });
        self.call(|http| http.put(&url).json(&body), &url)
            .map(|_| ())
    }

    fn call(
        &self,
        request: impl FnOnce(&reqwest::blocking::Client) -> reqwest::blocking::RequestBuilder,
        url: &str,
    ) -> Result<Value, RegistryError> {
        let clients = self.clients.get();
        let mut request = request(&clients.http);
        match &clients.credentials {
            Credentials::None => {}
            Credentials::Basic(user, password) => {
                request = request.basic_auth(user, password.as_ref())
            }
            Credentials::Token(token) => request = request.bearer_auth(token),
        }
        let response = request
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .send()
            .map_err(|e| RegistryError::Unavailable(format!("{url}: {e}")))?;
        let status = response.status();
        let text = response.text().unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
        if status.is_success() {
            return Ok(body);
        }
        // The registry's own message; any other body (a proxy's page) is not repeated: it could
        // echo the request's headers.
        let message = body
            .get("message")
            .and_then(Value::as_str)
            .map(|m| m.chars().take(500).collect())
            .unwrap_or_else(|| "no message".to_string());
        Err(match status.as_u16() {
            404 => RegistryError::NotFound(format!("{url}: {message}")),
            401 | 403 => {
                audit_refused(url, status.as_u16());
                RegistryError::Unauthorized(format!("HTTP {status} from {url}"))
            }
            400..=499 => RegistryError::Refused(format!("{message} (HTTP {status})")),
            _ => RegistryError::Unavailable(format!("{url}: HTTP {status}: {message}")),
        })
    }
}

fn audit_refused(what: &str, status: u16) {
    tracing::warn!(
        target: crate::runtime::secrets::AUDIT_TARGET,
        event = "registry_credentials_refused",
        status,
        what,
        "the schema registry refused our credentials"
    );
}

fn level_of(v: &Value) -> Option<String> {
    ["compatibilityLevel", "compatibility"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))
        .map(str::to_string)
}

/// Sorts a schema_registry_converter error: only an answer from the registry saying "not found" or
/// refusing counts as such; anything else (no connection, timeouts, server errors) is
/// unavailability, so a record is never dead-lettered because the registry was down.
fn classify(e: SRCError, what: &str) -> RegistryError {
    let text = match &e.cause {
        Some(cause) => format!("{what}: {}: {cause}", e.error),
        None => format!("{what}: {}", e.error),
    };
    if e.retriable {
        return RegistryError::Unavailable(text);
    }
    let status = e
        .error
        .split("failed with status ")
        .nth(1)
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(404) => RegistryError::NotFound(text),
        // The registry's message is not repeated: it may echo what was sent.
        Some(code @ (401 | 403)) => {
            audit_refused(what, code);
            RegistryError::Unauthorized(format!("{what}: HTTP {code}"))
        }
        // The registry's own words (its error code and message) say why.
        Some(400..=499) => RegistryError::Refused(e.cause.unwrap_or(text)),
        _ => RegistryError::Unavailable(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_saying_so_count_as_not_found_or_refused() {
        let http = |status: &str| {
            SRCError::new(
                &format!("HTTP request to schema registry failed with status {status}"),
                Some("whatever".into()),
                false,
            )
        };
        assert!(matches!(
            classify(http("404 Not Found"), "x"),
            RegistryError::NotFound(_)
        ));
        assert!(matches!(
            classify(http("409 Conflict"), "x"),
            RegistryError::Refused(_)
        ));
        for code in ["401 Unauthorized", "403 Forbidden"] {
            let e = classify(http(code), "schema id 7");
            assert!(matches!(e, RegistryError::Unauthorized(_)), "{e:?}");
            assert!(e.to_string().contains("credentials"), "{e}");
            assert!(!e.to_string().contains("whatever"), "{e}");
        }
        assert!(matches!(
            classify(http("500 Internal Server Error"), "x"),
            RegistryError::Unavailable(_)
        ));
        assert!(matches!(
            classify(SRCError::new("could not parse", None, false), "x"),
            RegistryError::Unavailable(_)
        ));
        assert!(matches!(
            classify(SRCError::new("connection refused", None, true), "x"),
            RegistryError::Unavailable(_)
        ));
    }
}

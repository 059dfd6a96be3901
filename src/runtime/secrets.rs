//! Secrets read from files, and their rotation.
//!
//! A secret (a SASL password, the registry's credentials, the HTTP token, signing keys) may live in
//! a file, as a Kubernetes secret mount provides it. SIGHUP asks the process to read every such
//! file again: it bumps a process-wide generation, and each holder of a secret compares the
//! generation it loaded at with the current one when it next uses the secret. A file that cannot
//! be read, or reads empty, keeps the previous value and says so in the audit log: a half-written
//! secret never replaces a working one.
//!
//! Security-relevant events (rotations, refused credentials, refused tokens, bad signatures) go
//! to the tracing target [`AUDIT_TARGET`], one structured event each, never with a secret's value.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The tracing target of security audit events (`RUST_LOG=saga_streams::audit=info`).
pub const AUDIT_TARGET: &str = "saga_streams::audit";

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The current generation of secret files: it changes on each rotation request.
pub fn generation() -> u64 {
    GENERATION.load(Ordering::SeqCst)
}

/// Asks every holder of a secret to read its file again (what SIGHUP does).
pub fn request_rotation() {
    let generation = GENERATION.fetch_add(1, Ordering::SeqCst) + 1;
    tracing::info!(target: AUDIT_TARGET, event = "secrets_rotation_requested", generation, "secret files will be read again");
}

/// Requests a rotation on each SIGHUP (from a thread of its own, so the request is logged).
pub fn rotate_on_sighup() -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
    std::thread::Builder::new()
        .name("sighup".into())
        .spawn(move || {
            for _ in signals.forever() {
                request_rotation();
            }
        })?;
    Ok(())
}

/// Reads a secret file: its content without the trailing newline. The error names the file and
/// what the secret is for, never its content.
pub fn read_secret(what: &str, path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{what}: cannot read {}: {e}", path.display()))?;
    let value = text.trim_end_matches(['\n', '\r']).to_string();
    if value.is_empty() {
        return Err(format!("{what}: {} is empty", path.display()));
    }
    Ok(value)
}

/// A value built from secret files, rebuilt when a rotation was requested since it was built.
/// Cheap to clone; every clone sees the same value.
pub struct Rotating<T> {
    what: String,
    load: Arc<dyn Fn() -> Result<T, String> + Send + Sync>,
    current: Arc<Mutex<(u64, Arc<T>)>>,
}

impl<T> Clone for Rotating<T> {
    fn clone(&self) -> Self {
        Self {
            what: self.what.clone(),
            load: self.load.clone(),
            current: self.current.clone(),
        }
    }
}

impl<T> std::fmt::Debug for Rotating<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotating")
            .field("what", &self.what)
            .finish()
    }
}

impl<T: Send + Sync + 'static> Rotating<T> {
    /// Loads the value now; an error is returned at once (start-up refuses a bad secret).
    pub fn new(
        what: impl Into<String>,
        load: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let generation = generation();
        let value = load()?;
        Ok(Self {
            what: what.into(),
            load: Arc::new(load),
            current: Arc::new(Mutex::new((generation, Arc::new(value)))),
        })
    }

    /// A value that never changes.
    pub fn fixed(what: impl Into<String>, value: T) -> Self
    where
        T: Clone,
    {
        let value = Arc::new(value);
        let shared = value.clone();
        Self {
            what: what.into(),
            load: Arc::new(move || Ok((*shared).clone())),
            current: Arc::new(Mutex::new((u64::MAX, value))),
        }
    }

    /// The current value, read again first if a rotation was requested since it was loaded. A
    /// failed reload keeps the previous value (logged on the audit target) and is not retried
    /// until the next rotation request.
    pub fn get(&self) -> Arc<T> {
        let now = generation();
        let mut current = match self.current.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.0 != now && current.0 != u64::MAX {
            current.0 = now;
            match (self.load)() {
                Ok(value) => {
                    current.1 = Arc::new(value);
                    tracing::info!(target: AUDIT_TARGET, event = "secret_reloaded", what = %self.what, generation = now, "secret read again");
                }
                Err(error) => {
                    tracing::error!(target: AUDIT_TARGET, event = "secret_reload_failed", what = %self.what, %error, "secret not read again; the previous one stays in use");
                }
            }
        }
        current.1.clone()
    }
}

/// A blocking HTTPS client builder trusting the CA bundle `ca` (besides the system's) and, with
/// `cert` and `key` (PEM certificate, PKCS#8 PEM key), presenting that identity. `what` names the
/// peer in errors ("the registry"), `flag` the flags' prefix (`--schema-registry`); errors never
/// include a key's contents.
pub fn https_client(
    what: &str,
    flag: &str,
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<reqwest::blocking::ClientBuilder, String> {
    let mut builder = reqwest::blocking::Client::builder();
    if let Some(ca) = ca {
        let pem =
            std::fs::read(ca).map_err(|e| format!("{what} CA bundle {}: {e}", ca.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{what} CA bundle {}: {e}", ca.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{what} CA bundle {} holds no certificate",
                ca.display()
            ));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    match (cert, key) {
        (Some(cert), Some(key)) => {
            let cert_pem = std::fs::read(cert)
                .map_err(|e| format!("{what} client certificate {}: {e}", cert.display()))?;
            let key_pem = std::fs::read(key).map_err(|e| {
                format!(
                    "{what} client key {}: cannot read: {}",
                    key.display(),
                    e.kind()
                )
            })?;
            let identity = reqwest::Identity::from_pkcs8_pem(&cert_pem, &key_pem).map_err(|_| {
                format!(
                    "{what} client certificate {} with the key {}: not a PEM certificate and PKCS#8 PEM key",
                    cert.display(),
                    key.display()
                )
            })?;
            builder = builder.identity(identity);
        }
        (None, None) => {}
        _ => {
            return Err(format!(
                "{what} client certificate needs both {flag}-cert and {flag}-key"
            ))
        }
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_rereads_and_a_bad_file_keeps_the_old_value() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "first\n").unwrap();
        let path = file.clone();
        let secret = Rotating::new("the test token", move || read_secret("token", &path)).unwrap();
        assert_eq!(*secret.get(), "first");
        std::fs::write(&file, "second\n").unwrap();
        // Not read again until asked.
        assert_eq!(*secret.get(), "first");
        request_rotation();
        assert_eq!(*secret.get(), "second");
        std::fs::write(&file, "").unwrap();
        request_rotation();
        assert_eq!(*secret.get(), "second", "an empty file keeps the old value");
        std::fs::remove_file(&file).unwrap();
        assert!(Rotating::new("gone", move || read_secret("token", &file)).is_err());
    }
}

//! Signed events: an HMAC-SHA256 over a record's key, value and correlation id, carried in the
//! `X-Signature` header, with a key id so that several keys are valid during a rotation.
//!
//! The scheme (version 1), precisely enough to implement with PHP's `hash_hmac`:
//!
//! ```text
//! field(x)  = decimal byte length of x . ":" . x . "\n"      (a missing part counts as empty)
//! message   = "saga-streams-signature-v1\n" . field(record key) . field(record value)
//!             . field(value of the X-Correlation-ID header)
//! signature = lowercase hex of HMAC-SHA256(key secret, message)
//! header    X-Signature: v1;kid=<key id>;hmac-sha256=<signature>
//! ```
//!
//! The secret is the key's text as written in the keys file (its bytes, no decoding). Keys files
//! hold one key per line, `<key id> <secret>`; `#` starts a comment line. The first key signs;
//! every key verifies. Rotating: add the new key second (everyone accepts it), then move it first
//! (everyone signs with it), then remove the old one, each step followed by SIGHUP.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hmac::{KeyInit, Mac};

use crate::runtime::secrets::{read_secret, Rotating};

/// The header a signature travels in.
pub const SIGNATURE_HEADER: &str = "X-Signature";
/// The header whose value the signature covers besides the key and the value.
pub const SIGNED_HEADER: &str = "X-Correlation-ID";
const DOMAIN: &[u8] = b"saga-streams-signature-v1\n";

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Whether a topic's records carry signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignatureMode {
    /// Not signed, not verified (the default).
    #[default]
    Off,
    /// Outputs are signed; an input without a signature is accepted, one with a bad signature
    /// is not.
    Optional,
    /// Outputs are signed; an input needs a valid signature.
    Required,
}

impl SignatureMode {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "optional" => Ok(Self::Optional),
            "required" => Ok(Self::Required),
            other => Err(format!(
                "'{other}' is not a signature mode (required, optional, off)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Optional => "optional",
            Self::Required => "required",
        }
    }
}

/// The keys of a keys file: the first signs, all verify. Never printed.
#[derive(Clone)]
pub struct SigningKeys {
    keys: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("SigningKeys").field("ids", &ids).finish()
    }
}

impl SigningKeys {
    /// Parses `<key id> <secret>` lines. Errors name the line, never a secret.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((id, secret)) = line.split_once(char::is_whitespace) else {
                return Err(format!("line {}: not '<key id> <secret>'", n + 1));
            };
            let secret = secret.trim();
            if secret.len() < 16 {
                return Err(format!(
                    "line {}: the secret of key '{id}' is shorter than 16 bytes",
                    n + 1
                ));
            }
            if keys.iter().any(|(k, _)| k == id) {
                return Err(format!("line {}: key id '{id}' is listed twice", n + 1));
            }
            keys.push((id.to_string(), secret.as_bytes().to_vec()));
        }
        if keys.is_empty() {
            return Err("no key (lines of '<key id> <secret>')".into());
        }
        Ok(Self { keys })
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = read_secret("the signing keys", path)?;
        Self::parse(&text).map_err(|e| format!("the signing keys {}: {e}", path.display()))
    }

    /// The key ids, the signing one first.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// The `X-Signature` value for a record, signed with the first key.
    pub fn sign(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        correlation: Option<&[u8]>,
    ) -> Result<String, String> {
        let (id, secret) = self.keys.first().ok_or("no signing key")?;
        let mac = mac(secret, key, value, correlation)?;
        Ok(format!(
            "v1;kid={id};hmac-sha256={}",
            hex::encode(mac.finalize().into_bytes())
        ))
    }

    /// Checks a record's `X-Signature` value.
    pub fn verify(
        &self,
        header: &[u8],
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        correlation: Option<&[u8]>,
    ) -> Result<(), String> {
        let header = std::str::from_utf8(header).map_err(|_| "the signature is not text")?;
        let mut parts = header.split(';');
        if parts.next() != Some("v1") {
            return Err("the signature is not of version v1".into());
        }
        let fields: BTreeMap<&str, &str> = parts.filter_map(|p| p.split_once('=')).collect();
        let (Some(id), Some(hmac_hex)) = (fields.get("kid"), fields.get("hmac-sha256")) else {
            return Err("the signature lacks kid= or hmac-sha256=".into());
        };
        let Some((_, secret)) = self.keys.iter().find(|(k, _)| k == id) else {
            return Err(format!("key id '{id}' is not among the keys"));
        };
        let given = hex::decode(hmac_hex).map_err(|_| "the signature is not hex")?;
        mac(secret, key, value, correlation)?
            .verify_slice(&given)
            .map_err(|_| format!("the signature with key '{id}' does not match the record"))
    }
}

fn mac(
    secret: &[u8],
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    correlation: Option<&[u8]>,
) -> Result<HmacSha256, String> {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret)
        .map_err(|_| "the signing key cannot be used for HMAC")?;
    mac.update(DOMAIN);
    for part in [key, value, correlation] {
        let part = part.unwrap_or_default();
        mac.update(part.len().to_string().as_bytes());
        mac.update(b":");
        mac.update(part);
        mac.update(b"\n");
    }
    Ok(mac)
}

/// Why an input's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureProblem {
    Missing,
    Bad(String),
}

/// The signature modes of a process's topics and its keys.
#[derive(Clone, Default)]
pub struct Signing {
    modes: BTreeMap<String, SignatureMode>,
    keys: Option<Rotating<SigningKeys>>,
}

impl std::fmt::Debug for Signing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signing")
            .field("modes", &self.modes)
            .finish()
    }
}

impl Signing {
    /// Signing for topics with `modes` (topics not named are off), with the keys of
    /// `keys_file`, read again on SIGHUP. Fails when a topic the process reads or writes is
    /// signed and no keys are given.
    pub fn new(
        modes: BTreeMap<String, SignatureMode>,
        keys_file: Option<&PathBuf>,
        topics: &[String],
    ) -> Result<Self, String> {
        let signed: Vec<&String> = topics
            .iter()
            .filter(|t| modes.get(*t).copied().unwrap_or_default() != SignatureMode::Off)
            .collect();
        let keys = match keys_file {
            Some(path) => {
                let path = path.clone();
                Some(Rotating::new("the signing keys", move || {
                    SigningKeys::load(&path)
                })?)
            }
            None if !signed.is_empty() => {
                return Err(format!(
                    "topics {} are signed (`signatures:` in the topology): give the keys with --signing-keys",
                    signed.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ")
                ))
            }
            None => None,
        };
        Ok(Self { modes, keys })
    }

    /// No topic signed.
    pub fn off() -> Self {
        Self::default()
    }

    pub fn mode(&self, topic: &str) -> SignatureMode {
        self.modes.get(topic).copied().unwrap_or_default()
    }

    /// The `X-Signature` header value an output record on `topic` gets, if the topic is signed.
    pub fn sign(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        correlation: Option<&[u8]>,
    ) -> Result<Option<String>, String> {
        if self.mode(topic) == SignatureMode::Off {
            return Ok(None);
        }
        match &self.keys {
            Some(keys) => keys.get().sign(key, value, correlation).map(Some),
            None => Err(format!(
                "{topic} is signed but no signing keys are configured"
            )),
        }
    }

    /// Checks an input record on `topic` with `signature` (its `X-Signature` header).
    pub fn check(
        &self,
        topic: &str,
        signature: Option<&[u8]>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        correlation: Option<&[u8]>,
    ) -> Result<(), SignatureProblem> {
        let mode = self.mode(topic);
        let keys = match (&self.keys, mode) {
            (_, SignatureMode::Off) => return Ok(()),
            (Some(keys), _) => keys.get(),
            (None, _) => {
                return Err(SignatureProblem::Bad(
                    "no signing keys are configured".into(),
                ))
            }
        };
        match (signature, mode) {
            (None, SignatureMode::Optional) => Ok(()),
            (None, _) => Err(SignatureProblem::Missing),
            (Some(header), _) => keys
                .verify(header, key, value, correlation)
                .map_err(SignatureProblem::Bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &str = "# rotation: k2 signs, k1 still verifies\nk2 second-secret-0123456789\nk1 first-secret-0123456789\n";

    #[test]
    fn a_signature_covers_key_value_and_correlation_id() {
        let keys = SigningKeys::parse(KEYS).unwrap();
        let header = keys.sign(Some(b"o-1"), Some(b"{}"), Some(b"c-1")).unwrap();
        assert!(header.starts_with("v1;kid=k2;hmac-sha256="), "{header}");
        let h = header.as_bytes();
        assert!(keys
            .verify(h, Some(b"o-1"), Some(b"{}"), Some(b"c-1"))
            .is_ok());
        for (k, v, c) in [
            (Some(&b"o-2"[..]), Some(&b"{}"[..]), Some(&b"c-1"[..])),
            (Some(b"o-1"), Some(b"{ }"), Some(b"c-1")),
            (Some(b"o-1"), Some(b"{}"), None),
            // A length prefix keeps parts from sliding into each other.
            (Some(b"o-1{"), Some(b"}"), Some(b"c-1")),
        ] {
            assert!(keys.verify(h, k, v, c).is_err(), "{k:?} {v:?} {c:?}");
        }
        // An old key still verifies; an unknown one does not.
        let old = SigningKeys::parse("k1 first-secret-0123456789").unwrap();
        let by_old = old.sign(Some(b"o-1"), None, None).unwrap();
        assert!(keys
            .verify(by_old.as_bytes(), Some(b"o-1"), None, None)
            .is_ok());
        let other = SigningKeys::parse("k9 other-secret-0123456789").unwrap();
        let err = keys
            .verify(
                other.sign(None, None, None).unwrap().as_bytes(),
                None,
                None,
                None,
            )
            .unwrap_err();
        assert!(err.contains("k9"), "{err}");
    }

    #[test]
    fn matches_the_documented_scheme() {
        // HMAC-SHA256 of the message as the module documentation writes it.
        let keys = SigningKeys::parse("k1 first-secret-0123456789").unwrap();
        let message = b"saga-streams-signature-v1\n3:o-1\n2:{}\n3:c-1\n";
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(b"first-secret-0123456789").unwrap();
        mac.update(message);
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(
            keys.sign(Some(b"o-1"), Some(b"{}"), Some(b"c-1")).unwrap(),
            format!("v1;kid=k1;hmac-sha256={expected}")
        );
    }

    #[test]
    fn bad_keys_files_are_refused_without_showing_secrets() {
        for text in [
            "",
            "# only a comment",
            "k1",
            "k1 short",
            "k1 a-long-enough-secret\nk1 another-long-secret",
        ] {
            let err = SigningKeys::parse(text).unwrap_err();
            assert!(
                !err.contains("short") || err.contains("shorter than"),
                "{err}"
            );
            assert!(
                !err.contains("a-long-enough") && !err.contains("another-long"),
                "{err}"
            );
        }
        let keys = SigningKeys::parse(KEYS).unwrap();
        assert!(!format!("{keys:?}").contains("secret-0123"));
    }
}

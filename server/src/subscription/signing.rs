//! The webhook signing key: Ed25519 (through `ring`, which the server already carries for TLS),
//! its public JWK Set, and the `Webhook-Signature` header of section 7.1.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// Why the signing key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("webhook signing key {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("webhook signing key {0} is not a 32-byte Ed25519 seed")]
    BadKey(String),
    #[error("no randomness available for a webhook signing key")]
    Random,
}

/// The server's webhook signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    kid: String,
    /// The public key, base64url (the JWK's `x`).
    x: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish()
    }
}

/// Random bytes from the operating system's generator (tokens, wake ids, seeds).
pub fn random_bytes<const N: usize>() -> Option<[u8; N]> {
    let mut buf = [0u8; N];
    SystemRandom::new().fill(&mut buf).ok()?;
    Some(buf)
}

/// A random token, base64url (32 bytes: 256 bits).
pub fn random_token() -> Option<String> {
    random_bytes::<32>().map(|b| URL_SAFE_NO_PAD.encode(b))
}

/// SHA-256 of a token: what is stored, so the state (and a durable record of it) never holds a
/// live bearer token.
pub fn token_digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl SigningKey {
    /// A fresh key that lives as long as the process (memory mode).
    pub fn generate() -> Result<SigningKey, SigningError> {
        let seed = random_bytes::<32>().ok_or(SigningError::Random)?;
        Self::from_seed(&seed, "generated")
    }

    /// The key kept at `path` (a raw 32-byte seed, mode 0600), made on first use.
    pub fn load_or_create(path: &Path) -> Result<SigningKey, SigningError> {
        let shown = path.display().to_string();
        let io = |source| SigningError::Io {
            path: shown.clone(),
            source,
        };
        match std::fs::read(path) {
            Ok(seed) => Self::from_seed(&seed, &shown),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let seed = random_bytes::<32>().ok_or(SigningError::Random)?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                // Written under a temporary name and renamed, so a crash never leaves half a key.
                let tmp = path.with_extension("tmp");
                write_private(&tmp, &seed).map_err(io)?;
                crate::storage::fsutil::crash_point("signing-key-tmp-written");
                std::fs::rename(&tmp, path).map_err(io)?;
                crate::storage::fsutil::crash_point("signing-key-renamed");
                // The rename is durable only once the directory is synced: a key lost to a
                // power loss would be replaced by another, and receivers would reject it.
                let dir = path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io)?;
                Self::from_seed(&seed, &shown)
            }
            Err(e) => Err(io(e)),
        }
    }

    fn from_seed(seed: &[u8], shown: &str) -> Result<SigningKey, SigningError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| SigningError::BadKey(shown.to_owned()))?;
        let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
        // RFC 7638 thumbprint: SHA-256 over the required members in lexicographic order.
        let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
        let thumb = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
        let kid = format!("ds_{}", URL_SAFE_NO_PAD.encode(thumb.as_ref()));
        Ok(SigningKey { pair, kid, x })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public JWK Set (section 6.5).
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": [{
                "kty": "OKP",
                "crv": "Ed25519",
                "kid": self.kid,
                "use": "sig",
                "alg": "EdDSA",
                "x": self.x,
            }]
        })
    }

    /// `Webhook-Signature` for `body` sent at Unix second `t`: Ed25519 over `<t>.<body>`.
    pub fn signature_header(&self, t: u64, body: &[u8]) -> String {
        let mut msg = Vec::with_capacity(body.len() + 21);
        msg.extend_from_slice(t.to_string().as_bytes());
        msg.push(b'.');
        msg.extend_from_slice(body);
        let sig = self.pair.sign(&msg);
        format!(
            "t={t},kid={},ed25519={}",
            self.kid,
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        )
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ED25519, UnparsedPublicKey};

    #[test]
    fn a_signature_verifies_with_the_published_key() {
        let key = SigningKey::generate().expect("key");
        let header = key.signature_header(1_700_000_000, b"{\"a\":1}");
        let (t, rest) = header.split_once(",kid=").expect("t");
        let (kid, sig) = rest.split_once(",ed25519=").expect("sig");
        assert_eq!(t, "t=1700000000");
        assert_eq!(kid, key.kid());
        let jwks = key.jwks();
        let x = jwks["keys"][0]["x"].as_str().expect("x");
        let public = URL_SAFE_NO_PAD.decode(x).expect("b64");
        let sig = URL_SAFE_NO_PAD.decode(sig).expect("b64");
        let verifier = UnparsedPublicKey::new(&ED25519, public);
        assert!(verifier.verify(b"1700000000.{\"a\":1}", &sig).is_ok());
        assert!(verifier.verify(b"1700000001.{\"a\":1}", &sig).is_err());
    }

    #[test]
    fn a_stored_key_keeps_its_kid_across_loads() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("keys/webhook.key");
        let first = SigningKey::load_or_create(&path).expect("create");
        let again = SigningKey::load_or_create(&path).expect("load");
        assert_eq!(first.kid(), again.kid());
        assert!(first.kid().starts_with("ds_"));
        std::fs::write(&path, b"short").expect("write");
        assert!(matches!(
            SigningKey::load_or_create(&path),
            Err(SigningError::BadKey(_))
        ));
    }
}

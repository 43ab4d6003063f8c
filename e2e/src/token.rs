//! Test JWTs for the Envoy `jwt_authn` filter: one valid kind and one per way a token can be wrong.
//!
//! Signs with the TEST-ONLY keys in `fixtures/`. The issuer and audience are spelled here and in the
//! Envoy configs (`envoy/*.yaml*`); `issuer_and_audience_match_the_envoy_configs` keeps them equal.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::fixtures;

/// The `iss` Envoy accepts in e2e and the compose demo.
pub const ISSUER: &str = "https://auth.durable-streams.test";
/// The `aud` Envoy accepts everywhere (production template included).
pub const AUDIENCE: &str = "durable-streams";
/// The key id of `fixtures/jwks.json`.
pub const KEY_ID: &str = "ds-test-1";
/// The subject tokens carry unless the caller picks one; Envoy forwards it as `x-ds-subject`.
pub const DEFAULT_SUBJECT: &str = "e2e-user";

/// How long a valid token lives: long enough for the longest e2e test.
const VALID_FOR: Duration = Duration::from_secs(3600);
/// How far in the past an expired token expired: well beyond Envoy's 60 s clock-skew allowance.
const EXPIRED_SINCE: Duration = Duration::from_secs(600);

/// Which token to mint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenKind {
    /// Accepted: right key, issuer, audience, not expired.
    Valid,
    /// Right everything, but `exp` is in the past.
    Expired,
    /// Signed by the trusted key, `iss` is someone else.
    WrongIssuer,
    /// Signed by the trusted key, `aud` is another service.
    WrongAudience,
    /// Claims and `kid` as a valid token, signed by a key that is not in the JWKS.
    BadSignature,
}

impl TokenKind {
    /// Every kind, for tests that walk them all.
    pub const ALL: [TokenKind; 5] = [
        TokenKind::Valid,
        TokenKind::Expired,
        TokenKind::WrongIssuer,
        TokenKind::WrongAudience,
        TokenKind::BadSignature,
    ];
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read signing key {path}: {source}")]
    ReadKey {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("signing key {path} is not an RSA PEM key: {source}")]
    ParseKey {
        path: std::path::PathBuf,
        source: jsonwebtoken::errors::Error,
    },
    #[error("cannot sign token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    #[error("system clock is before 1970")]
    Clock,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    iat: u64,
    exp: u64,
}

/// A token of `kind` for [`DEFAULT_SUBJECT`].
pub fn mint(kind: TokenKind) -> Result<String, TokenError> {
    mint_for(DEFAULT_SUBJECT, kind)
}

/// A token of `kind` for `subject`.
pub fn mint_for(subject: &str, kind: TokenKind) -> Result<String, TokenError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| TokenError::Clock)?
        .as_secs();
    let (iat, exp) = if kind == TokenKind::Expired {
        let exp = now - EXPIRED_SINCE.as_secs();
        (exp - VALID_FOR.as_secs(), exp)
    } else {
        (now, now + VALID_FOR.as_secs())
    };
    let claims = Claims {
        iss: if kind == TokenKind::WrongIssuer {
            "https://someone-else.test"
        } else {
            ISSUER
        },
        aud: if kind == TokenKind::WrongAudience {
            "another-service"
        } else {
            AUDIENCE
        },
        sub: subject,
        iat,
        exp,
    };
    let key_path = if kind == TokenKind::BadSignature {
        fixtures::path("jwt-untrusted-private.pem")
    } else {
        fixtures::path("jwt-private.pem")
    };
    let pem = std::fs::read(&key_path).map_err(|source| TokenError::ReadKey {
        path: key_path.clone(),
        source,
    })?;
    let key = EncodingKey::from_rsa_pem(&pem).map_err(|source| TokenError::ParseKey {
        path: key_path,
        source,
    })?;
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(KEY_ID.to_owned());
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[derive(serde::Deserialize)]
    struct Decoded {
        iss: String,
        aud: String,
        sub: String,
        exp: u64,
    }

    fn verify_with_fixture_key(token: &str) -> jsonwebtoken::errors::Result<Decoded> {
        let public = std::fs::read(fixtures::path("jwt-public.pem")).expect("fixture public key");
        let key = DecodingKey::from_rsa_pem(&public).expect("fixture public key is RSA PEM");
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        jsonwebtoken::decode::<Decoded>(token, &key, &validation).map(|data| data.claims)
    }

    #[test]
    fn valid_token_verifies_against_the_fixture_public_key() {
        let token = mint_for("alice", TokenKind::Valid).expect("mint");
        let claims = verify_with_fixture_key(&token).expect("valid token verifies");
        assert_eq!(claims.iss, ISSUER);
        assert_eq!(claims.aud, AUDIENCE);
        assert_eq!(claims.sub, "alice");
        let header = jsonwebtoken::decode_header(&token).expect("header");
        assert_eq!(header.kid.as_deref(), Some(KEY_ID));
    }

    /// The compose walkthrough mints with `fixtures/mint-token.sh` (Docker alone, no Rust): its
    /// token must be what `mint_for` makes, as far as Envoy checks.
    #[test]
    fn the_shell_minter_makes_the_same_valid_token() {
        let output = std::process::Command::new("sh")
            .arg(fixtures::path("mint-token.sh"))
            .arg("bob")
            .output()
            .expect("run sh fixtures/mint-token.sh (needs openssl)");
        assert!(
            output.status.success(),
            "mint-token.sh failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let token = String::from_utf8(output.stdout).expect("utf-8 token");
        let token = token.trim_end();
        let claims = verify_with_fixture_key(token).expect("shell token verifies");
        assert_eq!(claims.iss, ISSUER);
        assert_eq!(claims.aud, AUDIENCE);
        assert_eq!(claims.sub, "bob");
        let header = jsonwebtoken::decode_header(token).expect("header");
        assert_eq!(header.kid.as_deref(), Some(KEY_ID));
    }

    #[test]
    fn the_shell_minter_refuses_a_subject_that_would_break_its_json() {
        let output = std::process::Command::new("sh")
            .arg(fixtures::path("mint-token.sh"))
            .arg("a\"b")
            .output()
            .expect("run sh fixtures/mint-token.sh");
        assert!(!output.status.success());
        assert!(output.stdout.is_empty());
    }

    #[test]
    fn every_bad_kind_fails_verification() {
        for kind in TokenKind::ALL {
            if kind == TokenKind::Valid {
                continue;
            }
            let token = mint(kind).expect("mint");
            assert!(
                verify_with_fixture_key(&token).is_err(),
                "{kind:?} token unexpectedly verified"
            );
        }
    }

    #[test]
    fn expired_token_expired_beyond_clock_skew() {
        let token = mint(TokenKind::Expired).expect("mint");
        let key = DecodingKey::from_rsa_pem(
            &std::fs::read(fixtures::path("jwt-public.pem")).expect("fixture public key"),
        )
        .expect("rsa pem");
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_exp = false;
        validation.set_audience(&[AUDIENCE]);
        let claims = jsonwebtoken::decode::<Decoded>(&token, &key, &validation)
            .expect("signature and audience are fine")
            .claims;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        assert!(
            claims.exp + 60 < now,
            "exp {} is within skew of {now}",
            claims.exp
        );
    }

    #[test]
    fn jwks_kid_matches_the_token_kid() {
        let jwks: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixtures::path("jwks.json")).expect("fixture jwks"),
        )
        .expect("jwks is json");
        assert_eq!(jwks["keys"][0]["kid"], KEY_ID);
    }

    #[test]
    fn issuer_and_audience_match_the_envoy_configs() {
        let e2e = std::fs::read_to_string(fixtures::envoy_template("e2e.yaml.tmpl"))
            .expect("envoy/e2e.yaml.tmpl");
        assert!(
            e2e.contains(&format!("issuer: {ISSUER}")),
            "e2e config lacks issuer {ISSUER}"
        );
        assert!(
            e2e.contains(&format!("audiences: [{AUDIENCE}]")),
            "e2e config lacks audience {AUDIENCE}"
        );
        // Production keeps the audience (its issuer is the operator's to fill in).
        let production = std::fs::read_to_string(fixtures::envoy_template("envoy.yaml"))
            .expect("envoy/envoy.yaml");
        assert!(production.contains(&format!("audiences: [{AUDIENCE}]")));
    }
}

//! The worker's credentials for the server (or the Envoy in front of it): none, a fixed bearer
//! token (`bearer_token`), or a token file (`token_file`) that is re-read when it changes and
//! after every 401, so a token rotated on disk (by a sidecar, a mounted secret) is picked up
//! without a restart, and an expired one does not stall the worker for longer than it takes to
//! replace the file.
//!
//! It also owns the authentication half of readiness: after [`UNREADY_AFTER_REFUSALS`] refusals
//! in a row, with no accepted request between them, `/readyz` answers 503 and says why.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use reqwest::RequestBuilder;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use tokio_util::sync::CancellationToken;

/// How often the token file's modification time and size are looked at.
pub const TOKEN_FILE_POLL: Duration = Duration::from_secs(2);
/// Refusals in a row after which the worker reports itself unready: one is a token that expired
/// a moment before its replacement landed; several mean nobody is replacing it.
pub const UNREADY_AFTER_REFUSALS: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read token_file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token_file {path} is empty")]
    Empty { path: PathBuf },
    #[error("the token in {what} cannot be sent in a header (it holds control characters)")]
    NotAHeader { what: String },
}

/// What the file looked like when last read, to notice a replacement without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

#[derive(Debug)]
pub struct Credentials {
    /// The token file, if the token comes from one.
    file: Option<PathBuf>,
    /// The `Authorization` value sent now; `None` sends none.
    current: RwLock<Option<HeaderValue>>,
    stamp: RwLock<Option<FileStamp>>,
    /// 401s since the last request the server (or proxy) let through.
    refusals_in_a_row: AtomicU64,
}

impl Credentials {
    /// No credentials, or a fixed token.
    pub fn fixed(token: Option<&str>) -> Result<Self, AuthError> {
        let current = token.map(|t| bearer(t, "bearer_token")).transpose()?;
        Ok(Self {
            file: None,
            current: RwLock::new(current),
            stamp: RwLock::new(None),
            refusals_in_a_row: AtomicU64::new(0),
        })
    }

    /// The token in `path` (surrounding whitespace ignored), which must be readable now.
    pub async fn from_file(path: &Path) -> Result<Self, AuthError> {
        let (value, stamp) = read_token(path).await?;
        Ok(Self {
            file: Some(path.to_owned()),
            current: RwLock::new(Some(value)),
            stamp: RwLock::new(Some(stamp)),
            refusals_in_a_row: AtomicU64::new(0),
        })
    }

    /// `request` with the current `Authorization` header, if any.
    pub fn authorize(&self, request: RequestBuilder) -> RequestBuilder {
        let current = self.current.read().map(|c| c.clone()).unwrap_or(None);
        match current {
            Some(value) => request.header(AUTHORIZATION, value),
            None => request,
        }
    }

    /// A request got past authentication (any status but 401).
    pub fn accepted(&self) {
        self.refusals_in_a_row.store(0, Ordering::Relaxed);
    }

    /// A request was refused with 401: count it, and re-read the token file. Returns whether
    /// the token changed (the caller then retries at once instead of backing off).
    pub async fn refused(&self) -> bool {
        // The caller logs the refusal with its stream; a changed token is logged by `reload`.
        self.refusals_in_a_row.fetch_add(1, Ordering::Relaxed);
        crate::metrics::auth_failure();
        self.reload(true).await
    }

    /// Why the worker is not ready, if the credentials keep being refused.
    pub fn readiness(&self) -> Result<(), String> {
        let refusals = self.refusals_in_a_row.load(Ordering::Relaxed);
        if refusals < UNREADY_AFTER_REFUSALS {
            return Ok(());
        }
        Err(match &self.file {
            Some(path) => format!(
                "the server refused the credentials {refusals} times in a row (401); \
                 token_file {} was re-read after each refusal: put a valid token there",
                path.display()
            ),
            None => format!(
                "the server refused the credentials {refusals} times in a row (401); \
                 set a valid bearer_token, or use token_file so it can be replaced without a restart"
            ),
        })
    }

    /// Re-reads the token file when its modification time or size changed, every
    /// [`TOKEN_FILE_POLL`], until `shutdown`. Returns at once without a token file.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        if self.file.is_none() {
            return;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(TOKEN_FILE_POLL) => {}
            }
            self.reload(false).await;
        }
    }

    /// Re-reads the file (always when `force`, else only if its stamp changed); returns whether
    /// the token changed. A file that cannot be read keeps the token there was, with a warning:
    /// a replacement written in two steps must not leave the worker without credentials.
    async fn reload(&self, force: bool) -> bool {
        let Some(path) = &self.file else {
            return false;
        };
        if !force {
            let stamp = match tokio::fs::metadata(path).await {
                Ok(m) => stamp_of(&m),
                Err(e) => {
                    tracing::warn!(token_file = %path.display(), error = %e, "cannot stat the token file; keeping the current token");
                    return false;
                }
            };
            if self
                .stamp
                .read()
                .map(|s| *s == Some(stamp))
                .unwrap_or(false)
            {
                return false;
            }
        }
        match read_token(path).await {
            Ok((value, stamp)) => {
                if let Ok(mut s) = self.stamp.write() {
                    *s = Some(stamp);
                }
                let Ok(mut current) = self.current.write() else {
                    return false;
                };
                if current.as_ref() == Some(&value) {
                    return false;
                }
                *current = Some(value);
                tracing::info!(token_file = %path.display(), "token file changed; using the new token");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "keeping the current token");
                false
            }
        }
    }
}

fn stamp_of(metadata: &std::fs::Metadata) -> FileStamp {
    FileStamp {
        modified: metadata.modified().ok(),
        len: metadata.len(),
    }
}

async fn read_token(path: &Path) -> Result<(HeaderValue, FileStamp), AuthError> {
    let read_error = |source| AuthError::Read {
        path: path.to_owned(),
        source,
    };
    let metadata = tokio::fs::metadata(path).await.map_err(read_error)?;
    let text = tokio::fs::read_to_string(path).await.map_err(read_error)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(AuthError::Empty {
            path: path.to_owned(),
        });
    }
    let value = bearer(token, &path.display().to_string())?;
    Ok((value, stamp_of(&metadata)))
}

fn bearer(token: &str, what: &str) -> Result<HeaderValue, AuthError> {
    let mut value =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| AuthError::NotAHeader {
            what: what.to_owned(),
        })?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(credentials: &Credentials) -> Option<String> {
        let request = credentials
            .authorize(reqwest::Client::new().get("http://127.0.0.1:1/"))
            .build()
            .ok()?;
        request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    #[tokio::test]
    async fn a_401_rereads_the_file_and_a_replaced_token_is_sent() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "old-token\n").expect("write");
        let credentials = Credentials::from_file(&path).await.expect("load");
        assert_eq!(sent(&credentials).as_deref(), Some("Bearer old-token"));
        assert!(!credentials.refused().await, "same file: nothing changed");
        std::fs::write(&path, "new-token").expect("replace");
        assert!(
            credentials.refused().await,
            "the 401 re-read picked up the new token"
        );
        assert_eq!(sent(&credentials).as_deref(), Some("Bearer new-token"));
    }

    #[tokio::test]
    async fn repeated_refusals_make_it_unready_until_one_is_accepted() {
        let credentials = Credentials::fixed(Some("t")).expect("fixed");
        for _ in 0..UNREADY_AFTER_REFUSALS - 1 {
            credentials.refused().await;
            assert!(credentials.readiness().is_ok());
        }
        credentials.refused().await;
        let why = credentials.readiness().expect_err("unready");
        assert!(why.contains("401"), "{why}");
        credentials.accepted();
        assert!(credentials.readiness().is_ok());
    }

    #[tokio::test]
    async fn an_unreadable_or_empty_replacement_keeps_the_token() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "good").expect("write");
        let credentials = Credentials::from_file(&path).await.expect("load");
        std::fs::write(&path, "  \n").expect("empty it");
        assert!(!credentials.refused().await);
        assert_eq!(sent(&credentials).as_deref(), Some("Bearer good"));
        assert!(matches!(
            Credentials::from_file(&dir.path().join("missing")).await,
            Err(AuthError::Read { .. })
        ));
    }
}

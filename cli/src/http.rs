//! The HTTP side of `ds`: one reqwest client with the caller's credentials and CA, requests
//! retried with backoff while the server is unreachable or answers 5xx/429, and a status turned
//! into the error kind (and exit code) a script sees.
//!
//! Only requests that are safe to repeat are retried: create (a repeated PUT with the same
//! configuration is 200), appends carrying producer headers (a repeat is deduplicated),
//! close-only POSTs, reads, HEAD and DELETE (a repeated DELETE's 404 is taken as success by its
//! caller).

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};

use crate::error::CliError;

/// Connecting to a live server takes milliseconds; this only bounds a black-holed address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole-request bound for everything but live reads.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Live SSE reads have no end; the server sends a keep-alive comment every 15 s by default, so a
/// connection silent for this long is dead.
pub const LIVE_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Backoff between attempts: doubled from the first to the cap, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How much of an error body goes into a message.
const ERROR_BODY_CHARS: usize = 300;

/// Settings shared by every command.
pub struct ClientOptions<'a> {
    /// `Authorization` header value (`Bearer <token>` or the upstream CLI's raw `--auth`).
    pub authorization: Option<String>,
    /// PEM file of the CA(s) to trust instead of the system's, as `curl --cacert`.
    pub cacert: Option<&'a Path>,
    /// How long to keep retrying a request that fails for a transient reason.
    pub retry_for: Duration,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    live: reqwest::Client,
    retry_for: Duration,
}

impl Client {
    pub fn new(options: ClientOptions<'_>) -> Result<Self, CliError> {
        let mut headers = HeaderMap::new();
        if let Some(value) = &options.authorization {
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                CliError::Usage("the token contains characters a header cannot carry".to_owned())
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let builder = || -> Result<reqwest::ClientBuilder, CliError> {
            let mut builder = reqwest::Client::builder()
                .default_headers(headers.clone())
                .connect_timeout(CONNECT_TIMEOUT)
                .user_agent(concat!("ds/", env!("CARGO_PKG_VERSION")));
            if let Some(path) = options.cacert {
                let pem = std::fs::read(path)
                    .map_err(|e| CliError::Usage(format!("--cacert {}: {e}", path.display())))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    CliError::Usage(format!(
                        "--cacert {}: not a PEM certificate: {e}",
                        path.display()
                    ))
                })?;
                builder = builder.tls_certs_only(certs);
            }
            Ok(builder)
        };
        let build_error = |e: reqwest::Error| CliError::Usage(format!("http client: {e}"));
        Ok(Self {
            http: builder()?
                .timeout(REQUEST_TIMEOUT)
                .build()
                .map_err(build_error)?,
            live: builder()?
                .read_timeout(LIVE_READ_TIMEOUT)
                .build()
                .map_err(build_error)?,
            retry_for: options.retry_for,
        })
    }

    pub fn request(&self, method: Method, url: Url) -> RequestBuilder {
        self.http.request(method, url)
    }

    /// A request without a whole-request timeout, for live reads.
    pub fn live_request(&self, url: Url) -> RequestBuilder {
        self.live.get(url)
    }

    /// Sends what `build` makes, again and again while the failure is transient, until
    /// `--retry-for` has passed. Returns the first response that is not retryable; `on_retry`
    /// hears about each failed attempt (for a progress line or a warning).
    pub async fn send(
        &self,
        what: &str,
        build: impl Fn() -> RequestBuilder,
        mut on_retry: impl FnMut(&str),
    ) -> Result<Attempted, CliError> {
        let deadline = Instant::now() + self.retry_for;
        let mut backoff = Backoff::default();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let failure = match build().send().await {
                Ok(response) if is_transient(response.status()) => {
                    format!("{what}: {}", describe_status(response).await)
                }
                Ok(response) => return Ok(Attempted { response, attempts }),
                Err(error) => format!("{what}: {}", describe_error(&error)),
            };
            let pause = backoff.next_delay();
            if Instant::now() + pause > deadline {
                return Err(CliError::Unavailable(format!(
                    "{failure} (gave up after {attempts} attempts in {})",
                    humantime::format_duration(Duration::from_secs(self.retry_for.as_secs()))
                )));
            }
            on_retry(&failure);
            tokio::time::sleep(pause).await;
        }
    }
}

/// A response and how many attempts it took (more than one: an earlier attempt may have been
/// applied although its answer was lost).
pub struct Attempted {
    pub response: Response,
    pub attempts: u32,
}

/// Exponential backoff with full jitter in its upper half, so clients that lost the same server
/// do not come back in step.
#[derive(Default)]
pub struct Backoff {
    current: Option<Duration>,
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let next = match self.current {
            None => BACKOFF_FIRST,
            Some(d) => (d * 2).min(BACKOFF_CAP),
        };
        self.current = Some(next);
        next.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    pub fn reset(&mut self) {
        self.current = None;
    }
}

/// Worth another attempt: the server (or the proxy in front of it) could not answer now.
fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || (status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED)
}

/// A transport error without reqwest's nesting of causes spelled as "error sending request".
pub fn describe_error(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `409 Conflict: <the start of the body>`.
pub async fn describe_status(response: Response) -> String {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let body: String = body.trim().chars().take(ERROR_BODY_CHARS).collect();
    if body.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {body}")
    }
}

/// The error for a response that is not a success, by status class.
pub async fn status_error(what: &str, response: Response) -> CliError {
    let status = response.status();
    let fenced = response
        .headers()
        .contains_key(ds_protocol::headers::PRODUCER_EPOCH);
    let message = format!("{what}: {}", describe_status(response).await);
    match status {
        StatusCode::NOT_FOUND | StatusCode::GONE => CliError::NotFound(message),
        StatusCode::CONFLICT => CliError::Conflict(message),
        StatusCode::FORBIDDEN if fenced => CliError::Conflict(message),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => CliError::Auth(message),
        s if s.is_client_error() => CliError::Refused(message),
        s if s.is_server_error() => CliError::Unavailable(message),
        _ => CliError::Protocol(message),
    }
}

/// A response header as text, if present and ASCII.
pub fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_stays_jittered_below_it() {
        let mut backoff = Backoff::default();
        let first = backoff.next_delay();
        assert!(first <= BACKOFF_FIRST && first >= BACKOFF_FIRST / 2);
        for _ in 0..20 {
            let pause = backoff.next_delay();
            assert!(pause <= BACKOFF_CAP);
        }
        assert!(backoff.next_delay() >= BACKOFF_CAP / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= BACKOFF_FIRST);
    }

    #[test]
    fn transient_statuses() {
        for s in [429, 500, 502, 503, 504] {
            assert!(
                is_transient(StatusCode::from_u16(s).unwrap_or_default()),
                "{s}"
            );
        }
        for s in [200, 204, 400, 401, 404, 409, 413, 501] {
            assert!(
                !is_transient(StatusCode::from_u16(s).unwrap_or_default()),
                "{s}"
            );
        }
    }
}

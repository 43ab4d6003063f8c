//! Configuration: one typed struct built by figment from defaults, an optional TOML file and
//! `DS_SYNC__*` environment variables (nested with `__`), plus `DATABASE_URL`.
//!
//! This module owns every config key, its default and its validation; nothing else reads the
//! environment. Unknown keys are an error, so a misspelt variable is caught at startup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Figment(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything the worker can be told. Field docs double as the README's config table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Base URL of the Durable Streams server, e.g. `http://127.0.0.1:4437`.
    pub server_url: String,
    /// Stream paths to mirror, comma-separated in the environment. A trailing `*` is a prefix
    /// pattern: every stream whose path starts with the rest, found through the registry.
    #[serde(deserialize_with = "comma_separated")]
    pub streams: Vec<String>,
    /// Extra request headers sent with every request, e.g. `DS_SYNC__HEADERS__AUTHORIZATION`.
    pub headers: BTreeMap<String, String>,
    /// Shorthand for `Authorization: Bearer <token>` (for going through Envoy).
    pub bearer_token: Option<String>,
    /// File holding the bearer token, re-read when it changes and after every 401 (instead of
    /// `bearer_token`, for tokens that expire and are replaced on disk).
    pub token_file: Option<PathBuf>,
    /// Path of the server's registry stream of create/delete events, used to discover streams.
    pub registry_path: String,
    /// Subscription (at the server's root `/`) through which the worker acks what Postgres
    /// committed and holds the lease that decides which of several workers mirrors; empty: none.
    pub subscription: String,
    /// The subscription's lease: a standby worker takes over within this after the worker
    /// holding it dies (1 s to 10 min; part of the subscription's configuration).
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// A batch commits once it holds this many rows...
    pub batch_rows: usize,
    /// ...or this many bytes of payload...
    pub batch_bytes: usize,
    /// ...or when its first read has waited this long.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Most live HTTP reads (SSE sessions or long-polls) open at once; streams beyond this take
    /// turns. `concurrency` is accepted as another name.
    #[serde(alias = "concurrency")]
    pub max_connections: usize,
    /// A session that is up to date gives its connection to a waiting stream after this long.
    #[serde(with = "humantime_serde")]
    pub yield_after: Duration,
    /// The worker reconnects an SSE session after this long even if the server has not closed it.
    #[serde(with = "humantime_serde")]
    pub session_max: Duration,
    /// Reads queued between the followers and the Postgres writer; bounds memory with
    /// `max_event_bytes`.
    pub queue_reads: usize,
    /// Payload bytes read but not yet committed, across all streams; followers wait beyond it.
    pub max_inflight_bytes: usize,
    /// Largest SSE event or long-poll body accepted; a larger one is an error, not an allocation.
    pub max_event_bytes: usize,
    /// First retry delay after an error; doubles per failure, with jitter.
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Where `/healthz`, `/readyz` and `/status` listen; empty disables them.
    pub health_addr: String,
    /// Where Prometheus metrics are served (`GET /metrics`); empty (the default) disables them.
    /// `DS_METRICS__ADDR` sets it too (ds-server's variable), `DS_SYNC__METRICS_ADDR` first.
    pub metrics_addr: String,
    /// How often throughput and lag are logged.
    #[serde(with = "humantime_serde")]
    pub stats_interval: Duration,
    /// Postgres URL; `DATABASE_URL` sets it too. When unset, `pg` is used.
    pub database_url: Option<String>,
    /// Postgres connection parts, used when no URL is given.
    pub pg: PgConfig,
    /// Logging; `DS_LOG__FORMAT` sets `log.format` (the same variable as ds-server's).
    pub log: LogConfig,
}

/// How log lines are written to stdout.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// `text` for people, `json` (one object per line) for log pipelines.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Postgres connection parts (`DS_SYNC__PG__HOST` and friends).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PgConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    /// Connections in the writer's pool.
    pub pool_size: usize,
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            password: None,
            dbname: "postgres".into(),
            pool_size: 4,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_url: "http://127.0.0.1:4437".into(),
            streams: Vec::new(),
            headers: BTreeMap::new(),
            bearer_token: None,
            token_file: None,
            registry_path: "/_ds/registry".into(),
            subscription: "ds-sync".into(),
            lease_ttl: Duration::from_secs(30),
            batch_rows: 5_000,
            batch_bytes: 8 << 20,
            linger: Duration::from_millis(20),
            max_connections: 256,
            yield_after: Duration::from_millis(250),
            session_max: Duration::from_secs(60),
            queue_reads: 1_024,
            max_event_bytes: 16 << 20,
            max_inflight_bytes: 64 << 20,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            health_addr: "127.0.0.1:8437".into(),
            metrics_addr: String::new(),
            stats_interval: Duration::from_secs(10),
            database_url: None,
            pg: PgConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Config {
    /// Layers defaults, the optional TOML file, `DS_SYNC__*` and `DATABASE_URL`, then validates.
    pub fn load(toml_path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = toml_path {
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::from_figment(
            figment
                .merge(
                    Env::raw()
                        .only(&["DS_METRICS__ADDR"])
                        .map(|_| "metrics_addr".into()),
                )
                .merge(Env::prefixed("DS_SYNC__").split("__"))
                .merge(Env::raw().only(&["DATABASE_URL"]))
                .merge(
                    Env::raw()
                        .only(&["DS_LOG__FORMAT"])
                        .map(|_| "log.format".into()),
                ),
        )
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        match reqwest::Url::parse(&self.server_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {}
            _ => {
                return invalid(format!(
                    "server_url {:?} is not an http(s) URL",
                    self.server_url
                ));
            }
        }
        for stream in &self.streams {
            if !stream.starts_with('/') {
                return invalid(format!(
                    "stream {stream:?} must be a path starting with '/'"
                ));
            }
            if stream.trim_end_matches('*').contains('*') {
                return invalid(format!(
                    "stream {stream:?}: '*' is allowed only at the end (prefix pattern)"
                ));
            }
        }
        for (name, value) in self.request_headers() {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return invalid(format!(
                    "header name {name:?} is not a valid HTTP header name"
                ));
            }
            if reqwest::header::HeaderValue::from_str(&value).is_err() {
                return invalid(format!(
                    "value of header {name:?} is not a valid header value"
                ));
            }
        }
        let authorization_header = self
            .headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case("authorization"));
        if self.token_file.is_some() && (self.bearer_token.is_some() || authorization_header) {
            return invalid(
                "token_file cannot be combined with bearer_token or headers.authorization: \
                 choose one source of credentials"
                    .to_owned(),
            );
        }
        for (key, value) in [
            ("batch_rows", self.batch_rows),
            ("batch_bytes", self.batch_bytes),
            ("max_connections", self.max_connections),
            ("queue_reads", self.queue_reads),
            ("max_event_bytes", self.max_event_bytes),
            ("max_inflight_bytes", self.max_inflight_bytes),
            ("pg.pool_size", self.pg.pool_size),
        ] {
            if value == 0 {
                return invalid(format!("{key} must be at least 1"));
            }
        }
        if u32::try_from(self.max_inflight_bytes).is_err() {
            return invalid(format!(
                "max_inflight_bytes ({}) must be below 4 GiB",
                self.max_inflight_bytes
            ));
        }
        if !self.metrics_addr.is_empty()
            && self.metrics_addr.parse::<std::net::SocketAddr>().is_err()
        {
            return invalid(format!(
                "metrics_addr {:?} must be an address and port such as 127.0.0.1:9465",
                self.metrics_addr
            ));
        }
        if !self.subscription.is_empty()
            && (self.subscription.len() > 128
                || !self
                    .subscription
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                || self.subscription.starts_with('.'))
        {
            return invalid(format!(
                "subscription {:?} must be 1 to 128 of A-Z a-z 0-9 - _ . (not starting with '.'), or empty for none",
                self.subscription
            ));
        }
        if self.lease_ttl < Duration::from_secs(1) || self.lease_ttl > Duration::from_secs(600) {
            return invalid(format!(
                "lease_ttl ({:?}) must be from 1s to 10min",
                self.lease_ttl
            ));
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return invalid(format!(
                "backoff_min ({:?}) must be non-zero and at most backoff_max ({:?})",
                self.backoff_min, self.backoff_max
            ));
        }
        Ok(())
    }

    /// The headers sent with every request: `headers` plus the bearer token, if any.
    pub fn request_headers(&self) -> Vec<(String, String)> {
        let mut headers: Vec<(String, String)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(token) = &self.bearer_token {
            headers.push(("authorization".into(), format!("Bearer {token}")));
        }
        headers
    }

    /// The Postgres connection settings for the write path.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        match &self.database_url {
            Some(url) => url
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("database_url is not a valid URL: {e}"))),
            None => {
                let mut pg = tokio_postgres::Config::new();
                pg.host(&self.pg.host)
                    .port(self.pg.port)
                    .user(&self.pg.user)
                    .dbname(&self.pg.dbname)
                    .application_name("ds-sync");
                if let Some(password) = &self.pg.password {
                    pg.password(password);
                }
                Ok(pg)
            }
        }
    }

    /// The same settings for sqlx, which runs the migrations.
    pub fn sqlx_options(&self) -> Result<sqlx::postgres::PgConnectOptions, ConfigError> {
        use sqlx::postgres::PgConnectOptions;
        match &self.database_url {
            Some(url) => url
                .parse::<PgConnectOptions>()
                .map_err(|e| ConfigError::Invalid(format!("database_url is not a valid URL: {e}"))),
            None => {
                let mut options = PgConnectOptions::new()
                    .host(&self.pg.host)
                    .port(self.pg.port)
                    .username(&self.pg.user)
                    .database(&self.pg.dbname)
                    .application_name("ds-sync");
                if let Some(password) = &self.pg.password {
                    options = options.password(password);
                }
                Ok(options)
            }
        }
    }
}

/// Accepts `"a,b"` (from the environment) or `["a", "b"]` (from TOML); blanks are dropped.
fn comma_separated<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(s) => s.split(',').map(str::to_owned).collect(),
        OneOrMany::Many(v) => v,
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect())
}

#[cfg(test)]
// figment's `Jail` closures must return `figment::Error`, which is large; tests only.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in_jail() -> Result<Config, figment::Error> {
        Config::load(None).map_err(|e| figment::Error::from(e.to_string()))
    }

    #[test]
    fn env_vars_override_defaults_and_split_streams() {
        Jail::expect_with(|jail| {
            jail.set_env("DS_SYNC__SERVER_URL", "http://127.0.0.1:9999");
            jail.set_env("DS_SYNC__STREAMS", "/v1/stream/a, /v1/stream/orders/*");
            jail.set_env("DS_SYNC__HEADERS__AUTHORIZATION", "Bearer abc");
            jail.set_env("DS_SYNC__LINGER", "5ms");
            jail.set_env("DS_SYNC__PG__PORT", "6543");
            jail.set_env("DATABASE_URL", "postgres://u@h:1/d");
            let c = load_in_jail()?;
            assert_eq!(c.server_url, "http://127.0.0.1:9999");
            assert_eq!(c.streams, vec!["/v1/stream/a", "/v1/stream/orders/*"]);
            assert_eq!(
                c.request_headers(),
                vec![("authorization".to_owned(), "Bearer abc".to_owned())]
            );
            assert_eq!(c.linger, Duration::from_millis(5));
            assert_eq!(c.pg.port, 6543);
            assert_eq!(c.database_url.as_deref(), Some("postgres://u@h:1/d"));
            Ok(())
        });
    }

    #[test]
    fn log_format_and_token_file() {
        Jail::expect_with(|jail| {
            jail.set_env("DS_LOG__FORMAT", "json");
            jail.set_env("DS_SYNC__TOKEN_FILE", "/run/secrets/token");
            let c = load_in_jail()?;
            assert_eq!(c.log.format, LogFormat::Json);
            assert_eq!(c.token_file, Some(PathBuf::from("/run/secrets/token")));
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("DS_LOG__FORMAT", "xml");
            assert!(load_in_jail().is_err(), "an unknown format is refused");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("DS_SYNC__TOKEN_FILE", "/run/secrets/token");
            jail.set_env("DS_SYNC__BEARER_TOKEN", "abc");
            let err = load_in_jail()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("choose one source"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn metrics_address_from_either_variable_ds_sync_first() {
        Jail::expect_with(|jail| {
            assert_eq!(load_in_jail()?.metrics_addr, "");
            jail.set_env("DS_METRICS__ADDR", "127.0.0.1:9464");
            assert_eq!(load_in_jail()?.metrics_addr, "127.0.0.1:9464");
            jail.set_env("DS_SYNC__METRICS_ADDR", "127.0.0.1:9465");
            assert_eq!(load_in_jail()?.metrics_addr, "127.0.0.1:9465");
            jail.set_env("DS_SYNC__METRICS_ADDR", "nowhere");
            let err = load_in_jail()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("metrics_addr"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn toml_file_is_layered_under_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "sync.toml",
                "streams = [\"/a\", \"/b/*\"]\nbatch_rows = 7\nmax_connections = 3\n",
            )?;
            jail.set_env("DS_SYNC__BATCH_ROWS", "9");
            let c = Config::load(Some(Path::new("sync.toml")))
                .map_err(|e| figment::Error::from(e.to_string()))?;
            assert_eq!(c.streams, vec!["/a", "/b/*"]);
            assert_eq!(c.batch_rows, 9);
            assert_eq!(c.max_connections, 3);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        Jail::expect_with(|jail| {
            jail.set_env("DS_SYNC__BATCH_ROWZ", "9");
            assert!(load_in_jail().is_err(), "a misspelt key must be refused");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("DS_SYNC__STREAMS", "/a/*/b");
            let err = load_in_jail()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("only at the end"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("DS_SYNC__STREAMS", "relative");
            assert!(load_in_jail().is_err());
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("DS_SYNC__SUBSCRIPTION", "a/b");
            assert!(
                load_in_jail().is_err(),
                "a subscription id is one path segment"
            );
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("DS_SYNC__LEASE_TTL", "500ms");
            let err = load_in_jail()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("lease_ttl"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("DS_SYNC__SUBSCRIPTION", "");
            let c = load_in_jail()?;
            assert_eq!(c.subscription, "", "empty turns the subscription off");
            Ok(())
        });
    }
}

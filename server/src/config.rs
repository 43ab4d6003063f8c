//! Configuration: defaults, then an optional TOML file (`--config`), then `DS_*` environment
//! variables nested with `__` (`DS_SERVER__PORT=4437`). Unknown keys and bad values stop start-up
//! with a message naming the key.
//!
//! [`KEYS`] is the one list of settings: `--help`, the README table and the tests all come
//! from it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole server configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub http: HttpConfig,
    pub limits: LimitsConfig,
    pub storage: StorageConfig,
    pub tls: TlsConfig,
    pub log: LogConfig,
    pub subscriptions: SubscriptionsConfig,
    pub retention: RetentionConfig,
    pub metrics: MetricsConfig,
}

/// Prometheus metrics (README *Metrics*).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` of the metrics listener; empty: no listener.
    pub addr: String,
}

/// Retention: when a stream's acknowledged prefix is released (README *Retention*).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    pub mode: RetentionMode,
    /// How long data stays after every subscription linked to its stream acked it.
    #[serde(with = "humantime_serde")]
    pub min_age: Duration,
}

/// `keep`: nothing is released (streams hold everything until deleted). `acked`: a stream's
/// prefix is released once every subscription linked to it acked past it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetentionMode {
    #[default]
    Keep,
    Acked,
}

/// Subscriptions (protocol sections 6 and 7; `server/SUBSCRIPTIONS.md`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionsConfig {
    pub enabled: bool,
    /// Origin of `callback_url` and `jwks_url`; empty takes it from the request.
    pub public_url: String,
    pub allow_local_webhooks: bool,
    /// Where the webhook signing key is kept in the durable modes; unset: in the data dir.
    pub signing_key_path: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    pub max_subscriptions: u64,
    pub max_links: u64,
}

impl Default for SubscriptionsConfig {
    fn default() -> Self {
        SubscriptionsConfig {
            enabled: true,
            public_url: String::new(),
            allow_local_webhooks: false,
            signing_key_path: None,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            webhook_timeout: Duration::from_secs(10),
            max_subscriptions: 10_000,
            max_links: 100_000,
        }
    }
}

/// How log lines are written to stdout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// `text` for people, `json` (one object per line) for log pipelines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Direct TLS: both paths or neither.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert_path: Option<PathBuf>,
    pub key_path: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub host: IpAddr,
    pub port: u16,
    #[serde(with = "humantime_serde")]
    pub long_poll_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub sse_reconnect_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub sse_keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub expiry_sweep_interval: Duration,
    /// JSON stream announcing creates and deletes; empty disables it.
    pub registry_stream: String,
    /// From a request head's first byte to its end.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in progress, waiting for one.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Longest wait for the next bytes of a request body.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Open connections at most; 0 sizes it from the open-file limit.
    pub max_connections: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `*`, or a comma-separated list of allowed origins.
    pub cors_origins: String,
    /// `Cache-Control` of catch-up reads that return data.
    pub cache_control: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_memory_bytes: u64,
    pub max_stream_bytes: u64,
    pub max_request_bytes: u64,
    pub max_read_bytes: u64,
    pub max_streams: u64,
    pub max_producers: u64,
    #[serde(with = "humantime_serde")]
    pub producer_idle_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub mode: StorageMode,
    pub data_dir: PathBuf,
    pub segment_bytes: u64,
    pub max_open_files: usize,
    pub map_reads: bool,
    #[serde(with = "humantime_serde")]
    pub fast_sync_interval: Duration,
    pub acid_shard_count: u32,
    pub acid_commit_log: bool,
}

/// Where streams live and what "acknowledged" promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StorageMode {
    Memory,
    FileFast,
    FileDurable,
    Acid,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 4437,
            long_poll_timeout: Duration::from_secs(30),
            sse_reconnect_interval: Duration::from_secs(60),
            sse_keepalive_interval: Duration::from_secs(15),
            shutdown_timeout: Duration::from_secs(10),
            expiry_sweep_interval: Duration::from_secs(30),
            registry_stream: "/_ds/registry".into(),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 0,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            cors_origins: "*".into(),
            cache_control: "public, max-age=60, stale-while-revalidate=300".into(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_memory_bytes: 100_000_000,
            max_stream_bytes: 10_000_000,
            max_request_bytes: 16 * 1024 * 1024,
            max_read_bytes: 4 * 1024 * 1024,
            max_streams: 1_000_000,
            max_producers: 1_000_000,
            producer_idle_timeout: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            mode: StorageMode::Memory,
            data_dir: PathBuf::from("./data"),
            segment_bytes: 64 * 1024 * 1024,
            max_open_files: 256,
            map_reads: true,
            fast_sync_interval: Duration::from_secs(1),
            acid_shard_count: 16,
            acid_commit_log: true,
        }
    }
}

/// One documented setting.
pub struct KeyDoc {
    pub env: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
}

/// The largest `DS_LIMITS__MAX_REQUEST_BYTES`: every storage format records a record's length,
/// and a log record's or frame's length with its headers, in 32 bits.
const MAX_REQUEST_BYTES: u64 = 1 << 30;

/// Every setting, with its default as it would be written in the environment.
pub const KEYS: &[KeyDoc] = &[
    KeyDoc {
        env: "DS_SERVER__HOST",
        default: "127.0.0.1",
        doc: "Address to listen on (`0.0.0.0` for all interfaces).",
    },
    KeyDoc {
        env: "DS_SERVER__PORT",
        default: "4437",
        doc: "TCP port (`0` picks a free one).",
    },
    KeyDoc {
        env: "DS_SERVER__LONG_POLL_TIMEOUT",
        default: "30s",
        doc: "How long a long-poll waits for data before answering 204.",
    },
    KeyDoc {
        env: "DS_SERVER__SSE_RECONNECT_INTERVAL",
        default: "1m",
        doc: "SSE connections are closed after about this long (±10% jitter) so CDNs can collapse readers; clients resume.",
    },
    KeyDoc {
        env: "DS_SERVER__SSE_KEEPALIVE_INTERVAL",
        default: "15s",
        doc: "Idle SSE connections get a `: keep-alive` comment: none stays silent for more than twice this long.",
    },
    KeyDoc {
        env: "DS_SERVER__SHUTDOWN_TIMEOUT",
        default: "10s",
        doc: "On SIGTERM or ctrl-c, how long in-flight requests get to finish.",
    },
    KeyDoc {
        env: "DS_SERVER__EXPIRY_SWEEP_INTERVAL",
        default: "30s",
        doc: "How often expired streams nobody touches are removed (access also expires them).",
    },
    KeyDoc {
        env: "DS_SERVER__REGISTRY_STREAM",
        default: "/_ds/registry",
        doc: "Read-only JSON stream announcing every stream created and deleted (`{\"event\":\"created\",\"path\":...,\"id\":...,\"contentType\":...}`, `{\"event\":\"deleted\",\"path\":...,\"id\":...}`; `id` is the instance's `Stream-Id`), for discovery by followers such as ds-sync. Every event is recorded before its create or delete is answered; one that cannot be recorded fails the operation (503). It is outside the memory budget; with `DS_RETENTION__MODE=acked` it is held to `DS_LIMITS__MAX_STREAM_BYTES` and released as the subscriptions linking it ack (ds-sync links and acks it). Must start with `/_ds/`; empty disables it.",
    },
    KeyDoc {
        env: "DS_SERVER__HEADER_READ_TIMEOUT",
        default: "30s",
        doc: "A request head (request line and headers) must arrive within this long of its first byte; else 408 and the connection closes. Also bounds a TLS handshake.",
    },
    KeyDoc {
        env: "DS_SERVER__IDLE_TIMEOUT",
        default: "1m",
        doc: "A connection with no request in progress (a new one, or keep-alive between requests) is closed after this long without a byte from the client; on HTTP/2 and TLS, without a byte either way. Never applied while a response (SSE, long-poll) is in progress, except that on plaintext HTTP/1.1 a client that takes none of a response for this long (it stopped reading) is disconnected.",
    },
    KeyDoc {
        env: "DS_SERVER__BODY_READ_TIMEOUT",
        default: "30s",
        doc: "While a request body arrives, the longest wait for its next bytes; past it 408 and the connection closes.",
    },
    KeyDoc {
        env: "DS_SERVER__MAX_CONNECTIONS",
        default: "0",
        doc: "Open client connections at most; past it new connections are closed at once (and counted in a log line) while open ones carry on. `0`: the open-file limit (`RLIMIT_NOFILE`, read from `/proc/self/limits`) less `DS_STORAGE__MAX_OPEN_FILES` and 64 for everything else.",
    },
    KeyDoc {
        env: "DS_HTTP__CORS_ORIGINS",
        default: "*",
        doc: "`*`, or a comma-separated list of origins allowed by CORS.",
    },
    KeyDoc {
        env: "DS_HTTP__CACHE_CONTROL",
        default: "public, max-age=60, stale-while-revalidate=300",
        doc: "`Cache-Control` of catch-up reads that return data (use `private, ...` for per-user data).",
    },
    KeyDoc {
        env: "DS_LIMITS__MAX_MEMORY_BYTES",
        default: "100000000",
        doc: "`memory`: bytes all streams together may hold, counting retained data only (neither released data nor the registry stream count). An append past it gets 413 with `DS_RETENTION__MODE=keep`, and 503 with `Retry-After` with `acked` (backpressure until subscribers ack; see *Retention*). Durable modes: RAM for the cache of newest records that live readers are served from (each record counts its bytes plus 64 for its entry).",
    },
    KeyDoc {
        env: "DS_LIMITS__MAX_STREAM_BYTES",
        default: "10000000",
        doc: "Bytes one stream may hold (its own data, not inherited fork data); an append past it gets 413.",
    },
    KeyDoc {
        env: "DS_LIMITS__MAX_REQUEST_BYTES",
        default: "16777216",
        doc: "Largest request body; a larger one gets 413. At most 1073741824 (1 GiB): the storage formats record lengths in 32 bits, headers included.",
    },
    KeyDoc {
        env: "DS_LIMITS__MAX_READ_BYTES",
        default: "4194304",
        doc: "Largest read response; longer reads are paged (a single larger message is sent whole).",
    },
    KeyDoc {
        env: "DS_LIMITS__MAX_STREAMS",
        default: "1000000",
        doc: "Streams clients may have (soft-deleted ones kept for their forks included); a PUT past it gets 413. An empty stream holds about 500 B of RAM in memory mode, 600 B in the file modes and 840 B in acid (redb's page cache, at most 256 MiB in all, included; see *Limits*), outside the memory budget.",
    },
    KeyDoc {
        env: "DS_LIMITS__MAX_PRODUCERS",
        default: "1000000",
        doc: "Idempotent-producer states all streams together may hold (one per stream and `Producer-Id`); an append that would start one more gets 413. Each holds RAM in every mode (see *Limits*).",
    },
    KeyDoc {
        env: "DS_LIMITS__PRODUCER_IDLE_TIMEOUT",
        default: "7d",
        doc: "A producer with no accepted append on a stream for this long is forgotten there and then treated as new (spec 5.2.1, *Producer State Cleanup*), also across restarts; `0s` never forgets.",
    },
    KeyDoc {
        env: "DS_STORAGE__MODE",
        default: "memory",
        doc: "`memory` (lost on restart), `file-fast` (survives a process crash), `file-durable` (fdatasync'd: survives power loss) or `acid` (redb transactions). See *Storage modes*.",
    },
    KeyDoc {
        env: "DS_STORAGE__DATA_DIR",
        default: "./data",
        doc: "Directory of the durable storage modes (one server per directory).",
    },
    KeyDoc {
        env: "DS_STORAGE__SEGMENT_BYTES",
        default: "67108864",
        doc: "File modes: size at which the write-ahead log starts a new segment file (the active file is extended 4 MiB at a time ahead of its data, so syncs overwrite instead of growing the file). `acid`: size at which the commit log starts a new segment and checkpoints every shard (segments holding records of 4 KiB or more that rows still reference are kept until those are released, removed or compacted).",
    },
    KeyDoc {
        env: "DS_STORAGE__MAX_OPEN_FILES",
        default: "256",
        doc: "File modes and `acid`: log segment files kept open for reads (`acid`: commit log segments holding records of 4 KiB or more).",
    },
    KeyDoc {
        env: "DS_STORAGE__MAP_READS",
        default: "true",
        doc: "File modes, and `acid`'s records of 4 KiB or more (kept in its commit log): reads from disk map the log's segment files (`mmap`) and send their bytes from the page cache instead of copying them into a buffer first (a third less server CPU per byte of catch-up). The cost: an I/O error under a mapped read ends the process (`SIGBUS`; a restart recovers as after a crash) where a copied read answers 500, and pages a read touched count in the process's RSS while mapped (they are the page cache, not the server's allocations). `false`: every read copies.",
    },
    KeyDoc {
        env: "DS_STORAGE__FAST_SYNC_INTERVAL",
        default: "1s",
        doc: "`file-fast`: how often the log is synced in the background. A power loss can take the appends of about the last interval; the server then restarts without them (see *Storage modes*).",
    },
    KeyDoc {
        env: "DS_STORAGE__ACID_SHARD_COUNT",
        default: "16",
        doc: "`acid`: number of redb shards (power of two, 1 to 256); fixed when the directory is created.",
    },
    KeyDoc {
        env: "DS_STORAGE__ACID_COMMIT_LOG",
        default: "true",
        doc: "`acid`: acknowledge once the operation is synced in the commit log shared by all shards (one sync for all of them; redb is updated within ~100 ms, each stream's records of a flush in one row, and checkpointed when a segment fills); `false` syncs each shard's own redb commit instead. Both survive a power loss (see *Storage modes*).",
    },
    KeyDoc {
        env: "DS_TLS__CERT_PATH",
        default: "",
        doc: "PEM certificate chain; with `DS_TLS__KEY_PATH`, the server speaks HTTPS (HTTP/2 and HTTP/1.1) itself.",
    },
    KeyDoc {
        env: "DS_TLS__KEY_PATH",
        default: "",
        doc: "PEM private key for `DS_TLS__CERT_PATH` (set both or neither).",
    },
    KeyDoc {
        env: "DS_LOG__FORMAT",
        default: "text",
        doc: "`text` (lines for people; colours only when stdout is a terminal) or `json` (one JSON object per line, for log pipelines). Lines about a request carry its `request_id` (the request's `x-request-id`, which Envoy sets, or one made here; echoed in the response's `x-request-id`). One line per stream request at `RUST_LOG=info,ds_server::access=debug`; `RUST_LOG` filters (default `info`).",
    },
    KeyDoc {
        env: "DS_SUBSCRIPTIONS__ENABLED",
        default: "true",
        doc: "Serve subscriptions (`{root}__ds/subscriptions/...`, see *Subscriptions*); `false` answers their routes 404.",
    },
    KeyDoc {
        env: "DS_SUBSCRIPTIONS__PUBLIC_URL",
        default: "",
        doc: "Origin (`https://streams.example.com`) of the `callback_url` and `jwks_url` the server hands out; unset: from the request that created the subscription (`X-Forwarded-Proto`/`X-Forwarded-Host`, else `Host`).",
    },
    KeyDoc {
        env: "DS_SUBSCRIPTIONS__ALLOW_LOCAL_WEBHOOKS",
        default: "false",
        doc: "Development only: also allow webhook URLs `http://localhost` and `http://127.0.0.x` (otherwise https to public addresses only).",
    },
    KeyDoc {
        env: "DS_SUBSCRIPTIONS__SIGNING_KEY_PATH",
        default: "",
        doc: "Durable modes: file holding the Ed25519 webhook signing key (created on first start); unset: `webhook-signing.key` in the data directory. Memory mode makes a new key at each start.",
    },
    KeyDoc {
        env: "DS_SUBSCRIPTIONS__RETRY_MIN",
        default: "1s",
        doc: "First delay before a failed webhook delivery is retried; doubles per attempt (20% jitter).",
    },
    KeyDoc {
        env: "DS_SUBSCRIPTIONS__RETRY_MAX",
        default: "1m",
        doc: "Longest delay between webhook delivery attempts.",
    },
    KeyDoc {
        env: "DS_SUBSCRIPTIONS__WEBHOOK_TIMEOUT",
        default: "10s",
        doc: "How long one webhook delivery may take before it counts as failed.",
    },
    KeyDoc {
        env: "DS_SUBSCRIPTIONS__MAX_SUBSCRIPTIONS",
        default: "10000",
        doc: "Most subscriptions the server holds; creating one more gets 507.",
    },
    KeyDoc {
        env: "DS_SUBSCRIPTIONS__MAX_LINKS",
        default: "100000",
        doc: "Most streams one subscription links; a pattern or list that would link more gets 507 (a stream created later that would pass it is not linked, with an error log line).",
    },
    KeyDoc {
        env: "DS_RETENTION__MODE",
        default: "keep",
        doc: "`keep`: streams keep all their data until deleted. `acked`: a stream's prefix is released once every subscription linked to it acked past it (streams no subscription links keep everything; forks pin their source's data before their anchor); reads below the retained start get 410 with `Stream-Earliest-Offset`. See *Retention*.",
    },
    KeyDoc {
        env: "DS_RETENTION__MIN_AGE",
        default: "0s",
        doc: "`acked`: data is released only this long after every subscription acked it (a hold for late readers).",
    },
    KeyDoc {
        env: "DS_METRICS__ADDR",
        default: "",
        doc: "`host:port` of a listener of its own serving Prometheus metrics at `GET /metrics` (see *Metrics*), e.g. `127.0.0.1:9464`; port `0` picks a free one. Unset: no listener. Keep it off the public network: Envoy routes only to `DS_SERVER__PORT`.",
    },
];

/// A configuration problem, worded for the operator.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Builds the configuration from defaults, an optional TOML file and `DS_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        // `DS_SYNC__*` belongs to ds-sync, which may share the environment.
        figment = figment.merge(
            Env::prefixed("DS_")
                .split("__")
                .filter(|k| !k.as_str().to_ascii_lowercase().starts_with("sync")),
        );
        let config: Config = figment.extract().map_err(|e| {
            ConfigError(
                e.into_iter()
                    .map(|e| {
                        let source = e
                            .metadata
                            .as_ref()
                            .map(|m| format!(" (from {})", m.name))
                            .unwrap_or_default();
                        if e.path.is_empty() {
                            format!("{}{source}", e.kind)
                        } else {
                            let key = format!("DS_{}", e.path.join("__")).to_ascii_uppercase();
                            format!("{key}: {}{source}", e.kind)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        for (name, value) in [
            ("DS_LIMITS__MAX_MEMORY_BYTES", l.max_memory_bytes),
            ("DS_LIMITS__MAX_STREAM_BYTES", l.max_stream_bytes),
            ("DS_LIMITS__MAX_REQUEST_BYTES", l.max_request_bytes),
            ("DS_LIMITS__MAX_READ_BYTES", l.max_read_bytes),
            ("DS_LIMITS__MAX_STREAMS", l.max_streams),
            ("DS_LIMITS__MAX_PRODUCERS", l.max_producers),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("{name} must be greater than 0")));
            }
        }
        let s = &self.server;
        for (name, value) in [
            ("DS_SERVER__LONG_POLL_TIMEOUT", s.long_poll_timeout),
            (
                "DS_SERVER__SSE_RECONNECT_INTERVAL",
                s.sse_reconnect_interval,
            ),
            (
                "DS_SERVER__SSE_KEEPALIVE_INTERVAL",
                s.sse_keepalive_interval,
            ),
            ("DS_SERVER__EXPIRY_SWEEP_INTERVAL", s.expiry_sweep_interval),
            ("DS_SERVER__HEADER_READ_TIMEOUT", s.header_read_timeout),
            ("DS_SERVER__IDLE_TIMEOUT", s.idle_timeout),
            ("DS_SERVER__BODY_READ_TIMEOUT", s.body_read_timeout),
            (
                "DS_STORAGE__FAST_SYNC_INTERVAL",
                self.storage.fast_sync_interval,
            ),
        ] {
            if value.is_zero() {
                return Err(ConfigError(format!("{name} must be greater than 0")));
            }
        }
        let registry = &self.server.registry_stream;
        if !registry.is_empty() && !registry.starts_with(crate::stream::RESERVED_PREFIX) {
            return Err(ConfigError(format!(
                "DS_SERVER__REGISTRY_STREAM={registry:?} must start with {}",
                crate::stream::RESERVED_PREFIX
            )));
        }
        match (&self.tls.cert_path, &self.tls.key_path) {
            (Some(_), None) => {
                return Err(ConfigError(
                    "DS_TLS__CERT_PATH is set but DS_TLS__KEY_PATH is not; set both or neither"
                        .into(),
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError(
                    "DS_TLS__KEY_PATH is set but DS_TLS__CERT_PATH is not; set both or neither"
                        .into(),
                ));
            }
            _ => {}
        }
        let shards = self.storage.acid_shard_count;
        if !(1..=256).contains(&shards) || !shards.is_power_of_two() {
            return Err(ConfigError(format!(
                "DS_STORAGE__ACID_SHARD_COUNT={shards} must be a power of two from 1 to 256"
            )));
        }
        if l.max_request_bytes > MAX_REQUEST_BYTES {
            return Err(ConfigError(format!(
                "DS_LIMITS__MAX_REQUEST_BYTES={} is too large: at most {MAX_REQUEST_BYTES} (1 GiB; \
                 the storage formats record lengths in 32 bits, headers included)",
                l.max_request_bytes
            )));
        }
        if self.storage.max_open_files == 0 {
            return Err(ConfigError(
                "DS_STORAGE__MAX_OPEN_FILES must be greater than 0".into(),
            ));
        }
        let sub = &self.subscriptions;
        for (name, value) in [
            ("DS_SUBSCRIPTIONS__RETRY_MIN", sub.retry_min),
            ("DS_SUBSCRIPTIONS__RETRY_MAX", sub.retry_max),
            ("DS_SUBSCRIPTIONS__WEBHOOK_TIMEOUT", sub.webhook_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError(format!("{name} must be greater than 0")));
            }
        }
        if sub.retry_min > sub.retry_max {
            return Err(ConfigError(
                "DS_SUBSCRIPTIONS__RETRY_MIN must not be greater than DS_SUBSCRIPTIONS__RETRY_MAX"
                    .into(),
            ));
        }
        let url = sub.public_url.trim_end_matches('/');
        let origin_like =
            url.is_empty() || url.starts_with("https://") || url.starts_with("http://");
        if !origin_like || url.contains('?') || url.contains('#') {
            return Err(ConfigError(format!(
                "DS_SUBSCRIPTIONS__PUBLIC_URL={:?} must be an origin such as https://streams.example.com",
                sub.public_url
            )));
        }
        if !self.metrics.addr.is_empty()
            && self.metrics.addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ConfigError(format!(
                "DS_METRICS__ADDR={:?} must be an address and port such as 127.0.0.1:9464",
                self.metrics.addr
            )));
        }
        if self.storage.segment_bytes < 4096 {
            return Err(ConfigError(
                "DS_STORAGE__SEGMENT_BYTES must be at least 4096".into(),
            ));
        }
        Ok(())
    }

    /// `DS_SERVER__MAX_CONNECTIONS`, with `0` sized from the open-file limit: each connection
    /// is a file descriptor, and so is every log segment storage keeps open, so connections get
    /// what the limit leaves after those and a margin for everything else (listener, runtime,
    /// directory syncs). Without a readable limit (not Linux), 1024 less the same.
    pub fn max_connections(&self) -> usize {
        if self.server.max_connections > 0 {
            return self.server.max_connections;
        }
        let limit = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|text| open_file_limit(&text))
            .unwrap_or(1024);
        let reserved = u64::try_from(self.storage.max_open_files)
            .unwrap_or(u64::MAX)
            .saturating_add(64);
        // Never so small that the server cannot serve at all.
        usize::try_from(limit.saturating_sub(reserved).max(16)).unwrap_or(usize::MAX)
    }

    /// Origins allowed by CORS, `None` meaning any.
    pub fn cors_origins(&self) -> Option<Vec<String>> {
        let raw = self.http.cors_origins.trim();
        if raw == "*" {
            None
        } else {
            Some(
                raw.split(',')
                    .map(|o| o.trim().to_owned())
                    .filter(|o| !o.is_empty())
                    .collect(),
            )
        }
    }
}

/// The soft limit on open files from the text of `/proc/self/limits` (std has no `getrlimit`,
/// and the workspace forbids the `unsafe` a libc call needs); `unlimited` is `u64::MAX`.
fn open_file_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// The settings as a Markdown table (for the README and `--help`).
pub fn markdown_table() -> String {
    let mut out = String::from("| Variable | Default | Meaning |\n|---|---|---|\n");
    for k in KEYS {
        let default = if k.default.is_empty() {
            "(unset)".to_owned()
        } else {
            format!("`{}`", k.default)
        };
        out.push_str(&format!("| `{}` | {} | {} |\n", k.env, default, k.doc));
    }
    out
}

/// The settings as plain text (for `--help`).
pub fn help_text() -> String {
    let mut out = String::from(
        "Configuration (defaults < --config TOML file < environment; TOML keys are the\n\
         lowercase parts of each name, e.g. [server] port = 4437):\n\n",
    );
    for k in KEYS {
        out.push_str(&format!(
            "  {:<36} default: {}\n      {}\n",
            k.env, k.default, k.doc
        ));
    }
    out.push_str("\nLogging: RUST_LOG (e.g. RUST_LOG=info,ds_server=debug).\n");
    out
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_in_the_key_table_are_the_real_defaults() {
        Jail::expect_with(|jail| {
            for k in KEYS.iter().filter(|k| !k.default.is_empty()) {
                jail.set_env(k.env, k.default);
            }
            let loaded = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(loaded, Config::default());
            Ok(())
        });
    }

    #[test]
    fn every_field_has_a_documented_key() {
        let json = serde_json::to_value(Config::default()).unwrap_or_default();
        let mut fields = Vec::new();
        if let Some(sections) = json.as_object() {
            for (section, values) in sections {
                for key in values.as_object().into_iter().flat_map(|o| o.keys()) {
                    fields.push(format!("DS_{}__{}", section, key).to_uppercase());
                }
            }
        }
        let documented: Vec<String> = KEYS.iter().map(|k| k.env.to_owned()).collect();
        fields.sort();
        let mut sorted = documented.clone();
        sorted.sort();
        assert_eq!(fields, sorted);
    }

    #[test]
    fn environment_overrides_and_parses_durations() {
        Jail::expect_with(|jail| {
            jail.set_env("DS_SERVER__PORT", "0");
            jail.set_env("DS_SERVER__LONG_POLL_TIMEOUT", "500ms");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.server.port, 0);
            assert_eq!(c.server.long_poll_timeout, Duration::from_millis(500));
            Ok(())
        });
    }

    #[test]
    fn the_fast_sync_interval_parses_and_must_not_be_zero() {
        Jail::expect_with(|jail| {
            jail.set_env("DS_STORAGE__FAST_SYNC_INTERVAL", "250ms");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.storage.fast_sync_interval, Duration::from_millis(250));
            jail.set_env("DS_STORAGE__FAST_SYNC_INTERVAL", "0s");
            let err = Config::load(None).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains("DS_STORAGE__FAST_SYNC_INTERVAL"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_request_limit_past_1_gib_is_refused() {
        Jail::expect_with(|jail| {
            jail.set_env("DS_LIMITS__MAX_REQUEST_BYTES", "1073741824");
            assert!(Config::load(None).is_ok());
            jail.set_env("DS_LIMITS__MAX_REQUEST_BYTES", "4294967296");
            let err = Config::load(None).map(|_| ()).unwrap_err().to_string();
            assert!(
                err.contains("DS_LIMITS__MAX_REQUEST_BYTES=4294967296"),
                "{err}"
            );
            assert!(err.contains("at most 1073741824"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_open_file_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63704                63704                processes \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(open_file_limit(text), Some(1024));
        assert_eq!(
            open_file_limit(
                "Max open files            unlimited            unlimited            files\n"
            ),
            Some(u64::MAX)
        );
        assert_eq!(open_file_limit("nothing here"), None);
        let mut c = Config::default();
        c.server.max_connections = 7;
        assert_eq!(c.max_connections(), 7);
        c.server.max_connections = 0;
        assert!(c.max_connections() >= 16);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        Jail::expect_with(|jail| {
            jail.set_env("DS_SERVER__PROT", "1");
            let err = Config::load(None).map(|_| ()).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("prot"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_value_is_an_error_naming_key_and_value() {
        Jail::expect_with(|jail| {
            jail.set_env("DS_LIMITS__MAX_STREAM_BYTES", "lots");
            let err = Config::load(None).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains("DS_LIMITS__MAX_STREAM_BYTES"), "{err}");
            assert!(err.contains("lots"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn tls_needs_both_paths() {
        Jail::expect_with(|jail| {
            jail.set_env("DS_TLS__CERT_PATH", "/etc/cert.pem");
            let err = Config::load(None).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains("DS_TLS__KEY_PATH"), "{err}");
            jail.set_env("DS_TLS__KEY_PATH", "/etc/key.pem");
            assert!(Config::load(None).is_ok());
            Ok(())
        });
    }

    #[test]
    fn the_metrics_address_must_be_an_address_and_port() {
        Jail::expect_with(|jail| {
            assert_eq!(
                Config::load(None).map_err(|e| e.to_string())?.metrics.addr,
                ""
            );
            jail.set_env("DS_METRICS__ADDR", "127.0.0.1:9464");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.metrics.addr, "127.0.0.1:9464");
            jail.set_env("DS_METRICS__ADDR", "localhost");
            let err = Config::load(None).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains("DS_METRICS__ADDR=\"localhost\""), "{err}");
            Ok(())
        });
    }

    #[test]
    fn sync_variables_are_left_to_ds_sync() {
        Jail::expect_with(|jail| {
            jail.set_env("DS_SYNC__SERVER_URL", "http://x");
            assert!(Config::load(None).is_ok());
            Ok(())
        });
    }

    #[test]
    fn toml_file_sits_between_defaults_and_environment() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "ds.toml",
                "[server]\nport = 5000\nlong_poll_timeout = \"2s\"\n",
            )?;
            jail.set_env("DS_SERVER__PORT", "6000");
            let c = Config::load(Some(Path::new("ds.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.server.port, 6000);
            assert_eq!(c.server.long_poll_timeout, Duration::from_secs(2));
            Ok(())
        });
    }
}

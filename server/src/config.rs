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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub mode: StorageMode,
    pub data_dir: PathBuf,
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
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            mode: StorageMode::Memory,
            data_dir: PathBuf::from("./data"),
        }
    }
}

/// One documented setting.
pub struct KeyDoc {
    pub env: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
}

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
        doc: "SSE connections are closed after this long so CDNs can collapse readers; clients resume.",
    },
    KeyDoc {
        env: "DS_SERVER__SSE_KEEPALIVE_INTERVAL",
        default: "15s",
        doc: "Idle SSE connections get a keep-alive comment this often.",
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
        doc: "Bytes all streams together may hold; an append past it gets 413.",
    },
    KeyDoc {
        env: "DS_LIMITS__MAX_STREAM_BYTES",
        default: "10000000",
        doc: "Bytes one stream may hold (its own data, not inherited fork data); an append past it gets 413.",
    },
    KeyDoc {
        env: "DS_LIMITS__MAX_REQUEST_BYTES",
        default: "16777216",
        doc: "Largest request body; a larger one gets 413.",
    },
    KeyDoc {
        env: "DS_LIMITS__MAX_READ_BYTES",
        default: "4194304",
        doc: "Largest read response; longer reads are paged (a single larger message is sent whole).",
    },
    KeyDoc {
        env: "DS_STORAGE__MODE",
        default: "memory",
        doc: "`memory` (lost on restart).",
    },
    KeyDoc {
        env: "DS_STORAGE__DATA_DIR",
        default: "./data",
        doc: "Directory of the durable storage modes.",
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
        ] {
            if value.is_zero() {
                return Err(ConfigError(format!("{name} must be greater than 0")));
            }
        }
        if self.storage.mode != StorageMode::Memory {
            return Err(ConfigError(format!(
                "DS_STORAGE__MODE={:?} is not available in this build; use memory",
                self.storage.mode
            )));
        }
        Ok(())
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

/// The settings as a Markdown table (for the README and `--help`).
pub fn markdown_table() -> String {
    let mut out = String::from("| Variable | Default | Meaning |\n|---|---|---|\n");
    for k in KEYS {
        out.push_str(&format!("| `{}` | `{}` | {} |\n", k.env, k.default, k.doc));
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
            for k in KEYS {
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

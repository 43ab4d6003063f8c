//! What can go wrong in `ds`, and the exit code each kind of failure gives a script.
//!
//! The codes are part of the interface (documented in `--help` and the README): a script tells
//! "the stream is not there" from "the server is down" without parsing messages.

/// The exit codes, spelled once.
pub mod exit {
    pub const OK: u8 = 0;
    /// A local failure: reading stdin, writing stdout, a reply `ds` cannot make sense of.
    pub const FAILURE: u8 = 1;
    /// Bad arguments (clap uses the same code for the errors it finds itself).
    pub const USAGE: u8 = 2;
    /// 404 or 410: the stream (or a fork's source) does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// 409 (exists with another configuration, closed, sequence conflict) or a producer fenced by
    /// a newer epoch (403 with `Producer-Epoch`).
    pub const CONFLICT: u8 = 4;
    /// 401, or 403 without producer headers: the credentials were refused.
    pub const AUTH: u8 = 5;
    /// Any other 4xx: the server refused the request as it was (400, 413, ...).
    pub const REFUSED: u8 = 6;
    /// Connection errors, timeouts, 5xx or 429 that outlasted `--retry-for`.
    pub const UNAVAILABLE: u8 = 7;
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Io(String),
    /// The server answered something the protocol does not allow (a missing header, bad JSON).
    #[error("{0}")]
    Protocol(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => exit::USAGE,
            CliError::NotFound(_) => exit::NOT_FOUND,
            CliError::Conflict(_) => exit::CONFLICT,
            CliError::Auth(_) => exit::AUTH,
            CliError::Refused(_) => exit::REFUSED,
            CliError::Unavailable(_) => exit::UNAVAILABLE,
            CliError::Io(_) | CliError::Protocol(_) => exit::FAILURE,
        }
    }

    pub fn io(what: &str, error: std::io::Error) -> Self {
        CliError::Io(format!("{what}: {error}"))
    }
}

//! The command line. `--help` carries the examples and the exit codes; the README's CLI section
//! says the same.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Default batch size of `append` from stdin: large enough to amortise a request, well under the
/// server's default request limit (16 MiB).
pub const DEFAULT_BATCH_BYTES: usize = 1 << 20;

const AFTER_HELP: &str = "\
Streams are named relative to the base URL (--url, else DS_URL, else STREAM_URL, else
http://127.0.0.1:4437/v1/stream): `chat` is <base>/chat, `/v1/stream/chat` is that path on the
base URL's host, and a whole URL is used as it is.

Examples:
  ds create chat --json
  ds append chat '{\"role\":\"user\",\"text\":\"hi\"}' '{\"role\":\"bot\",\"text\":\"hello\"}'
  cat events.jsonl | ds append chat          # one message per line
  ds append logs < app.log                   # a byte stream: the bytes as they are
  ds read chat                               # everything, one JSON message per line
  ds read chat --from 0000000000000000_0000000000000042
  ds tail chat --offsets                     # live; resumes after disconnects
  ds head chat | jq -r .nextOffset
  ds fork chat chat-experiment --at 0000000000000000_0000000000000042
  ds close chat && ds delete chat
  DS_URL=https://streams.example.com/v1/stream DS_TOKEN=$JWT ds --cacert ca.pem read chat

The upstream CLI's forms work too: STREAM_URL and STREAM_AUTH, `create <id> --content-type T`,
`write <id> [content]` (escapes \\n \\t \\r \\\\; stdin when no content), `read <id>` (add -f to
follow live, or run ds as `durable-stream` for upstream defaults), `delete <id>`.

Exit codes:
  0  success
  1  local failure (stdin, stdout) or a reply that breaks the protocol
  2  usage: bad arguments
  3  not found: the stream (or a fork's source) does not exist (404, 410)
  4  conflict: exists with another configuration, closed, or a producer was fenced (409, 403)
  5  credentials refused (401, 403)
  6  request refused as it was (400, 413, other 4xx)
  7  unavailable: connection errors, timeouts, 5xx or 429 for longer than --retry-for";

#[derive(Debug, Parser)]
#[command(
    name = "ds",
    version,
    about = "Command-line client for Durable Streams",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Base URL that stream names are relative to [env: DS_URL, then STREAM_URL]
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// Bearer token, sent as `Authorization: Bearer <token>`
    #[arg(long, env = "DS_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Whole `Authorization` header value (the upstream CLI's flag); --token wins over it
    #[arg(long, env = "STREAM_AUTH", global = true, hide_env_values = true)]
    pub auth: Option<String>,
    /// PEM file of the CA certificates to trust instead of the system's
    #[arg(long, env = "DS_CACERT", global = true)]
    pub cacert: Option<PathBuf>,
    /// How long to retry a request while the server is unreachable or answers 5xx/429
    #[arg(long, env = "DS_RETRY_FOR", default_value = "60s", global = true)]
    pub retry_for: humantime::Duration,
    /// Set when ds runs as `durable-stream`: the upstream CLI's defaults (read follows live)
    #[arg(skip)]
    pub upstream_defaults: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a stream (succeeds if it exists with the same settings)
    Create(CreateArgs),
    /// Append messages (JSON streams: one per argument or stdin line) or bytes; prints the new tail offset
    Append(AppendArgs),
    /// The upstream CLI's write: one message from the argument (escapes \n \t \r \\), else stdin
    Write(WriteArgs),
    /// Read what the stream holds (from --from to the tail), then stop, or follow live with -f
    Read(ReadArgs),
    /// Follow a stream live over SSE (from now unless --from), resuming after disconnects
    Tail(TailArgs),
    /// Print a stream's metadata as JSON
    Head(StreamArg),
    /// Close a stream (no appends after this); prints the final offset
    Close(StreamArg),
    /// Delete a stream
    Delete(StreamArg),
    /// Create FORK as a fork of SOURCE (at --at, default the tail)
    Fork(ForkArgs),
}

#[derive(Debug, Args)]
pub struct StreamArg {
    pub stream: String,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    pub stream: String,
    #[arg(long, default_value = ds_protocol::content_type::DEFAULT_CONTENT_TYPE)]
    pub content_type: String,
    /// Shorthand for --content-type application/json
    #[arg(long)]
    pub json: bool,
    /// Delete the stream after this many seconds without reads or writes
    #[arg(long)]
    pub ttl: Option<u64>,
    /// Delete the stream at this RFC 3339 time
    #[arg(long, conflicts_with = "ttl")]
    pub expires_at: Option<String>,
}

#[derive(Debug, Args)]
pub struct AppendArgs {
    pub stream: String,
    /// The data; none reads stdin
    pub data: Vec<String>,
    /// The stream's content type (default: asked from the server with HEAD)
    #[arg(long)]
    pub content_type: Option<String>,
    /// Producer id for the idempotent producer headers (default: a random one per run)
    #[arg(long)]
    pub producer_id: Option<String>,
    /// Producer epoch (default: the current time in ms, so a new run fences an older one)
    #[arg(long)]
    pub producer_epoch: Option<u64>,
    /// Bytes per request when reading stdin
    #[arg(long, default_value_t = DEFAULT_BATCH_BYTES)]
    pub batch_bytes: usize,
    /// Close the stream with the last append
    #[arg(long)]
    pub close: bool,
    /// No progress bar (it is only ever drawn when stderr is a terminal)
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Args)]
pub struct WriteArgs {
    pub stream: String,
    pub content: Option<String>,
    #[arg(long)]
    pub content_type: Option<String>,
    /// Shorthand for --content-type application/json
    #[arg(long)]
    pub json: bool,
    /// The content is a JSON array whose elements are stored as separate messages
    #[arg(long)]
    pub batch_json: bool,
}

#[derive(Debug, Args)]
pub struct ReadArgs {
    pub stream: String,
    /// Offset to start at: -1 (the start), now, or an offset ds or the server printed
    #[arg(long, default_value = "-1", allow_hyphen_values = true)]
    pub from: String,
    /// Keep following live after reaching the tail
    #[arg(short, long)]
    pub follow: bool,
    /// Print `offset <offset>` on stderr after each batch: where to resume with --from
    #[arg(long)]
    pub offsets: bool,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    pub stream: String,
    /// Offset to start at: now (default), -1, or an offset
    #[arg(long, default_value = "now", allow_hyphen_values = true)]
    pub from: String,
    /// Print `offset <offset>` on stderr after each batch: where to resume with --from
    #[arg(long)]
    pub offsets: bool,
}

#[derive(Debug, Args)]
pub struct ForkArgs {
    pub source: String,
    pub fork: String,
    /// Offset in SOURCE where the fork diverges (default: SOURCE's tail)
    #[arg(long)]
    pub at: Option<String>,
    /// Messages (JSON) or bytes past --at to inherit as well
    #[arg(long)]
    pub sub_offset: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn upstream_forms_parse() {
        for line in [
            &["ds", "create", "chat", "--content-type", "text/plain"][..],
            &["ds", "create", "events", "--json"],
            &["ds", "write", "chat", "hello\\nworld"],
            &["ds", "write", "events", "[1,2]", "--batch-json"],
            &["ds", "write", "chat"],
            &["ds", "read", "chat"],
            &["ds", "delete", "chat"],
            &[
                "ds",
                "--url",
                "http://h/v1/stream",
                "read",
                "chat",
                "--from",
                "-1",
            ],
        ] {
            assert!(Cli::try_parse_from(line).is_ok(), "{line:?}");
        }
    }
}

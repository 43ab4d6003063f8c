//! `ds`, a command-line client for Durable Streams.
//!
//! `args` is the command line (clap), `target` turns a stream argument into a URL, `http` sends
//! with retries and maps statuses to exit codes, `append` writes, `read` reads (catch-up and
//! live), `output` formats what is read. `main.rs` only runs [`run`] and exits with its code.

pub mod append;
pub mod args;
pub mod error;
pub mod http;
pub mod output;
pub mod read;
pub mod target;

use ds_protocol::headers::{
    STREAM_CLOSED, STREAM_EXPIRES_AT, STREAM_FORK_OFFSET, STREAM_FORK_SUB_OFFSET,
    STREAM_FORKED_FROM, STREAM_ID, STREAM_NEXT_OFFSET, STREAM_TTL,
};
use reqwest::{Method, StatusCode};

use crate::append::{AppendOptions, Input};
use crate::args::{Cli, Command};
use crate::error::CliError;
use crate::http::{Client, ClientOptions, header, status_error};
use crate::output::Shape;
use crate::read::{ReadEnd, ReadOptions, warn};

/// Runs one command line; what it prints on stdout is the command's result, everything else
/// (warnings, retries, offsets) goes to stderr.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let authorization = match (&cli.token, &cli.auth) {
        (Some(token), _) => Some(format!("Bearer {token}")),
        (None, Some(raw)) => Some(raw.clone()),
        (None, None) => None,
    };
    let client = Client::new(ClientOptions {
        authorization,
        cacert: cli.cacert.as_deref(),
        retry_for: cli.retry_for.into(),
    })?;
    let base = target::base_url(cli.url.as_deref())?;
    let url = |stream: &str| target::stream_url(&base, stream);
    let mut stdout = tokio::io::stdout();
    match cli.command {
        Command::Create(c) => {
            let url = url(&c.stream)?;
            let content_type = if c.json {
                "application/json".to_owned()
            } else {
                c.content_type
            };
            let what = format!("PUT {url}");
            let response = client
                .send(
                    &what,
                    || {
                        let mut request = client
                            .request(Method::PUT, url.clone())
                            .header("content-type", &content_type);
                        if let Some(ttl) = c.ttl {
                            request = request.header(STREAM_TTL, ttl);
                        }
                        if let Some(at) = &c.expires_at {
                            request = request.header(STREAM_EXPIRES_AT, at);
                        }
                        request
                    },
                    warn,
                )
                .await?
                .response;
            match response.status() {
                StatusCode::CREATED | StatusCode::OK => Ok(()),
                _ => Err(status_error(&what, response).await),
            }
        }
        Command::Append(a) => {
            let url = url(&a.stream)?;
            let content_type = match a.content_type {
                Some(t) => t,
                None => read::head(&client, &url).await?.content_type,
            };
            let input = if a.data.is_empty() {
                Input::Stdin
            } else {
                Input::Arguments(a.data)
            };
            let options = AppendOptions {
                producer_id: a
                    .producer_id
                    .unwrap_or_else(AppendOptions::fresh_producer_id),
                producer_epoch: a
                    .producer_epoch
                    .unwrap_or_else(AppendOptions::default_epoch),
                batch_bytes: a.batch_bytes.max(1),
                close: a.close,
                progress: !a.no_progress,
            };
            let appended = append::append(&client, &url, &content_type, input, &options).await?;
            print_offset(appended.next_offset.as_deref()).await
        }
        Command::Write(w) => {
            let url = url(&w.stream)?;
            let content_type = match (w.json || w.batch_json, w.content_type) {
                (true, _) => "application/json".to_owned(),
                (false, Some(t)) => t,
                (false, None) => read::head(&client, &url).await?.content_type,
            };
            let input = match w.content {
                None => Input::Stdin,
                Some(text) if w.batch_json => Input::Body(append::unescape(&text).into_bytes()),
                Some(text) => Input::Arguments(vec![append::unescape(&text)]),
            };
            let options = AppendOptions {
                producer_id: AppendOptions::fresh_producer_id(),
                producer_epoch: AppendOptions::default_epoch(),
                batch_bytes: args::DEFAULT_BATCH_BYTES,
                close: false,
                progress: true,
            };
            append::append(&client, &url, &content_type, input, &options).await?;
            Ok(())
        }
        Command::Read(r) => {
            let url = url(&r.stream)?;
            let head = read::head(&client, &url).await?;
            let shape = Shape::of(&head.content_type);
            let follow = r.follow || cli.upstream_defaults;
            let options = ReadOptions {
                from: r.from,
                offsets: r.offsets,
            };
            let (next, end, closed) =
                read::catch_up(&client, &url, shape, &options, &mut stdout).await?;
            if end == ReadEnd::ReaderGone || !follow || closed {
                return Ok(());
            }
            let options = ReadOptions {
                from: next,
                ..options
            };
            read::follow(&client, &url, shape, &options, &mut stdout).await?;
            Ok(())
        }
        Command::Tail(t) => {
            let url = url(&t.stream)?;
            let head = read::head(&client, &url).await?;
            // Resolve `now` once, here: every reconnect then resumes from a concrete offset.
            let from = if t.from == "now" {
                head.next_offset
            } else {
                t.from
            };
            let options = ReadOptions {
                from,
                offsets: t.offsets,
            };
            read::follow(
                &client,
                &url,
                Shape::of(&head.content_type),
                &options,
                &mut stdout,
            )
            .await?;
            Ok(())
        }
        Command::Head(h) => {
            let url = url(&h.stream)?;
            let what = format!("HEAD {url}");
            let response = client
                .send(&what, || client.request(Method::HEAD, url.clone()), warn)
                .await?
                .response;
            if response.status() != StatusCode::OK {
                return Err(status_error(&what, response).await);
            }
            let field = |name: &str| header(&response, name).map(str::to_owned);
            let summary = serde_json::json!({
                "url": url.as_str(),
                "contentType": field("content-type"),
                "nextOffset": field(STREAM_NEXT_OFFSET),
                "closed": response
                    .headers()
                    .get(STREAM_CLOSED)
                    .is_some_and(|v| ds_protocol::headers::is_true(v.as_bytes())),
                "ttl": field(STREAM_TTL),
                "expiresAt": field(STREAM_EXPIRES_AT),
                "streamId": field(STREAM_ID),
            });
            print_line(&summary.to_string()).await
        }
        Command::Close(c) => {
            let url = url(&c.stream)?;
            let what = format!("POST {url} (close)");
            let response = client
                .send(
                    &what,
                    || {
                        client
                            .request(Method::POST, url.clone())
                            .header(STREAM_CLOSED, "true")
                    },
                    warn,
                )
                .await?
                .response;
            if !response.status().is_success() {
                return Err(status_error(&what, response).await);
            }
            print_offset(header(&response, STREAM_NEXT_OFFSET)).await
        }
        Command::Delete(d) => {
            let url = url(&d.stream)?;
            let what = format!("DELETE {url}");
            let attempted = client
                .send(&what, || client.request(Method::DELETE, url.clone()), warn)
                .await?;
            let status = attempted.response.status();
            // A retried DELETE that finds nothing: the earlier attempt deleted it.
            if status.is_success() || (status == StatusCode::NOT_FOUND && attempted.attempts > 1) {
                Ok(())
            } else {
                Err(status_error(&what, attempted.response).await)
            }
        }
        Command::Fork(f) => {
            let source = url(&f.source)?;
            let fork = url(&f.fork)?;
            let same_origin = source.origin() == fork.origin();
            if !same_origin {
                return Err(CliError::Usage(format!(
                    "{source} and {fork} are on different servers; a fork's source must be on its server"
                )));
            }
            let what = format!("PUT {fork} (fork of {source})");
            let response = client
                .send(
                    &what,
                    || {
                        let mut request = client
                            .request(Method::PUT, fork.clone())
                            .header(STREAM_FORKED_FROM, target::path_of(&source));
                        if let Some(offset) = &f.at {
                            request = request.header(STREAM_FORK_OFFSET, offset);
                        }
                        if let Some(sub) = f.sub_offset {
                            request = request.header(STREAM_FORK_SUB_OFFSET, sub);
                        }
                        request
                    },
                    warn,
                )
                .await?
                .response;
            match response.status() {
                StatusCode::CREATED | StatusCode::OK => {
                    print_offset(header(&response, STREAM_NEXT_OFFSET)).await
                }
                _ => Err(status_error(&what, response).await),
            }
        }
    }
}

/// The offset a write left the stream at, for `offset=$(ds append ...)`.
async fn print_offset(offset: Option<&str>) -> Result<(), CliError> {
    match offset {
        Some(offset) => print_line(offset).await,
        None => Ok(()),
    }
}

async fn print_line(line: &str) -> Result<(), CliError> {
    let mut stdout = tokio::io::stdout();
    output::write_all(&mut stdout, format!("{line}\n").as_bytes()).await?;
    Ok(())
}

/// Whether the upstream CLI's defaults apply: `ds` was started under the upstream CLI's name
/// (`durable-stream`, e.g. through a symlink), where `read` follows live.
pub fn invoked_as_upstream(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .is_some_and(|name| name == "durable-stream")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_name_turns_on_upstream_defaults() {
        assert!(invoked_as_upstream(std::ffi::OsStr::new(
            "/usr/local/bin/durable-stream"
        )));
        assert!(!invoked_as_upstream(std::ffi::OsStr::new(
            "/usr/local/bin/ds"
        )));
    }
}

//! Writes through Envoy land in Postgres through ds-sync exactly once while each component is
//! killed (SIGKILL) and restarted in turn under write load: ds-server (`file-durable`, and again
//! in `file-fast` and `acid` mode), the ds-sync worker, then Envoy; and in a fourth run
//! Postgres (a local cluster the harness owns), the server and the worker. Once more as compose
//! runs the server, a hot buffer (`DS_RETENTION__MODE=acked`) releasing what ds-sync acked.
//!
//! Writers use idempotent producer headers and retry each append with the same sequence number
//! until it is acknowledged, so a retry after a crash is deduplicated by the server. At the end,
//! for every stream:
//! - a catch-up read equals exactly what the writers had acknowledged, in order (nothing lost,
//!   nothing doubled by a retry), and
//! - the rows of `ds_messages` re-assembled in `(stream_offset, idx)` order equal that catch-up
//!   read: the messages of the JSON stream, the bytes of the binary and the text stream (the text
//!   stream is mirrored through long-poll, the others through SSE).
//!
//! As a hot buffer, the mirror must equal what was acknowledged, and the server must then have
//! released all of it (its earliest offset at its tail, nothing left to read from the start).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ds_e2e::postgres::{Postgres, connect};
use ds_e2e::server::ServerOptions;
use ds_e2e::stack::EdgeStack;
use ds_e2e::wait::wait_until;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{
    BINARY, Content, JSON, Producer, StreamClient, TEXT, checkpoint, first_difference, mirrored,
};
use tokio::task::JoinHandle;

/// Streams under the prefix ds-sync discovers them by (the server's registry), one per way of
/// being mirrored.
const STREAMS: [(&str, &str); 3] = [
    ("/v1/stream/crash/orders", JSON),
    ("/v1/stream/crash/blobs", BINARY),
    ("/v1/stream/crash/log", TEXT),
];
const PATTERN: &str = "/v1/stream/crash/*";

/// Writes every writer must get acknowledged after a restart before the next component dies:
/// proof that the stack recovered, not just that its process is up.
const PROGRESS_AFTER_RESTART: u64 = 5;
/// Writing under load before each kill; time passing is the point, not a wait for a condition.
const LOAD_BEFORE_KILL: Duration = Duration::from_millis(1500);
/// How long a component stays dead: writers and ds-sync keep failing and retrying meanwhile.
const DEAD_FOR: Duration = Duration::from_millis(500);
/// Deadlines for conditions (recovery, catch-up); generous for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// What append number `i` of a stream with `content_type` sends, and what it adds to the stream.
fn payload(content_type: &str, i: u64) -> (Vec<u8>, Content) {
    match content_type {
        JSON => {
            // Every third append carries two messages: a JSON array appends its elements.
            let messages: Vec<Value> = if i.is_multiple_of(3) {
                vec![json!({ "i": i, "part": 0 }), json!({ "i": i, "part": 1 })]
            } else {
                vec![json!({ "i": i, "note": "crash-test ünïcode" })]
            };
            let body = if messages.len() == 1 {
                messages[0].to_string()
            } else {
                Value::Array(messages.clone()).to_string()
            };
            (body.into_bytes(), Content::Messages(messages))
        }
        BINARY => {
            // Every byte value, CR and LF included, in lengths from 1 to 300.
            let len = 1 + (i * 37 % 300) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|k| ((i as usize * 31 + k * 7) % 256) as u8)
                .collect();
            (bytes.clone(), Content::Bytes(bytes))
        }
        _ => {
            // Text with bare CR, CRLF and LF: mirrored byte for byte or not at all.
            let text = format!("line {i}\rcr\r\ncrlf\n");
            (text.clone().into_bytes(), Content::Bytes(text.into_bytes()))
        }
    }
}

fn extend(into: &mut Content, more: Content) {
    match (into, more) {
        (Content::Messages(all), Content::Messages(new)) => all.extend(new),
        (Content::Bytes(all), Content::Bytes(new)) => all.extend(new),
        (into, more) => panic!("mixed content {into:?} and {more:?}"),
    }
}

/// One writer per stream: appends until told to stop, each until acknowledged.
struct Writer {
    path: &'static str,
    acknowledged: Arc<AtomicU64>,
    /// Returns what the stream must hold, and the producer (for its retry counts).
    task: JoinHandle<anyhow::Result<(Content, Producer)>>,
}

fn spawn_writer(
    client: StreamClient,
    path: &'static str,
    content_type: &'static str,
    stop: Arc<AtomicBool>,
) -> Writer {
    let acknowledged = Arc::new(AtomicU64::new(0));
    let counter = acknowledged.clone();
    let task = tokio::spawn(async move {
        let mut producer = Producer::new(format!(
            "e2e-crash-{}",
            path.rsplit('/').next().unwrap_or(path)
        ));
        let mut expected = if content_type == JSON {
            Content::Messages(Vec::new())
        } else {
            Content::Bytes(Vec::new())
        };
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let (body, adds) = payload(content_type, i);
            producer
                .append_until_acknowledged(&client, path, content_type, &body, DEADLINE)
                .await?;
            extend(&mut expected, adds);
            counter.fetch_add(1, Ordering::Relaxed);
            i += 1;
        }
        Ok((expected, producer))
    });
    Writer {
        path,
        acknowledged,
        task,
    }
}

/// Waits until every writer has had `more` appends acknowledged beyond `since`; panics at once
/// with the writer's error if one gave up.
async fn wait_for_progress(writers: &mut [Writer], since: &[u64], more: u64, after: &str) {
    let view: &[Writer] = writers;
    let stopped = wait_until(
        &format!("{more} acknowledged appends per stream after {after}"),
        DEADLINE,
        || async move {
            let writers = view;
            if let Some(index) = writers.iter().position(|w| w.task.is_finished()) {
                return Ok(Some(Some(index)));
            }
            Ok(writers
                .iter()
                .zip(since)
                .all(|(w, &start)| w.acknowledged.load(Ordering::Relaxed) >= start + more)
                .then_some(None))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    if let Some(index) = stopped {
        let writer = &mut writers[index];
        let outcome = (&mut writer.task).await.expect("writer task");
        panic!(
            "writer of {} stopped after {after}: {:#}",
            writer.path,
            outcome
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("without an error"))
        );
    }
}

fn counts(writers: &[Writer]) -> Vec<u64> {
    writers
        .iter()
        .map(|w| w.acknowledged.load(Ordering::Relaxed))
        .collect()
}

/// What the test crashes, in turn.
#[derive(Debug, Clone, Copy)]
enum Component {
    Server,
    Sync,
    Envoy,
    /// Only when the harness owns Postgres (a local cluster), not a `DATABASE_URL` server.
    Postgres,
}

impl Component {
    async fn kill(self, stack: &mut EdgeStack) -> anyhow::Result<()> {
        match self {
            Component::Server => stack.server.kill(),
            Component::Sync => stack.sync.as_mut().expect("sync").kill(),
            Component::Envoy => stack.envoy.kill(),
            Component::Postgres => stack.postgres_mut()?.kill().await,
        }
    }

    async fn restart(self, stack: &mut EdgeStack) -> anyhow::Result<()> {
        match self {
            Component::Server => stack.server.restart().await,
            Component::Sync => stack.sync.as_mut().expect("sync").restart().await,
            Component::Envoy => stack.envoy.restart().await,
            Component::Postgres => stack.postgres_mut()?.restart().await,
        }
    }
}

const SERVER_SYNC_ENVOY: [Component; 3] = [Component::Server, Component::Sync, Component::Envoy];

#[tokio::test]
async fn writes_through_envoy_land_in_postgres_exactly_once_while_each_component_is_killed() {
    // file-durable and TLS (the defaults): what compose runs, and what makes an acknowledged
    // append survive the server's SIGKILL.
    crash_in_turn(ServerOptions::default(), None, &SERVER_SYNC_ENVOY).await;
}

#[tokio::test]
async fn the_same_holds_with_the_server_in_file_fast_mode() {
    // file-fast promises to survive a process crash (not a power loss): SIGKILL is one.
    let options = ServerOptions {
        storage_mode: "file-fast".to_owned(),
        ..ServerOptions::default()
    };
    crash_in_turn(options, None, &SERVER_SYNC_ENVOY).await;
}

#[tokio::test]
async fn the_same_holds_with_the_server_in_acid_mode() {
    let options = ServerOptions {
        storage_mode: "acid".to_owned(),
        ..ServerOptions::default()
    };
    crash_in_turn(options, None, &SERVER_SYNC_ENVOY).await;
}

#[tokio::test]
async fn the_same_holds_for_a_hot_buffer_releasing_what_ds_sync_acked() {
    // compose.yaml's default: nothing unmirrored may be released, whatever crashes.
    let options = ServerOptions {
        extra_env: vec![("DS_RETENTION__MODE".to_owned(), "acked".to_owned())],
        ..ServerOptions::default()
    };
    crash_in_turn(options, None, &SERVER_SYNC_ENVOY).await;
}

#[tokio::test]
async fn the_same_holds_when_postgres_is_killed_too() {
    // A Postgres the harness owns (a local cluster, or a container under
    // DS_E2E_POSTGRES=testcontainers), since a DATABASE_URL server cannot be killed.
    let postgres = Postgres::start_owned()
        .await
        .expect("a Postgres the harness owns");
    crash_in_turn(
        ServerOptions::default(),
        Some(postgres),
        &[Component::Postgres, Component::Server, Component::Sync],
    )
    .await;
}

/// Writers load every stream through Envoy while each of `components` is SIGKILLed and restarted
/// in turn; then the streams must be what was acknowledged and the mirror must equal them.
/// `postgres`: where ds-sync writes (default: a fresh database from [`Postgres::start`]).
async fn crash_in_turn(
    server_options: ServerOptions,
    postgres: Option<Postgres>,
    components: &[Component],
) {
    let mode = server_options.storage_mode.clone();
    let releases = server_options
        .extra_env
        .iter()
        .any(|(key, value)| key == "DS_RETENTION__MODE" && value == "acked");
    let mut stack = EdgeStack::start(server_options)
        .await
        .expect("ds-server behind envoy");
    let sync_env = vec![
        // Reconnect within a second of a component coming back, not after up to 30 s.
        ("DS_SYNC__BACKOFF_MAX".to_owned(), "1s".to_owned()),
        ("DS_SYNC__STATS_INTERVAL".to_owned(), "2s".to_owned()),
    ];
    match postgres {
        Some(postgres) => stack.start_sync_on(postgres, PATTERN, sync_env).await,
        None => stack.start_sync(PATTERN, sync_env).await,
    }
    .expect("ds-sync following through envoy");
    let client = StreamClient::new(
        stack.client.clone(),
        stack.edge_url(),
        Some(stack.token.clone()),
    );
    for (path, content_type) in STREAMS {
        client.create(path, content_type).await.expect("create");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers: Vec<Writer> = STREAMS
        .iter()
        .map(|&(path, content_type)| spawn_writer(client.clone(), path, content_type, stop.clone()))
        .collect();
    let at_start = counts(&writers);
    wait_for_progress(&mut writers, &at_start, PROGRESS_AFTER_RESTART, "start").await;

    for &component in components {
        tokio::time::sleep(LOAD_BEFORE_KILL).await;
        component
            .kill(&mut stack)
            .await
            .unwrap_or_else(|e| panic!("kill {component:?}: {e:#}"));
        // Writers keep going (appends in flight at the kill included) and fail against the
        // dead component until it is back.
        tokio::time::sleep(DEAD_FOR).await;
        let before_restart = counts(&writers);
        component
            .restart(&mut stack)
            .await
            .unwrap_or_else(|e| panic!("restart {component:?}: {e:#}"));
        wait_for_progress(
            &mut writers,
            &before_restart,
            PROGRESS_AFTER_RESTART,
            &format!("{component:?} restart"),
        )
        .await;
    }
    tokio::time::sleep(LOAD_BEFORE_KILL).await;
    stop.store(true, Ordering::Relaxed);

    let mut expected = Vec::new();
    let mut retries = 0;
    for writer in writers {
        let (content, producer) = writer
            .task
            .await
            .expect("writer task")
            .unwrap_or_else(|e| panic!("writer of {}: {e:#}", writer.path));
        eprintln!(
            "{mode}, killing {components:?}: {}: {} appends acknowledged ({} items), \
             {} attempts retried, {} answered as duplicates of a lost acknowledgement",
            writer.path,
            producer.next_seq,
            content.len(),
            producer.retries,
            producer.duplicates
        );
        retries += producer.retries;
        // One lost acknowledgement for certain (the crashes make some only by chance): the
        // resend is deduplicated, so it must change neither the stream nor the mirror below.
        let content_type = STREAMS
            .iter()
            .find(|(path, _)| *path == writer.path)
            .map(|(_, ct)| *ct)
            .expect("stream of the writer");
        let status = producer
            .resend_last(&client, writer.path, content_type)
            .await
            .expect("resend");
        assert_eq!(
            status,
            StatusCode::NO_CONTENT,
            "{}: resent append",
            writer.path
        );
        expected.push((writer.path, content));
    }
    // The crashes happened under load: some appends had to be retried.
    assert!(retries > 0, "no append was retried: did anything crash?");

    let pg = connect(stack.database_url().expect("database"))
        .await
        .expect("connect to the mirror");
    for (path, _) in STREAMS {
        let (_, tail) = client.head(path).await.expect("head");
        wait_until(
            &format!("ds-sync checkpoint of {path} at the tail {tail}"),
            DEADLINE,
            || async {
                Ok((checkpoint(&pg, path).await?.as_deref() == Some(tail.as_str())).then_some(()))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    }

    for (path, acknowledged) in &expected {
        if releases {
            let json = matches!(acknowledged, Content::Messages(_));
            let rows = mirrored(&pg, path, json).await.expect("rows");
            assert!(
                &rows == acknowledged,
                "{path}: the mirror is not what was acknowledged: {}",
                first_difference(acknowledged, &rows)
            );
            // ds-sync acked the tail it committed: the server releases everything.
            wait_until(
                &format!("{path} released to its tail"),
                DEADLINE,
                || async {
                    let response = client.request(Method::HEAD, path).send().await?;
                    let header = |name| {
                        response
                            .headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let earliest = header("stream-earliest-offset");
                    Ok(
                        (earliest.is_some() && earliest == header("stream-next-offset"))
                            .then_some(()),
                    )
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
            let stream = client.read_all(path).await.expect("catch-up read");
            assert_eq!(
                stream.len(),
                0,
                "{path}: held after everything was released"
            );
            continue;
        }
        let stream = client.read_all(path).await.expect("catch-up read");
        assert!(
            &stream == acknowledged,
            "{path}: the stream is not what was acknowledged: {}",
            first_difference(acknowledged, &stream)
        );
        let json = matches!(stream, Content::Messages(_));
        let rows = mirrored(&pg, path, json).await.expect("rows");
        assert!(
            rows == stream,
            "{path}: the mirror differs from the stream: {}",
            first_difference(&stream, &rows)
        );
    }
}

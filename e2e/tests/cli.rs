//! `ds`, the command-line client, end to end against the real ds-server binary (and through
//! the real Envoy with a JWT): appends from stdin that survive a kill -9 of the server and land
//! exactly once, a live tail that follows across a restart without repeating or skipping, exit
//! codes a script can rely on, and the upstream CLI's forms.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ds_e2e::fixtures;
use ds_e2e::server::{DsServer, ServerOptions};
use ds_e2e::stack::EdgeStack;
use ds_e2e::wait::wait_until;
use support::{Content, JSON, StreamClient};

/// Generous: every wait below ends as soon as its condition holds.
const DEADLINE: Duration = Duration::from_secs(60);

/// `ds` with only the environment a test gives it (no inherited `DS_*` or `STREAM_*`).
fn ds(base_url: &str) -> Command {
    let binary = fixtures::binary("ds").expect("the ds binary (cargo build -p ds-cli)");
    let mut command = Command::new(binary);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("DS_") || key.starts_with("STREAM_") {
            command.env_remove(key);
        }
    }
    command.env("DS_URL", format!("{base_url}/v1/stream"));
    command
}

/// Runs `ds` to completion with `stdin` as its input.
fn run(mut command: Command, stdin: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ds");
    let mut input = child.stdin.take().expect("ds stdin");
    input.write_all(stdin).expect("write ds stdin");
    drop(input);
    child.wait_with_output().expect("wait for ds")
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "ds failed with {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits for a child to exit, killing it after `deadline`.
fn wait_exit(child: &mut Child, deadline: Duration) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait ds") {
            return status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            panic!("ds did not exit within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lines of a child's stdout (or stderr), as they come, over a channel.
fn lines_of(reader: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Takes lines from `lines` until there are `count`, or fails at the deadline.
fn take_lines(lines: &mpsc::Receiver<String>, count: usize, into: &mut Vec<String>) {
    let deadline = Instant::now() + DEADLINE;
    while into.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => into.push(line),
            Err(e) => panic!("after {} of {count} lines: {e}", into.len()),
        }
    }
}

fn plain_server_options(mode: &str) -> ServerOptions {
    ServerOptions {
        storage_mode: mode.to_owned(),
        tls: false,
        extra_env: Vec::new(),
    }
}

fn work_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ds-e2e-cli-")
        .tempdir()
        .expect("temp dir")
}

fn message(n: usize) -> String {
    format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(40))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_from_stdin_survives_a_server_kill_and_lands_exactly_once() {
    let work = work_dir();
    let mut server = DsServer::start(plain_server_options("file-durable"), work.path())
        .await
        .expect("ds-server");
    let base = server.base_url();
    ok(&run(
        {
            let mut c = ds(&base);
            c.args(["create", "crash", "--json"]);
            c
        },
        b"",
    ));

    const LINES: usize = 6000;
    let mut append = ds(&base);
    // Small batches, so that many requests are in flight around the kill.
    append
        .args([
            "append",
            "crash",
            "--batch-bytes",
            "2000",
            "--retry-for",
            "60s",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = append.spawn().expect("spawn ds append");
    let mut stdin = child.stdin.take().expect("ds stdin");
    let stderr = lines_of(child.stderr.take().expect("ds stderr"));
    // The first half goes in at once; the second only once the server is dead, so that ds has
    // batches to send (and retry) while nothing answers.
    let (killed_tx, killed) = mpsc::channel::<()>();
    let feeder = std::thread::spawn(move || {
        for n in 0..LINES {
            if n == LINES / 2 {
                stdin.flush().expect("flush");
                killed.recv().expect("the test signals the kill");
            }
            writeln!(stdin, "{}", message(n)).expect("feed ds");
        }
    });

    let direct = StreamClient::new(reqwest::Client::new(), base.clone(), None);
    // Kill once a good part, but not all, has landed.
    wait_until("a third of the lines appended", DEADLINE, || async {
        let (_, tail) = direct.head("/v1/stream/crash").await?;
        let pos: u64 = tail.rsplit('_').next().unwrap_or("0").parse()?;
        Ok((pos > (LINES as u64 / 3) * 50).then_some(()))
    })
    .await
    .expect("appends under way");
    server.kill().expect("kill -9 ds-server");
    killed_tx.send(()).expect("release the second half");
    // ds retries against the dead server (asserted below) until it is back.
    let retried = wait_until_retry(&stderr);
    server.restart().await.expect("restart ds-server");
    feeder.join().expect("feeder");
    let status = wait_exit(&mut child, DEADLINE);
    let mut rest = Vec::new();
    while let Ok(line) = stderr.try_recv() {
        rest.push(line);
    }
    assert!(status.success(), "ds append: {status:?}; stderr: {rest:?}");
    assert!(
        retried,
        "ds never reported a retry while the server was down"
    );

    let read = ok(&run(
        {
            let mut c = ds(&base);
            c.args(["read", "crash"]);
            c
        },
        b"",
    ));
    let expected: Vec<String> = (0..LINES).map(message).collect();
    let got: Vec<&str> = read.lines().collect();
    assert_eq!(
        got.len(),
        LINES,
        "every line exactly once (got {})",
        got.len()
    );
    assert!(
        got.iter().zip(&expected).all(|(g, e)| g == e),
        "in order, unchanged"
    );
    let stored = direct.read_all("/v1/stream/crash").await.expect("read");
    assert_eq!(stored.len(), LINES);
}

/// Whether ds reports a failed attempt within a few seconds of the kill.
fn wait_until_retry(stderr: &mpsc::Receiver<String>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Ok(line) = stderr.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if line.contains("retrying") {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_across_a_server_restart_without_repeating_or_skipping() {
    let work = work_dir();
    let mut server = DsServer::start(plain_server_options("file-durable"), work.path())
        .await
        .expect("ds-server");
    let base = server.base_url();
    let direct = StreamClient::new(reqwest::Client::new(), base.clone(), None);
    direct
        .create("/v1/stream/live", JSON)
        .await
        .expect("create");

    let mut tail = ds(&base);
    tail.args(["tail", "live", "--from", "-1", "--offsets"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = tail.spawn().expect("spawn ds tail");
    let stdout = lines_of(child.stdout.take().expect("stdout"));
    let stderr = lines_of(child.stderr.take().expect("stderr"));

    let mut seen = Vec::new();
    for n in 0..5 {
        ok(&run(
            {
                let mut c = ds(&base);
                c.args(["append", "live", &message(n)]);
                c
            },
            b"",
        ));
    }
    take_lines(&stdout, 5, &mut seen);

    server.restart().await.expect("restart ds-server");
    for n in 5..10 {
        ok(&run(
            {
                let mut c = ds(&base);
                c.args(["append", "live", &message(n)]);
                c
            },
            b"",
        ));
    }
    take_lines(&stdout, 10, &mut seen);
    // Closing ends the tail with success.
    ok(&run(
        {
            let mut c = ds(&base);
            c.args(["close", "live"]);
            c
        },
        b"",
    ));
    let status = wait_exit(&mut child, DEADLINE);
    assert!(status.success(), "ds tail after close: {status:?}");
    while let Ok(line) = stdout.try_recv() {
        seen.push(line);
    }
    let expected: Vec<String> = (0..10).map(message).collect();
    assert_eq!(
        seen, expected,
        "each message once, in order, across the restart"
    );
    let notes: Vec<String> = stderr.try_iter().collect();
    assert!(
        notes.iter().any(|l| l.contains("reconnecting from offset")),
        "the restart was seen as a disconnect: {notes:?}"
    );
    assert!(
        notes.iter().any(|l| l.starts_with("offset ")),
        "--offsets: {notes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_the_upstream_forms() {
    let work = work_dir();
    let server = DsServer::start(plain_server_options("memory"), work.path())
        .await
        .expect("ds-server");
    let base = server.base_url();
    let code = |args: &[&str]| {
        let mut c = ds(&base);
        c.args(args);
        run(c, b"").status.code()
    };
    assert_eq!(code(&["read", "missing"]), Some(3), "not found");
    assert_eq!(code(&["create", "kinds", "--json"]), Some(0));
    assert_eq!(
        code(&["create", "kinds", "--json"]),
        Some(0),
        "same settings: fine"
    );
    assert_eq!(
        code(&["create", "kinds", "--content-type", "text/plain"]),
        Some(4)
    );
    assert_eq!(
        code(&["append", "kinds", "{not json"]),
        Some(6),
        "refused before sending"
    );
    assert_eq!(
        code(&["read", "kinds", "--from", "garbage"]),
        Some(6),
        "400 from the server"
    );
    assert_eq!(code(&["frobnicate"]), Some(2), "usage");
    assert_eq!(code(&["close", "kinds"]), Some(0));
    assert_eq!(code(&["append", "kinds", "1"]), Some(4), "closed");

    // The upstream CLI's README: STREAM_URL as the base, write with escapes, read, delete.
    let upstream = |args: &[&str], stdin: &[u8]| {
        let mut c = ds(&base);
        c.env_remove("DS_URL")
            .env("STREAM_URL", format!("{base}/v1/stream"))
            .args(args);
        run(c, stdin)
    };
    ok(&upstream(
        &["create", "up", "--content-type", "text/plain"],
        b"",
    ));
    ok(&upstream(&["write", "up", "one\\ntwo\\n"], b""));
    ok(&upstream(&["write", "up"], b"three\n"));
    assert_eq!(ok(&upstream(&["read", "up"], b"")), "one\ntwo\nthree\n");
    ok(&upstream(&["create", "upjson", "--json"], b""));
    ok(&upstream(&["write", "upjson", "[1,2]", "--json"], b""));
    ok(&upstream(
        &["write", "upjson", "[3,4]", "--batch-json"],
        b"",
    ));
    assert_eq!(ok(&upstream(&["read", "upjson"], b"")), "[1,2]\n3\n4\n");
    let head: serde_json::Value =
        serde_json::from_str(&ok(&upstream(&["head", "upjson"], b""))).expect("head is JSON");
    assert_eq!(head["contentType"], "application/json");
    assert_eq!(head["closed"], false);
    ok(&upstream(&["fork", "upjson", "upfork"], b""));
    ok(&upstream(&["append", "upfork", "5"], b""));
    assert_eq!(ok(&upstream(&["read", "upfork"], b"")), "[1,2]\n3\n4\n5\n");
    ok(&upstream(&["delete", "up"], b""));
    assert_eq!(upstream(&["read", "up"], b"").status.code(), Some(3));

    // Bytes from stdin come back byte for byte.
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ok(&upstream(&["create", "blob"], b""));
    ok(&upstream(
        &["append", "blob", "--batch-bytes", "65536"],
        &bytes,
    ));
    assert_eq!(upstream(&["read", "blob"], b"").stdout, bytes);
    // And live over SSE (base64 on the wire for a binary stream).
    let mut c = ds(&base);
    c.args(["tail", "blob", "--from", "-1"])
        .stdout(Stdio::piped());
    let mut child = c.spawn().expect("spawn tail");
    let mut out = child.stdout.take().expect("stdout");
    // Drained as it comes: 200 kB would fill the pipe and stall ds.
    let reader = std::thread::spawn(move || {
        let mut tailed = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut tailed).expect("read tail");
        tailed
    });
    ok(&upstream(&["close", "blob"], b""));
    let status = wait_exit(&mut child, DEADLINE);
    assert!(status.success());
    assert_eq!(reader.join().expect("reader"), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_envoy_with_a_jwt() {
    let stack = EdgeStack::start(ServerOptions {
        storage_mode: "memory".to_owned(),
        ..ServerOptions::default()
    })
    .await
    .expect("ds-server behind envoy");
    let edge = stack.edge_url();
    let ca = fixtures::path("ca.pem");
    let with_token = |args: &[&str], stdin: &[u8]| {
        let mut c = ds(&edge);
        c.env("DS_TOKEN", &stack.token)
            .arg("--cacert")
            .arg(&ca)
            .args(args);
        run(c, stdin)
    };
    ok(&with_token(&["create", "edge", "--json"], b""));
    let lines: String = (0..100).map(|n| message(n) + "\n").collect();
    ok(&with_token(&["append", "edge"], lines.as_bytes()));
    assert_eq!(ok(&with_token(&["read", "edge"], b"")), lines);

    let mut anonymous = ds(&edge);
    anonymous.arg("--cacert").arg(&ca).args(["read", "edge"]);
    assert_eq!(run(anonymous, b"").status.code(), Some(5), "no token: 401");
    let mut untrusted = ds(&edge);
    untrusted
        // Whatever the machine trusts, it is not the test CA unless these point at it.
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .env("DS_TOKEN", &stack.token)
        .args(["--retry-for", "0s", "read", "edge"]);
    assert_eq!(
        run(untrusted, b"").status.code(),
        Some(7),
        "without --cacert the test CA is not trusted"
    );

    let server = StreamClient::new(
        ds_e2e::tls::client().expect("client"),
        stack.server.base_url(),
        None,
    );
    let stored = server.read_all("/v1/stream/edge").await.expect("read");
    assert!(matches!(stored, Content::Messages(m) if m.len() == 100));
}

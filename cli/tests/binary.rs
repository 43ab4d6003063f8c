//! The `ds` binary itself, without a server: its help documents the exit codes, bad usage exits
//! 2, and an unreachable server exits 7 once `--retry-for` has passed. (With a server: the e2e
//! suite, `e2e/tests/cli.rs`. This test also makes `cargo test --workspace` build `ds`, which
//! that suite runs.)

use std::process::Command;

fn ds() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ds"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("DS_") || key.starts_with("STREAM_") {
            command.env_remove(key);
        }
    }
    command
}

#[test]
fn help_documents_the_exit_codes() {
    let output = ds().arg("--help").output().expect("run ds --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for line in ["Exit codes:", "3  not found", "7  unavailable", "Examples:"] {
        assert!(help.contains(line), "--help lacks {line:?}");
    }
}

#[test]
fn usage_errors_exit_2_and_an_unreachable_server_exits_7() {
    let output = ds().arg("frobnicate").output().expect("run ds");
    assert_eq!(output.status.code(), Some(2));
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let output = ds()
        .args(["--url", "http://127.0.0.1:1/v1/stream", "--retry-for", "0s"])
        .args(["read", "chat"])
        .output()
        .expect("run ds");
    assert_eq!(output.status.code(), Some(7));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("127.0.0.1:1"),
        "names the server: {message}"
    );
}

//! Where the repository's files are at test time: `fixtures/`, `envoy/`, the built binaries.

use std::path::{Path, PathBuf};

/// The workspace root (the directory holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    // e2e/ is one level below the root; resolved at compile time so tests run from any directory.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The fixtures directory: `DS_FIXTURES_DIR` if set (e.g. `ds-mint-token` run outside the
/// checkout), else `<workspace>/fixtures`.
pub fn dir() -> PathBuf {
    std::env::var_os("DS_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("fixtures"))
}

/// A file in the fixtures directory.
pub fn path(name: &str) -> PathBuf {
    dir().join(name)
}

/// An Envoy config template in `envoy/`.
pub fn envoy_template(name: &str) -> PathBuf {
    workspace_root().join("envoy").join(name)
}

/// A workspace binary (`ds-server`, `ds-sync`): `DS_E2E_BIN_DIR/<name>` if set, else the debug
/// (then release) build in `CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn binary(name: &str) -> Result<PathBuf, anyhow::Error> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("DS_E2E_BIN_DIR") {
        candidates.push(PathBuf::from(dir).join(name));
    } else {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        candidates.push(target.join("debug").join(name));
        candidates.push(target.join("release").join(name));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "binary {name} not found (looked at {candidates:?}); build it first: \
             cargo build -p {name} (or set DS_E2E_BIN_DIR)"
            )
        })
}

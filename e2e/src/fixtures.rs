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

/// A workspace binary (`ds-server`, `ds-sync`, `ds`): `DS_E2E_BIN_DIR/<name>` if set, else the
/// most recently built of the debug and release builds in `CARGO_TARGET_DIR` or
/// `<workspace>/target` (newest, so that a stale debug binary never shadows a fresh release build
/// or the reverse).
///
/// The e2e tests do not build the binaries themselves: `cargo test --workspace` (what `.ci/run`
/// runs) builds all three, because ds-server, ds-sync and ds-cli have integration tests of their
/// own. Running only this crate needs `cargo build -p ds-server -p ds-sync -p ds-cli` first.
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
        .filter_map(|path| {
            let modified = std::fs::metadata(path)
                .ok()
                .filter(std::fs::Metadata::is_file)?
                .modified()
                .ok()?;
            Some((modified, path))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, path)| path.clone())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "binary {name} not found (looked at {candidates:?}); build it first: \
             cargo build -p {name} (or set DS_E2E_BIN_DIR)"
            )
        })
}

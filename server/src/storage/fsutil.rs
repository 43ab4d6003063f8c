//! Creating the files a data directory starts with, so that a crash at any moment of the very
//! first start leaves a directory the next start accepts (`server/STORAGE.md`, "First start").
//!
//! A file whose content decides how the directory is read (`FORMAT`, `acid-layout.json`, the
//! webhook signing key) is written under a temporary name, synced, renamed into place and the
//! directory synced: a crash leaves either no file or the whole file, never an empty or half
//! one under the real name. A leftover temporary file is removed (or overwritten) by the next
//! start. A directory the server creates is made durable by syncing its parent.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use super::StorageError;

/// The environment variable naming a crash point (tests only).
pub const CRASH_AT_VAR: &str = "DSTEST_CRASH_AT";

/// Test hook: when the environment variable [`CRASH_AT_VAR`] names `point`, the process aborts
/// here, with no clean-up, as a `kill -9` at this moment would leave it. The points are listed
/// in `server/STORAGE.md`; `server/tests/first_start.rs` kills the first start at each one and
/// starts again. Read once per process; unset (always, outside tests), it costs one comparison.
pub fn crash_point(point: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if AT
        .get_or_init(|| std::env::var(CRASH_AT_VAR).ok())
        .as_deref()
        == Some(point)
    {
        eprintln!("{CRASH_AT_VAR}={point}: aborting here (test crash point)");
        std::process::abort();
    }
}

fn io(what: &Path) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        what: what.display().to_string(),
        source,
    }
}

/// Syncs a directory, making the entries created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Creates `dir` and any missing parents, syncing the parent of each directory it creates (a new
/// directory's entry is durable only once its parent is synced).
pub fn create_dir_synced(dir: &Path) -> Result<(), StorageError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_synced(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        // Another process (or thread) made it in the meantime.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(io(dir)(e)),
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// The temporary name `path` is written under before it is renamed into place.
pub fn temp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `data` to `path` so that a crash leaves either no `path` or all of it: written to
/// [`temp_path`], synced, renamed, the directory synced. `crash` names the test crash points
/// on the way (`<crash>-tmp-written`: the temporary file is created and holds the data, not
/// yet synced; `<crash>-renamed`: renamed, the directory not yet synced).
pub fn write_atomically(path: &Path, data: &[u8], crash: &str) -> Result<(), StorageError> {
    write_atomically_with(path, crash, |f| f.write_all(data))
}

/// [`write_atomically`], with the file's content written by `write` (for content too large to
/// build in RAM first, such as a checkpoint of a million streams).
pub fn write_atomically_with<T>(
    path: &Path,
    crash: &str,
    write: impl FnOnce(&mut File) -> std::io::Result<T>,
) -> Result<T, StorageError> {
    let tmp = temp_path(path);
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    let written = write(&mut f).map_err(io(&tmp))?;
    crash_point(&format!("{crash}-tmp-written"));
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    crash_point(&format!("{crash}-renamed"));
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => sync_dir(dir)?,
        None => sync_dir(Path::new("."))?,
    }
    Ok(written)
}

/// Removes `path` if it exists (a temporary file a crash left behind).
pub fn remove_leftover(path: &Path) -> Result<(), StorageError> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(file = %path.display(), "removed a temporary file left by an interrupted start");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_dir_synced_makes_nested_directories_and_accepts_existing_ones() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a/b/c");
        create_dir_synced(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_synced(&deep).unwrap();
        let file = root.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(
            create_dir_synced(&file).is_err(),
            "a file is not a directory"
        );
    }

    #[test]
    fn write_atomically_replaces_a_leftover_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("FORMAT");
        std::fs::write(temp_path(&path), b"half").unwrap();
        write_atomically(&path, b"whole\n", "unit").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole\n");
        assert!(!temp_path(&path).exists());
        remove_leftover(&temp_path(&path)).unwrap();
    }
}

//! The layout file: which shard count and which stream-to-shard hash a data directory was
//! created with. Both decide where a stream's rows live, so neither may change under existing
//! data; the file is checked on every start and a mismatch refuses to start.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::super::{StorageError, StreamId};

/// File name of the layout, inside the data directory.
pub(super) const LAYOUT_FILE: &str = "acid-layout.json";
const FORMAT: &str = "ds-server-acid";
/// 2: a `records` row holds a run of records (1 held one record per row). 3: a record larger
/// than a row can hold is split across consecutive rows (flags in a row's count word). 4: a row
/// may hold references into the commit log's segments instead of the records' bytes, and
/// segments are kept while rows reference them (a version 3 build would delete them after
/// replaying them).
const VERSION: u32 = 4;
/// Versions 2 and 3 are opened and the layout rewritten as version 4: their rows are valid
/// version-4 rows (none references). Rewritten before anything is written, so that an older
/// build, which refuses version 4, never opens a directory holding reference rows.
const UPGRADES_FROM: [u32; 2] = [2, 3];
/// The only hash there is so far; named so that a future one can be told apart.
const HASH: &str = "splitmix64(stream_id) & (shard_count - 1)";

pub(super) const MAX_SHARDS: u32 = 256;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Layout {
    format: String,
    version: u32,
    shard_count: u32,
    shard_hash: String,
}

/// Refuses a shard count that is not a power of two from 1 to 256.
pub(super) fn check_shard_count(shard_count: u32) -> Result<(), StorageError> {
    if shard_count == 0 || shard_count > MAX_SHARDS || !shard_count.is_power_of_two() {
        return Err(StorageError::Config(format!(
            "acid shard count {shard_count} is not a power of two from 1 to {MAX_SHARDS}"
        )));
    }
    Ok(())
}

/// The shard of a stream. Stream ids are unique per stream instance and never change, so the
/// hash of the id is stable for the stream's whole life. The splitmix64 finaliser is written out
/// here (not `std`'s hasher, whose output may change between Rust releases) because the result is
/// part of the on-disk format.
pub(super) fn shard_of(id: StreamId, shard_count: u32) -> usize {
    let mut z = id.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z & u64::from(shard_count - 1)) as usize
}

/// File name of shard `index`.
pub(super) fn shard_file(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index:03}.redb"))
}

/// Checks the layout of `dir` against `shard_count`, writing it when the directory is new.
pub(super) fn check_or_create(dir: &Path, shard_count: u32) -> Result<(), StorageError> {
    let io = |what: String| move |source| StorageError::Io { what, source };
    crate::storage::fsutil::create_dir_synced(dir)?;
    let path = dir.join(LAYOUT_FILE);
    match fs::read(&path) {
        Ok(raw) => {
            let found: Layout =
                serde_json::from_slice(&raw).map_err(|e| StorageError::Corrupt {
                    what: path.display().to_string(),
                    detail: e.to_string(),
                })?;
            let known = found.version == VERSION || UPGRADES_FROM.contains(&found.version);
            if found.format != FORMAT || !known || found.shard_hash != HASH {
                return Err(StorageError::Config(format!(
                    "{} describes format {:?} version {} with hash {:?}; this build reads {FORMAT:?} \
                     version {VERSION} with hash {HASH:?}",
                    path.display(),
                    found.format,
                    found.version,
                    found.shard_hash
                )));
            }
            if found.shard_count != shard_count {
                return Err(StorageError::Config(format!(
                    "{} was created with {} acid shards but {shard_count} are configured; the \
                     shard count of an existing data directory cannot change (configure {} or \
                     start from an empty directory)",
                    dir.display(),
                    found.shard_count,
                    found.shard_count
                )));
            }
            if found.version != VERSION {
                write_atomically(dir, &path, shard_count)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // No layout: the directory must be new. Shard files without a layout would have an
            // unknown shard count, and anything else belongs to another mode or program.
            let tmp_name = format!("{LAYOUT_FILE}.tmp");
            let mut entries =
                fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))?;
            let foreign = entries.find_map(|e| match e {
                Ok(e) if e.file_name().to_str() == Some(tmp_name.as_str()) => None,
                Ok(e) => Some(e.file_name().to_string_lossy().into_owned()),
                Err(e) => Some(format!("(unreadable entry: {e})")),
            });
            if let Some(name) = foreign {
                return Err(StorageError::Config(format!(
                    "{} is not empty (it holds {name:?}) and has no {LAYOUT_FILE}: it is not \
                     acid-mode storage; use an empty directory",
                    dir.display()
                )));
            }
            write_atomically(dir, &path, shard_count)
        }
        Err(e) => Err(StorageError::Io {
            what: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

/// Writes the layout to a temporary file, syncs it, renames it into place and syncs the
/// directory, so a crash leaves either no layout or a complete one.
fn write_atomically(dir: &Path, path: &Path, shard_count: u32) -> Result<(), StorageError> {
    let layout = Layout {
        format: FORMAT.into(),
        version: VERSION,
        shard_count,
        shard_hash: HASH.into(),
    };
    let mut body = serde_json::to_vec_pretty(&layout).unwrap_or_default();
    body.push(b'\n');
    let tmp = dir.join(format!("{LAYOUT_FILE}.tmp"));
    let io = |what: &str| {
        let what = format!("{what} {}", tmp.display());
        move |source| StorageError::Io { what, source }
    };
    let mut file = fs::File::create(&tmp).map_err(io("creating"))?;
    file.write_all(&body).map_err(io("writing"))?;
    crate::storage::fsutil::crash_point("acid-layout-tmp-written");
    file.sync_all().map_err(io("syncing"))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io("renaming"))?;
    crate::storage::fsutil::crash_point("acid-layout-renamed");
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StorageError::Io {
            what: format!("syncing directory {}", dir.display()),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_hash_is_stable_and_spreads() {
        // These values are part of the on-disk format: changing them misplaces every stream.
        assert_eq!(shard_of(1, 16), shard_of(1, 16));
        assert_eq!(shard_of(12345, 1), 0);
        let pinned: Vec<usize> = (1..=8).map(|id| shard_of(id, 256)).collect();
        assert_eq!(pinned, PINNED_SHARDS_OF_1_TO_8);
        let mut seen = [0u32; 16];
        for id in 0..16_000u64 {
            seen[shard_of(id, 16)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    const PINNED_SHARDS_OF_1_TO_8: [usize; 8] = [193, 206, 237, 202, 90, 0, 215, 54];

    #[test]
    fn bad_shard_counts_are_refused() {
        for n in [0, 3, 6, 100, 257, 512] {
            assert!(matches!(check_shard_count(n), Err(StorageError::Config(_))));
        }
        for n in [1, 2, 16, 256] {
            check_shard_count(n).unwrap();
        }
    }

    #[test]
    fn version_2_and_3_directories_are_upgraded_in_place() {
        for old in UPGRADES_FROM {
            let dir = tempfile::tempdir().unwrap();
            check_or_create(dir.path(), 4).unwrap();
            let path = dir.path().join(LAYOUT_FILE);
            let older = fs::read_to_string(&path).unwrap().replace(
                &format!("\"version\": {VERSION}"),
                &format!("\"version\": {old}"),
            );
            fs::write(&path, older).unwrap();
            check_or_create(dir.path(), 4).unwrap();
            let found: Layout = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
            assert_eq!((found.version, found.shard_count), (VERSION, 4));
            // The shard count is still checked first.
            fs::write(
                &path,
                fs::read_to_string(&path).unwrap().replace(
                    &format!("\"version\": {VERSION}"),
                    &format!("\"version\": {old}"),
                ),
            )
            .unwrap();
            assert!(matches!(
                check_or_create(dir.path(), 8),
                Err(StorageError::Config(_))
            ));
            let found: Layout = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
            assert_eq!(found.version, old);
        }
    }

    #[test]
    fn a_directory_of_an_older_format_version_is_refused_naming_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        check_or_create(dir.path(), 4).unwrap();
        check_or_create(dir.path(), 4).unwrap();
        let path = dir.path().join(LAYOUT_FILE);
        let old = fs::read_to_string(&path)
            .unwrap()
            .replace(&format!("\"version\": {VERSION}"), "\"version\": 1");
        fs::write(&path, old).unwrap();
        match check_or_create(dir.path(), 4) {
            Err(StorageError::Config(msg)) => {
                assert!(msg.contains("version 1"), "{msg}");
                assert!(msg.contains(&format!("version {VERSION}")), "{msg}");
            }
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }
}

//! The record log of the durable modes: small keyed records beside the streams (subscription
//! state), in one append-only file `DATA_DIR/records.log`, written by one thread with group
//! commit. One module serves `file-fast`, `file-durable` and `acid`.
//!
//! ```text
//! file   := header frame*
//! header := "DSREC\0\0\0" (8 bytes) | version u32 LE (2) | reserved u32 LE (0)
//! frame  := len u32 LE | crc32c u32 LE (of mark and payload) | mark u64 LE | payload[len]
//! payload:= count u32 LE | write*
//! write  := key_len u32 LE | key | present u8 (1: set, 0: delete) | [value_len u32 LE | value]
//! ```
//!
//! A frame is one `write_records` batch: all of it or none of it survives a crash. Why a file of
//! its own rather than a frame kind of the stream log: the stream log frees a segment once every
//! stream with frames in it is removed, and record frames (a newer version of a key supersedes
//! an older one anywhere in the log) would pin segments forever or need their own rewriting;
//! here the whole file is rewritten (compacted to the live records) at start-up and whenever it
//! grows past twice the live size, which keeps it bounded.
//!
//! Acknowledged means what the mode promises: `fdatasync`ed (`file-durable`, `acid`), or written
//! to the OS and synced in the background (`file-fast`). Each frame carries a **durable mark**:
//! the length of the file the writer knew to be synced when it wrote the frame (a frame never
//! vouches for itself). Recovery stops at the first frame that is cut short or fails its
//! checksum; if no decodable frame after it carries a mark past the damage, the damage lies
//! where nothing was synced yet (a power loss can keep any subset of unsynced pages, so intact
//! frames may follow it): a torn write, dropped with everything after it. If a later mark covers
//! it, synced data is damaged: corruption, and start-up stops naming the file and position.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{Commit, Record, RecordWrite, StorageError};

pub const FILE_NAME: &str = "records.log";
const MAGIC: &[u8; 8] = b"DSREC\0\0\0";
/// 2: frames carry a durable mark (1, never released, had none).
const VERSION: u32 = 2;
const HEADER_LEN: u64 = 16;
/// Largest frame accepted when decoding; anything larger is corruption.
const MAX_FRAME: u32 = 1 << 30;
/// A frame's length, checksum and durable mark.
const FRAME_HEADER_LEN: usize = 16;
/// Compaction threshold: the file is rewritten once it exceeds twice the live bytes plus this.
const COMPACT_SLACK: u64 = 1 << 20;

type Reply = tokio::sync::oneshot::Sender<Result<(), StorageError>>;
/// A submitted batch: its encoded payload, its writes (for the live map) and who waits.
type Submission = (Vec<u8>, Vec<RecordWrite>, Reply);
/// The live records, key to value.
type Live = BTreeMap<Vec<u8>, Vec<u8>>;

/// The open record log.
pub struct RecordLog {
    tx: parking_lot::Mutex<Option<mpsc::Sender<Submission>>>,
    recovered: parking_lot::Mutex<Option<Vec<Record>>>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        what: path.display().to_string(),
        source,
    }
}

fn encode_payload(batch: &[RecordWrite]) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&(batch.len() as u32).to_le_bytes());
    for w in batch {
        payload.extend_from_slice(&(w.key.len() as u32).to_le_bytes());
        payload.extend_from_slice(&w.key);
        match &w.value {
            Some(v) => {
                payload.push(1);
                payload.extend_from_slice(&(v.len() as u32).to_le_bytes());
                payload.extend_from_slice(v);
            }
            None => payload.push(0),
        }
    }
    payload
}

/// Appends one frame of `payload` to `out`, vouching that the first `mark` bytes of the file
/// are synced.
fn push_frame(out: &mut Vec<u8>, payload: &[u8], mark: u64) {
    let mark = mark.to_le_bytes();
    let mut crc = crc32c::crc32c(&mark);
    crc = crc32c::crc32c_append(crc, payload);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&mark);
    out.extend_from_slice(payload);
}

/// The frame at the start of `rest`, if it is whole and its checksum holds: its durable mark,
/// its payload and its length with the header.
fn frame_at(rest: &[u8]) -> Option<(u64, &[u8], usize)> {
    let header = rest.get(..FRAME_HEADER_LEN)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if len > MAX_FRAME {
        return None;
    }
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let end = FRAME_HEADER_LEN.checked_add(len as usize)?;
    let body = rest.get(8..end)?;
    if crc32c::crc32c(body) != crc {
        return None;
    }
    let mark = u64::from_le_bytes([
        body[0], body[1], body[2], body[3], body[4], body[5], body[6], body[7],
    ]);
    Some((mark, &body[8..], end))
}

/// Whether any decodable frame after the damage at `damage` (searched byte by byte, since the
/// frame boundaries after damage are unknown) vouches for it: a mark past `damage`, and not
/// past the frame's own position.
fn later_mark_covers(bytes: &[u8], damage: usize) -> bool {
    (damage + 1..bytes.len().saturating_sub(FRAME_HEADER_LEN - 1)).any(|at| {
        frame_at(&bytes[at..]).is_some_and(|(mark, _, _)| mark > damage as u64 && mark <= at as u64)
    })
}

fn decode_payload(p: &[u8]) -> Option<Vec<RecordWrite>> {
    let mut pos = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = p.get(pos..pos.checked_add(n)?)?;
        pos += n;
        Some(s)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let count = u32_at(take(4)?);
    let mut out = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let klen = u32_at(take(4)?);
        let key = take(klen)?.to_vec();
        let value = match take(1)?[0] {
            1 => {
                let vlen = u32_at(take(4)?);
                Some(take(vlen)?.to_vec())
            }
            0 => None,
            _ => return None,
        };
        out.push(RecordWrite { key, value });
    }
    (pos == p.len()).then_some(out)
}

fn apply(live: &mut Live, live_bytes: &mut u64, batch: Vec<RecordWrite>) {
    for w in batch {
        if let Some(old) = live.remove(&w.key) {
            *live_bytes -= (w.key.len() + old.len()) as u64;
        }
        if let Some(v) = w.value {
            *live_bytes += (w.key.len() + v.len()) as u64;
            live.insert(w.key, v);
        }
    }
}

/// Reads the log: the live records and the length of its valid prefix.
fn replay(path: &Path) -> Result<(Live, u64), StorageError> {
    let mut live = BTreeMap::new();
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(io(path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((live, 0)),
        Err(e) => return Err(io(path)(e)),
    }
    if bytes.is_empty() {
        return Ok((live, 0));
    }
    let corrupt = |detail: String| StorageError::Corrupt {
        what: path.display().to_string(),
        detail,
    };
    if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
        return Err(corrupt("not a record log (bad header)".into()));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != VERSION {
        return Err(corrupt(format!(
            "record log version {version}; this build reads {VERSION}"
        )));
    }
    let mut pos = HEADER_LEN as usize;
    let mut live_bytes = 0u64;
    while pos < bytes.len() {
        let Some((_, payload, len)) = frame_at(&bytes[pos..]) else {
            if later_mark_covers(&bytes, pos) {
                return Err(corrupt(format!(
                    "a damaged frame at byte {pos} that a later frame says was synced"
                )));
            }
            tracing::warn!(
                file = %path.display(),
                at = pos,
                dropped_bytes = bytes.len() - pos,
                "record log: dropping a torn write (never synced) and everything after it"
            );
            break;
        };
        let batch = decode_payload(payload)
            .ok_or_else(|| corrupt(format!("a frame at byte {pos} does not parse")))?;
        apply(&mut live, &mut live_bytes, batch);
        pos += len;
    }
    Ok((live, pos as u64))
}

/// Writes `live` to a new file beside `path` and renames it over `path`, synced.
fn rewrite(path: &Path, live: &Live) -> Result<(File, u64), StorageError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let mut buf = header.to_vec();
    // One frame per record keeps every frame small whatever the number of records.
    // Mark 0: the file is synced whole, then renamed into place, before anything relies on it.
    for (k, v) in live {
        let payload = encode_payload(&[RecordWrite {
            key: k.clone(),
            value: Some(v.clone()),
        }]);
        push_frame(&mut buf, &payload, 0);
    }
    f.write_all(&buf).map_err(io(&tmp))?;
    super::fsutil::crash_point("records-tmp-written");
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    super::fsutil::crash_point("records-renamed");
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    let f = File::options().append(true).open(path).map_err(io(path))?;
    Ok((f, buf.len() as u64))
}

struct Writer {
    path: PathBuf,
    file: File,
    len: u64,
    live: Live,
    live_bytes: u64,
    /// The file's length when it was last known synced: the durable mark of every frame
    /// written now. It never moves after a failed sync.
    synced: u64,
    durable: bool,
    fast_sync_interval: Duration,
    last_sync: Instant,
    dirty: bool,
}

impl Writer {
    fn write(&mut self, frames: &[u8]) -> Result<(), StorageError> {
        self.file.write_all(frames).map_err(io(&self.path))?;
        self.len += frames.len() as u64;
        if self.durable {
            self.file.sync_data().map_err(io(&self.path))?;
            self.synced = self.len;
        } else {
            self.dirty = true;
        }
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), StorageError> {
        if self.len > 2 * self.live_bytes + COMPACT_SLACK {
            let (file, len) = rewrite(&self.path, &self.live)?;
            self.file = file;
            self.len = len;
            self.synced = len;
            self.dirty = false;
        }
        Ok(())
    }

    fn background_sync(&mut self) {
        if self.dirty && self.last_sync.elapsed() >= self.fast_sync_interval {
            match self.file.sync_data() {
                Ok(()) => self.synced = self.len,
                // The mark stays where it was: nothing written since is vouched for.
                Err(e) => tracing::error!(error = %e, "record log: background sync failed"),
            }
            self.dirty = false;
            self.last_sync = Instant::now();
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Submission>) {
        loop {
            let first = match rx.recv_timeout(self.fast_sync_interval) {
                Ok(op) => op,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.background_sync();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            // Group commit: everything queued meanwhile goes in the same write and sync.
            let mut ops = vec![first];
            while let Ok(op) = rx.try_recv() {
                ops.push(op);
            }
            let mut frames = Vec::new();
            for (payload, _, _) in &ops {
                push_frame(&mut frames, payload, self.synced);
            }
            let result = self.write(&frames);
            let ok = result.is_ok();
            for (_, batch, reply) in ops {
                if ok {
                    apply(&mut self.live, &mut self.live_bytes, batch);
                }
                let _ = reply.send(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(StorageError::Io {
                        what: self.path.display().to_string(),
                        source: std::io::Error::other(e.to_string()),
                    }),
                });
            }
            if !ok {
                // The file may hold part of the frames: nothing more is written until a restart
                // (whose recovery drops the torn frame).
                tracing::error!("record log write failed; refusing further record writes");
                break;
            }
            if let Err(e) = self.maybe_compact() {
                tracing::error!(error = %e, "record log compaction failed");
            }
            if !self.durable {
                self.background_sync();
            }
        }
        if self.dirty {
            let _ = self.file.sync_data();
        }
    }
}

impl RecordLog {
    /// Opens (creating if needed) `dir/records.log`, compacting it to its live records.
    pub fn open(
        dir: &Path,
        durable: bool,
        fast_sync_interval: Duration,
    ) -> Result<RecordLog, StorageError> {
        let path = dir.join(FILE_NAME);
        // The valid prefix's length is not needed: the file is rewritten from the live records.
        let (live, _valid_len) = replay(&path)?;
        let live_bytes = live.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
        let (mut file, len) = rewrite(&path, &live)?;
        file.seek(SeekFrom::End(0)).map_err(io(&path))?;
        let recovered = live.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let writer = Writer {
            path,
            file,
            len,
            live,
            live_bytes,
            // `rewrite` synced the whole file.
            synced: len,
            durable,
            fast_sync_interval,
            last_sync: Instant::now(),
            dirty: false,
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ds-records".into())
            .spawn(move || writer.run(rx))
            .map_err(io(dir))?;
        Ok(RecordLog {
            tx: parking_lot::Mutex::new(Some(tx)),
            recovered: parking_lot::Mutex::new(Some(recovered)),
            thread: parking_lot::Mutex::new(Some(thread)),
        })
    }

    /// Submits a batch now (so batches land in call order); the commit resolves once it is
    /// acknowledged by the mode's promise.
    pub fn write(&self, batch: Vec<RecordWrite>) -> Commit {
        if batch.is_empty() {
            return super::done();
        }
        let (reply, done) = tokio::sync::oneshot::channel();
        let payload = encode_payload(&batch);
        let sent = self
            .tx
            .lock()
            .as_ref()
            .map(|tx| tx.send((payload, batch, reply)).is_ok())
            .unwrap_or(false);
        Box::pin(async move {
            if !sent {
                return Err(StorageError::ShuttingDown);
            }
            done.await.unwrap_or(Err(StorageError::ShuttingDown))
        })
    }

    /// The records found at open (once).
    pub fn take_recovered(&self) -> Vec<Record> {
        self.recovered.lock().take().unwrap_or_default()
    }
}

impl Drop for RecordLog {
    fn drop(&mut self) {
        self.tx.lock().take();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(k: &str, v: &str) -> RecordWrite {
        RecordWrite {
            key: k.as_bytes().to_vec(),
            value: Some(v.as_bytes().to_vec()),
        }
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn records_survive_a_reopen_with_the_newest_value_and_deletes_applied() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let log = RecordLog::open(dir.path(), true, Duration::from_secs(1)).expect("open");
            block_on(log.write(vec![set("a", "1"), set("b", "1")])).expect("write");
            block_on(log.write(vec![set("a", "2")])).expect("write");
            block_on(log.write(vec![RecordWrite {
                key: b"b".to_vec(),
                value: None,
            }]))
            .expect("write");
        }
        let log = RecordLog::open(dir.path(), true, Duration::from_secs(1)).expect("reopen");
        assert_eq!(log.take_recovered(), vec![(b"a".to_vec(), b"2".to_vec())]);
    }

    #[test]
    fn a_torn_last_frame_is_dropped_and_a_bad_frame_before_data_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(FILE_NAME);
        {
            let log = RecordLog::open(dir.path(), true, Duration::from_secs(1)).expect("open");
            block_on(log.write(vec![set("a", "1")])).expect("write");
            block_on(log.write(vec![set("b", "2")])).expect("write");
        }
        let whole = std::fs::read(&path).expect("read");
        // Cut inside the last frame: it goes, the first stays.
        std::fs::write(&path, &whole[..whole.len() - 3]).expect("write");
        let log = RecordLog::open(dir.path(), true, Duration::from_secs(1)).expect("torn tail");
        assert_eq!(log.take_recovered(), vec![(b"a".to_vec(), b"1".to_vec())]);
        drop(log);
        // Flip a byte of the first frame of a two-frame file: corruption, refused.
        let mut bad = whole.clone();
        bad[HEADER_LEN as usize + 10] ^= 0xff;
        std::fs::write(&path, &bad).expect("write");
        assert!(matches!(
            RecordLog::open(dir.path(), true, Duration::from_secs(1)),
            Err(StorageError::Corrupt { .. })
        ));
    }

    fn recovered_keys(dir: &Path, durable: bool) -> Result<Vec<String>, StorageError> {
        let log = RecordLog::open(dir, durable, Duration::from_secs(3600))?;
        Ok(log
            .take_recovered()
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
            .collect())
    }

    /// A power loss during a write can keep any subset of its pages (zeros where a page did
    /// not land, the file cut anywhere), and a group write holds several frames: whatever
    /// survived of the last, unsynced write, every acknowledged record reopens and nothing
    /// else is refused.
    #[test]
    fn a_power_loss_during_the_last_write_drops_it_whichever_pages_survived() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(FILE_NAME);
        {
            let log = RecordLog::open(dir.path(), true, Duration::from_secs(1)).expect("open");
            for k in ["a", "b", "c"] {
                block_on(log.write(vec![set(k, &k.repeat(100))])).expect("write");
            }
        }
        let synced = std::fs::read(&path).expect("read");
        // The unsynced write: two frames (two batches of one group commit), marked with the
        // length synced before it, as the writer marks them.
        let mut image = synced.clone();
        let start = image.len();
        for k in ["d", "e"] {
            push_frame(
                &mut image,
                &encode_payload(&[set(k, &k.repeat(3000))]),
                start as u64,
            );
        }
        let end = image.len();
        let mut damaged: Vec<Vec<u8>> = Vec::new();
        for cut in [start + 1, start + 15, start + 16, start + 100, end - 1] {
            damaged.push(image[..cut].to_vec());
        }
        for (from, to) in [
            (start, start + 16),        // the first frame's header never landed
            (start + 16, start + 2000), // a page of the first frame's payload
            (start + 3030, end),        // the second frame
        ] {
            let mut d = image.clone();
            d[from..to].fill(0);
            damaged.push(d);
        }
        for (i, d) in damaged.iter().enumerate() {
            std::fs::write(&path, d).expect("write image");
            let keys =
                recovered_keys(dir.path(), true).unwrap_or_else(|e| panic!("image {i}: {e}"));
            assert!(
                keys.starts_with(&["a".to_owned(), "b".to_owned(), "c".to_owned()]),
                "image {i}: {keys:?}"
            );
        }
        // The first frame of the group gone, the second intact after it: dropped with it (no
        // later mark vouches for the damage).
        let mut d = image.clone();
        d[start + 16..start + 2000].fill(0);
        std::fs::write(&path, &d).expect("write image");
        assert_eq!(
            recovered_keys(dir.path(), true).expect("reopen"),
            ["a", "b", "c"]
        );
    }

    /// Damage that a later frame's durable mark covers was synced before: corruption, refused
    /// with the position, whatever follows.
    #[test]
    fn damage_before_a_later_durable_mark_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(FILE_NAME);
        {
            let log = RecordLog::open(dir.path(), true, Duration::from_secs(1)).expect("open");
            for k in ["a", "b", "c"] {
                block_on(log.write(vec![set(k, "v")])).expect("write");
            }
        }
        let whole = std::fs::read(&path).expect("read");
        let second =
            HEADER_LEN as usize + FRAME_HEADER_LEN + encode_payload(&[set("a", "v")]).len();
        let mut bad = whole.clone();
        bad[second + FRAME_HEADER_LEN + 2] ^= 0x01;
        std::fs::write(&path, &bad).expect("write");
        match RecordLog::open(dir.path(), true, Duration::from_secs(1)) {
            Err(StorageError::Corrupt { detail, .. }) => {
                assert!(detail.contains(&format!("byte {second}")), "{detail}");
            }
            Err(e) => panic!("expected corruption, got {e}"),
            Ok(_) => panic!("damage to synced data was accepted"),
        }
    }

    /// `file-fast` acknowledges before the background sync: a power loss may take any of the
    /// writes since the last sync, and recovery keeps what precedes the first damage.
    #[test]
    fn file_fast_drops_everything_from_the_first_unsynced_damage() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(FILE_NAME);
        {
            let log = RecordLog::open(dir.path(), false, Duration::from_secs(3600)).expect("open");
            for k in ["a", "b", "c"] {
                block_on(log.write(vec![set(k, "v")])).expect("write");
            }
            // Dropping the log syncs it; the image below is what a power loss could leave.
        }
        let whole = std::fs::read(&path).expect("read");
        let second =
            HEADER_LEN as usize + FRAME_HEADER_LEN + encode_payload(&[set("a", "v")]).len();
        let mut lost = whole.clone();
        lost[second..second + FRAME_HEADER_LEN].fill(0);
        std::fs::write(&path, &lost).expect("write");
        assert_eq!(recovered_keys(dir.path(), false).expect("reopen"), ["a"]);
    }

    #[test]
    fn the_file_stays_bounded_under_endless_rewrites_of_one_key() {
        let dir = tempfile::tempdir().expect("dir");
        let log = RecordLog::open(dir.path(), false, Duration::from_secs(1)).expect("open");
        let value = "x".repeat(10_000);
        for _ in 0..1_000 {
            block_on(log.write(vec![set("k", &value)])).expect("write");
        }
        let len = std::fs::metadata(dir.path().join(FILE_NAME))
            .expect("meta")
            .len();
        assert!(
            len < 2 * 10_010 + COMPACT_SLACK + 20_000,
            "record log is {len} bytes"
        );
    }
}

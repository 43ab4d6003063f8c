//! The record log of the durable modes: small keyed records beside the streams (subscription
//! state), in one append-only file `DATA_DIR/records.log`, written by one thread with group
//! commit. One module serves `file-fast`, `file-durable` and `acid`.
//!
//! ```text
//! file   := header frame*
//! header := "DSREC\0\0\0" (8 bytes) | version u32 LE (1) | reserved u32 LE (0)
//! frame  := len u32 LE | crc32c u32 LE (of payload) | payload[len]
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
//! to the OS and synced in the background (`file-fast`). Recovery truncates a torn last frame
//! and refuses a bad frame that is followed by more data.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{Commit, Record, RecordWrite, StorageError};

pub const FILE_NAME: &str = "records.log";
const MAGIC: &[u8; 8] = b"DSREC\0\0\0";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 16;
/// Largest frame accepted when decoding; anything larger is corruption.
const MAX_FRAME: u32 = 1 << 30;
/// Compaction threshold: the file is rewritten once it exceeds twice the live bytes plus this.
const COMPACT_SLACK: u64 = 1 << 20;

type Reply = tokio::sync::oneshot::Sender<Result<(), StorageError>>;
/// A submitted batch: its encoded frame, its writes (for the live map) and who waits.
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

fn encode(batch: &[RecordWrite]) -> Vec<u8> {
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
    let mut frame = Vec::with_capacity(payload.len() + 8);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    frame
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
        let rest = &bytes[pos..];
        let torn = |why: &str| -> Result<(), StorageError> {
            // A bad frame is a torn tail only if nothing but zeros follows its declared end.
            let declared = if rest.len() >= 4 {
                u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize + 8
            } else {
                rest.len()
            };
            if rest.iter().skip(declared).any(|b| *b != 0) {
                return Err(corrupt(format!(
                    "{why} at byte {pos}, followed by more data"
                )));
            }
            tracing::warn!(file = %path.display(), at = pos, "record log: dropping a torn last frame");
            Ok(())
        };
        if rest.len() < 8 {
            torn("a truncated frame header")?;
            break;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == 0 && crc == 0 {
            torn("zeros")?;
            break;
        }
        if len > MAX_FRAME || rest.len() < 8 + len as usize {
            torn("a truncated frame")?;
            break;
        }
        let payload = &rest[8..8 + len as usize];
        if crc32c::crc32c(payload) != crc {
            torn("a checksum mismatch")?;
            break;
        }
        let batch = decode_payload(payload)
            .ok_or_else(|| corrupt(format!("a frame at byte {pos} does not parse")))?;
        apply(&mut live, &mut live_bytes, batch);
        pos += 8 + len as usize;
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
    for (k, v) in live {
        buf.extend_from_slice(&encode(&[RecordWrite {
            key: k.clone(),
            value: Some(v.clone()),
        }]));
    }
    f.write_all(&buf).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
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
            self.dirty = false;
        }
        Ok(())
    }

    fn background_sync(&mut self) {
        if self.dirty && self.last_sync.elapsed() >= self.fast_sync_interval {
            if let Err(e) = self.file.sync_data() {
                tracing::error!(error = %e, "record log: background sync failed");
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
            for (frame, _, _) in &ops {
                frames.extend_from_slice(frame);
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
        let frame = encode(&batch);
        let sent = self
            .tx
            .lock()
            .as_ref()
            .map(|tx| tx.send((frame, batch, reply)).is_ok())
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

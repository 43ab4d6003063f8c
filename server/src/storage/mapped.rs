//! Segment files open for reads, and reads that map a segment's pages instead of copying them.
//!
//! A catch-up read copied every byte twice on its way out: `pread` from the page cache into a
//! buffer of ours, then `writev` from that buffer into the socket. A mapped read hands the
//! socket the page cache's own pages (`Bytes` over the mapping), so only the socket's copy is
//! left: about a third less server CPU per byte read (STORAGE.md, *Mapped reads*). A segment is mapped once, for
//! as long as it is open for reads, at least as long as a full segment, so the active segment's
//! new frames are reached without mapping again; reads never touch a page past what the log
//! has written.
//!
//! Why this is sound (the one `unsafe` of the server): the bytes a read hands out are written
//! log. A segment only grows while the server runs (recovery truncates a torn tail before
//! anything is read; the writer extends files ahead with `set_len` and writes each byte once;
//! acid trims a full commit log segment's zeros ahead of its records, never a record),
//! so no byte under a slice changes while the slice lives, and a deleted segment's pages stay
//! valid until the last slice of them is dropped. No slice ever spans a byte that has not been
//! written (the mapping as a whole is never viewed as a slice). What mapping gives up: an I/O
//! error while the kernel reads a mapped page in ends the process (`SIGBUS`) where `pread`
//! returns an error; `DS_STORAGE__MAP_READS=false` keeps every read a copy. Nothing but the
//! server may write the data directory (STORAGE.md).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

/// A segment file open for reads, and its mapping once a read made one.
pub struct Segment {
    file: File,
    map: Mutex<Option<Arc<Mapping>>>,
}

/// A read-only shared mapping of a segment from its first byte.
struct Mapping {
    map: memmap2::Mmap,
    /// Bytes of the file known to exist (it only grows): reads up to here need no `fstat`.
    known: AtomicU64,
}

/// `len` bytes of a mapping from `off`: the body of a mapped read's `Bytes`.
struct View {
    mapping: Arc<Mapping>,
    off: usize,
    len: usize,
}

impl AsRef<[u8]> for View {
    #[allow(unsafe_code)]
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `Segment::mapped` made this view only for bytes inside the mapping and inside
        // the file, which are written log and never written again (module docs); the mapping
        // lives as long as `self.mapping`.
        unsafe { std::slice::from_raw_parts(self.mapping.map.as_ptr().add(self.off), self.len) }
    }
}

impl Segment {
    pub fn new(file: File) -> Self {
        Segment {
            file,
            map: Mutex::new(None),
        }
    }

    /// Copies `len` bytes at `off` into `buf` (which holds exactly `len` bytes).
    pub fn read_into(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    /// `len` bytes at `off`, as the page cache's pages: the segment is mapped at the first such
    /// read (at least `min_len` bytes long) and again if it has grown past its mapping.
    pub fn mapped(&self, off: u64, len: usize, min_len: u64) -> std::io::Result<Bytes> {
        let end = off
            .checked_add(len as u64)
            .ok_or_else(|| past_end(off, len))?;
        let mapping = {
            let mut map = self.map.lock();
            match map.as_ref() {
                Some(m) if end <= m.map.len() as u64 => m.clone(),
                _ => {
                    let size = self.file.metadata()?.len();
                    let map_len = usize::try_from(size.max(min_len).max(end))
                        .map_err(|_| past_end(off, len))?;
                    #[allow(unsafe_code)]
                    // SAFETY: a shared read-only mapping of a file only the server writes; the
                    // bytes are viewed only through `View`s (module docs).
                    let mapped =
                        unsafe { memmap2::MmapOptions::new().len(map_len).map(&self.file)? };
                    let m = Arc::new(Mapping {
                        map: mapped,
                        known: AtomicU64::new(size),
                    });
                    *map = Some(m.clone());
                    m
                }
            }
        };
        // A page past the end of the file is not to be touched (it would raise SIGBUS).
        if end > mapping.known.load(Ordering::Acquire) {
            let size = self.file.metadata()?.len();
            mapping.known.fetch_max(size, Ordering::AcqRel);
            if end > size {
                return Err(past_end(off, len));
            }
        }
        let (off, len) = (off as usize, len);
        Ok(Bytes::from_owner(View { mapping, off, len }))
    }
}

fn past_end(off: u64, len: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("a read of {len} bytes at {off} runs past the end of the segment"),
    )
}

/// A small bounded map of segments open for reads: the least recently used one is closed (and
/// unmapped once its last read is done) when a new one is opened past the bound.
pub struct Open {
    open: std::collections::HashMap<u64, (Arc<Segment>, u64)>,
    clock: u64,
    max: usize,
}

impl Open {
    pub fn new(max: usize) -> Self {
        Open {
            open: std::collections::HashMap::new(),
            clock: 0,
            max,
        }
    }

    pub fn get(&mut self, seg: u64) -> Option<Arc<Segment>> {
        self.clock += 1;
        let clock = self.clock;
        self.open.get_mut(&seg).map(|(f, used)| {
            *used = clock;
            f.clone()
        })
    }

    pub fn insert(&mut self, seg: u64, file: Arc<Segment>) {
        if self.open.len() >= self.max
            && let Some(oldest) = self
                .open
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
        {
            self.open.remove(&oldest);
        }
        self.clock += 1;
        self.open.insert(seg, (file, self.clock));
    }

    pub fn remove(&mut self, seg: u64) {
        self.open.remove(&seg);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_mapped_read_sees_what_was_written_also_after_the_file_grew_and_was_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let mut w = File::create(&path).unwrap();
        let first: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        w.write_all(&first).unwrap();
        let seg = Segment::new(File::open(&path).unwrap());

        // Mapped shorter than the file will grow: the second read needs a new mapping.
        let a = seg.mapped(10, 200_000, 0).unwrap();
        assert_eq!(&a[..], &first[10..200_010]);
        let second: Vec<u8> = (0..500_000u32).map(|i| (i % 13) as u8).collect();
        w.write_all(&second).unwrap();
        let b = seg.mapped(290_000, 20_000, 0).unwrap();
        let mut want = first[290_000..].to_vec();
        want.extend_from_slice(&second[..10_000]);
        assert_eq!(&b[..], &want[..]);

        // Mapped longer than the file: bytes written later are reached without a new mapping,
        // a read past the end is refused instead of touching a page past it.
        let seg = Segment::new(File::open(&path).unwrap());
        let c = seg.mapped(0, 1000, 4 << 20).unwrap();
        assert_eq!(&c[..], &first[..1000]);
        let err = seg.mapped(700_000, 200_000, 4 << 20).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        w.write_all(&vec![7u8; 100_000]).unwrap();
        let d = seg.mapped(700_000, 200_000, 4 << 20).unwrap();
        assert_eq!(&d[..100_000], &second[400_000..]);
        assert!(d[100_000..].iter().all(|&x| x == 7));

        // Slices outlive the segment's closing and the file's deletion.
        drop(seg);
        drop(w);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&a[..], &first[10..200_010]);
        assert_eq!(&c[..], &first[..1000]);
        assert!(d[100_000..].iter().all(|&x| x == 7));
    }

    #[test]
    fn the_least_recently_used_segment_is_closed_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let open_seg = |n: u64| {
            let path = dir.path().join(n.to_string());
            std::fs::write(&path, b"x").unwrap();
            Arc::new(Segment::new(File::open(&path).unwrap()))
        };
        let mut open = Open::new(2);
        open.insert(1, open_seg(1));
        open.insert(2, open_seg(2));
        assert!(open.get(1).is_some());
        open.insert(3, open_seg(3));
        assert!(open.get(2).is_none(), "2 was the least recently used");
        assert!(open.get(1).is_some() && open.get(3).is_some());
        open.remove(1);
        assert_eq!(open.len(), 1);
    }
}

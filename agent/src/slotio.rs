//! Reading and writing slots on the disk device.
//!
//! The writer takes the new image as a stream, in order, and writes only the 4 KiB blocks
//! that differ from what the slot already holds (flash wear, and the reason an interrupted
//! sync costs little when rerun). Reads for verification bypass the page cache so the
//! digest is of what the device really holds.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use atom_dist::Digest;
use memmap2::{Mmap, MmapOptions};

const BLOCK: usize = 4096;
const CHUNK: usize = 1 << 20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Bytes of image produced.
    pub total: u64,
    /// Bytes actually written to the device.
    pub written: u64,
    /// Bytes already correct on the device, not rewritten.
    pub skipped: u64,
    /// Bytes below a checkpoint of an earlier run: neither read nor written again.
    pub resumed: u64,
}

/// Progress is made durable and recorded this often, so a rerun skips what is done.
const CHECKPOINT_EVERY: u64 = 16 << 20;

/// Where an interrupted earlier run got to, and how to record progress for the next one.
pub struct Resume<'a> {
    pub durable: u64,
    pub save: &'a dyn Fn(u64) -> io::Result<()>,
}

pub struct SlotWriter<'a> {
    file: &'a File,
    offset: u64,
    limit: u64,
    pos: u64,
    buf: Vec<u8>,
    existing: Vec<u8>,
    stats: WriteStats,
    cancel: &'a AtomicBool,
    progress: &'a dyn Fn(WriteStats),
    resume: Option<Resume<'a>>,
    saved: u64,
}

impl<'a> SlotWriter<'a> {
    /// Writes at `offset` of `file`, never past `limit` bytes.
    pub fn new(
        file: &'a File,
        offset: u64,
        limit: u64,
        cancel: &'a AtomicBool,
        progress: &'a dyn Fn(WriteStats),
    ) -> Self {
        SlotWriter {
            file,
            offset,
            limit,
            pos: 0,
            buf: Vec::with_capacity(CHUNK),
            existing: vec![0u8; CHUNK],
            stats: WriteStats::default(),
            cancel,
            progress,
            resume: None,
            saved: 0,
        }
    }

    /// Skips what a checkpoint says is done and records new checkpoints as it goes.
    pub fn with_resume(mut self, resume: Resume<'a>) -> Self {
        self.saved = resume.durable;
        self.resume = Some(resume);
        self
    }

    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.cancel.load(Ordering::Relaxed) {
            // Not ErrorKind::Interrupted: write_all and io::copy would retry that forever.
            return Err(cancelled());
        }
        let len = self.buf.len();
        if self.pos + len as u64 > self.limit {
            return Err(io::Error::other(format!(
                "image does not fit the slot ({} bytes)",
                self.limit
            )));
        }
        let durable = self.resume.as_ref().map_or(0, |r| r.durable);
        if self.pos + len as u64 <= durable {
            self.stats.resumed += len as u64;
            self.advance(len);
            return Ok(());
        }
        let at = self.offset + self.pos;
        let existing = &mut self.existing[..len];
        self.file.read_exact_at(existing, at)?;
        // Write each run of differing blocks with one pwrite.
        let mut i = 0;
        while i < len {
            let end = (i + BLOCK).min(len);
            if self.buf[i..end] == existing[i..end] {
                self.stats.skipped += (end - i) as u64;
                i = end;
                continue;
            }
            let mut j = end;
            while j < len {
                let e = (j + BLOCK).min(len);
                if self.buf[j..e] == existing[j..e] {
                    break;
                }
                j = e;
            }
            self.file.write_all_at(&self.buf[i..j], at + i as u64)?;
            self.stats.written += (j - i) as u64;
            i = j;
        }
        self.advance(len);
        if let Some(r) = &self.resume
            && self.pos >= self.saved + CHECKPOINT_EVERY
        {
            self.file.sync_data()?;
            (r.save)(self.pos)?;
            self.saved = self.pos;
        }
        crate::failpoint::hit("write-chunk");
        Ok(())
    }

    fn advance(&mut self, len: usize) {
        self.pos += len as u64;
        self.stats.total = self.pos;
        self.buf.clear();
        (self.progress)(self.stats);
    }

    /// Writes what is buffered and makes it durable.
    pub fn finish(mut self) -> io::Result<WriteStats> {
        self.flush_chunk()?;
        self.file.sync_all()?;
        Ok(self.stats)
    }
}

impl Write for SlotWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub const CANCELLED: &str = "cancelled";

pub fn cancelled() -> io::Error {
    io::Error::other(CANCELLED)
}

pub fn is_cancelled(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Other && e.to_string() == CANCELLED
}

/// BLAKE3 of `len` bytes at `offset`, read from the device rather than the page cache.
pub fn hash_range(file: &File, offset: u64, len: u64, progress: &dyn Fn(u64)) -> io::Result<Digest> {
    drop_cache(file, offset, len);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 * CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], offset + done)?;
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(n as u64);
    }
    Ok(Digest::from_bytes(*hasher.finalize().as_bytes()))
}

/// Evicts cached pages of a range so the next read comes from the device.
pub fn drop_cache(file: &File, offset: u64, len: u64) {
    let _ = nix::fcntl::posix_fadvise(
        file.as_fd(),
        offset as i64,
        len as i64,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// The running slot as a read-only map (file-backed, not anonymous memory).
pub fn map_range(file: &File, offset: u64, len: u64) -> io::Result<Mmap> {
    let len = usize::try_from(len).map_err(|_| io::Error::other("slot too large to map"))?;
    // SAFETY: the running slot is mounted read-only and nothing writes it while we read.
    unsafe { MmapOptions::new().offset(offset).len(len).map(file) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_identical_blocks_and_writes_the_rest() {
        let mut f = tempfile::tempfile().unwrap();
        let old: Vec<u8> = (0..3 * CHUNK + 5000).map(|i| (i % 251) as u8).collect();
        f.write_all(&vec![0xAA; 8192]).unwrap();
        f.write_all(&old).unwrap();
        let mut new = old.clone();
        new[10] ^= 1; // block 0
        new[CHUNK + 4096 * 3 + 7] ^= 1; // one block in chunk 1
        new[3 * CHUNK + 4999] ^= 1; // the short tail
        let cancel = AtomicBool::new(false);
        let mut w = SlotWriter::new(&f, 8192, old.len() as u64, &cancel, &|_| {});
        for piece in new.chunks(777) {
            w.write_all(piece).unwrap();
        }
        let stats = w.finish().unwrap();
        assert_eq!(stats.total, new.len() as u64);
        assert_eq!(stats.written, 4096 + 4096 + (5000 - 4096));
        assert_eq!(stats.written + stats.skipped, new.len() as u64);
        let mut back = vec![0u8; new.len()];
        f.read_exact_at(&mut back, 8192).unwrap();
        assert!(back == new);
        let mut head = vec![0u8; 8192];
        f.read_exact_at(&mut head, 0).unwrap();
        assert!(head.iter().all(|&b| b == 0xAA), "nothing written before the offset");
        assert_eq!(
            hash_range(&f, 8192, new.len() as u64, &|_| {}).unwrap(),
            Digest::of(&new)
        );
    }

    #[test]
    fn resumes_past_a_checkpoint_and_records_new_ones() {
        let f = tempfile::tempfile().unwrap();
        let len = 20 * CHUNK;
        f.set_len(len as u64).unwrap();
        let cancel = AtomicBool::new(false);
        let saved = std::cell::RefCell::new(Vec::new());
        let save = |n: u64| {
            saved.borrow_mut().push(n);
            Ok(())
        };
        let mut w = SlotWriter::new(&f, 0, len as u64, &cancel, &|_| {}).with_resume(Resume {
            durable: 2 * CHUNK as u64,
            save: &save,
        });
        w.write_all(&vec![1u8; len]).unwrap();
        let stats = w.finish().unwrap();
        assert_eq!(stats.resumed, 2 * CHUNK as u64);
        assert_eq!(stats.written, 18 * CHUNK as u64);
        assert_eq!(
            *saved.borrow(),
            [18 * CHUNK as u64],
            "every 16 MiB past the old checkpoint"
        );
        let mut back = vec![0u8; len];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(
            back[..2 * CHUNK].iter().all(|&b| b == 0),
            "below the checkpoint: not touched"
        );
        assert!(back[2 * CHUNK..].iter().all(|&b| b == 1));
    }

    #[test]
    fn refuses_to_write_past_the_slot_and_honours_cancel() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 * CHUNK as u64).unwrap();
        let cancel = AtomicBool::new(false);
        let mut w = SlotWriter::new(&f, 0, 1000, &cancel, &|_| {});
        w.write_all(&[1u8; 2000]).unwrap();
        assert!(w.finish().is_err());
        let cancel = AtomicBool::new(true);
        let mut w = SlotWriter::new(&f, 0, 4 * CHUNK as u64, &cancel, &|_| {});
        assert!(is_cancelled(&w.write_all(&vec![1u8; CHUNK]).unwrap_err()));
    }
}

//! Writing the disk image onto the target while hashing it: the whole disk (for the signed
//! description) and the slot image inside it (for the release manifest).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use atom_dist::install::{DiskDigests, DiskHasher};

const CHUNK: usize = 1 << 20;

/// Where the image's bytes go.
pub struct Span {
    /// The first MiB (the image's table) is already read and is written last, by the table
    /// step: the stream starts here.
    pub start: u64,
    /// Bytes from here on (the image's backup table) are hashed, not written.
    pub write_end: u64,
    /// The slot image inside the disk.
    pub image_offset: u64,
    pub image_len: u64,
}

/// Reads `src` to its end (it continues after `head`), writes `span` of it to `target` at
/// the same offsets, and hashes it all. A run of zeros is written as zeros (fallocate
/// ZERO_RANGE where the device offers it) so nothing of an earlier system stays behind.
pub fn copy(
    head: &[u8],
    src: &mut dyn Read,
    target: &mut File,
    span: &Span,
    progress: &mut dyn FnMut(u64),
) -> Result<DiskDigests> {
    let mut hasher = DiskHasher::new(span.image_offset, span.image_len);
    hasher.update(head);
    let mut pos = head.len() as u64;
    if pos != span.start {
        bail!("the disk image's first part is {pos} bytes, expected {}", span.start);
    }
    let mut buf = vec![0u8; CHUNK];
    let mut zero_range_works = true;
    let started = Instant::now();
    loop {
        let n = fill(src, &mut buf).context("cannot read the disk image (corrupt or truncated?)")?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        hasher.update(chunk);
        if pos < span.write_end {
            let len = (n as u64).min(span.write_end - pos) as usize;
            let part = &chunk[..len];
            let zeroed = part.iter().all(|&b| b == 0)
                && zero_range_works
                && match zero_range(target, pos, len as u64) {
                    Ok(()) => true,
                    Err(_) => {
                        zero_range_works = false;
                        false
                    }
                };
            if !zeroed {
                target.seek(SeekFrom::Start(pos))?;
                target
                    .write_all(part)
                    .with_context(|| format!("cannot write the target at byte {pos}"))?;
            }
        }
        pos += n as u64;
        progress(pos);
        crate::failpoint::hit("install-chunk");
    }
    target.sync_all().context("cannot flush the target")?;
    tracing::debug!(
        bytes = pos,
        secs = started.elapsed().as_secs_f64(),
        "disk image written"
    );
    Ok(hasher.finish())
}

/// Reads until `buf` is full or the input ends.
pub fn fill(src: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match src.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn zero_range(target: &File, offset: u64, len: u64) -> nix::Result<()> {
    nix::fcntl::fallocate(
        target,
        nix::fcntl::FallocateFlags::FALLOC_FL_ZERO_RANGE,
        offset as i64,
        len as i64,
    )
}

//! The base-extents delta format: a raw delta compressed with, as zstd's prefix, only the
//! base blocks the delta does not copy.
//!
//! A changed file's new bytes are alike to its old version, and the old version sits in
//! the base blocks no copy command uses (what the update replaced). Handing zstd those
//! blocks instead of the whole base finds the same byte-level matches while the
//! compressor indexes tens of MiB, not the whole image once per frame: publishing gets
//! minutes faster and the prefix's memory is bounded.
//!
//! Layout: a zstd skippable frame naming the extents (in 4 KiB blocks of the base), then
//! frames of at most [`PREFIX_FRAME_BYTES`](super::PREFIX_FRAME_BYTES) of raw delta, each declaring its size and
//! compressed with the extents' bytes, in order, as its prefix.

use std::io::{self, Write};
use std::ops::Range;
use std::path::Path;

use super::commands::copied_ranges;
use super::{BLOCK_SIZE, DeltaError, check_frames, decompress_frames};

/// The skippable frame magic this format's header uses (one of zstd's sixteen).
const HEADER_MAGIC: u32 = 0x184D_2A5A;
const HEADER_TAG: &[u8; 4] = b"ATX1";
/// A host assembles the prefix on its disk; this bounds what a delta can ask for.
pub const MAX_PREFIX_BYTES: u64 = 512 << 20;
/// Bounds the header a host parses (far above a real delta's few KiB of extents).
const MAX_EXTENTS: usize = 1 << 20;

/// Byte ranges of the base, sorted and disjoint: the prefix is their bytes in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extents(Vec<Range<u64>>);

impl Extents {
    pub fn total(&self) -> u64 {
        self.0.iter().map(|r| r.end - r.start).sum()
    }

    pub fn ranges(&self) -> &[Range<u64>] {
        &self.0
    }

    /// The blocks of a `base_len`-byte base that `raw` does not copy and that are not all
    /// zeros (`zero[i]`, see `delta::zero_blocks`: a zero block matches nothing a literal
    /// holds that zstd would not find cheaper), at most [`MAX_PREFIX_BYTES`] of them,
    /// first ones first.
    pub fn unreferenced(base_len: u64, zero: &[bool], raw: &[u8]) -> Result<Self, DeltaError> {
        let block = BLOCK_SIZE as u64;
        let blocks = base_len.div_ceil(block) as usize;
        let mut used = vec![false; blocks];
        for r in copied_ranges(raw).map_err(|e| DeltaError::Frame(e.to_string()))? {
            let first = (r.start / block) as usize;
            let last = (r.end.div_ceil(block) as usize).min(blocks);
            used.get_mut(first..last).into_iter().flatten().for_each(|u| *u = true);
        }
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut total = 0u64;
        for (i, used) in used.into_iter().enumerate() {
            if used || zero.get(i).copied().unwrap_or(false) {
                continue;
            }
            let len = block.min(base_len - i as u64 * block);
            if total + len > MAX_PREFIX_BYTES {
                break;
            }
            total += len;
            let start = i as u64 * block;
            match out.last_mut() {
                Some(last) if last.end == start => last.end = start + len,
                _ => out.push(start..start + len),
            }
        }
        Ok(Extents(out))
    }

    /// The header frame: tag, count, then per extent the blocks skipped since the last
    /// one and its length in blocks (LEB128). The last extent may end at the base's end.
    fn header(&self) -> Vec<u8> {
        let mut body = HEADER_TAG.to_vec();
        leb128(&mut body, self.0.len() as u64);
        let mut at = 0u64;
        for r in &self.0 {
            let start = r.start / u64::from(BLOCK_SIZE);
            leb128(&mut body, start - at);
            let blocks = (r.end - r.start).div_ceil(u64::from(BLOCK_SIZE));
            leb128(&mut body, blocks);
            at = start + blocks;
        }
        let mut out = HEADER_MAGIC.to_le_bytes().to_vec();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Reads the header of an untrusted delta for a base of `base_len` bytes; returns the
    /// extents and the frames after it.
    fn parse(delta_zst: &[u8], base_len: u64) -> Result<(Self, &[u8]), DeltaError> {
        let bad = |what: &str| DeltaError::Frame(format!("base-extents header: {what}"));
        let word = |at: usize| {
            delta_zst
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if word(0) != Some(HEADER_MAGIC) {
            return Err(bad("missing"));
        }
        let end = 8usize
            .checked_add(word(4).ok_or_else(|| bad("truncated"))? as usize)
            .ok_or_else(|| bad("truncated"))?;
        let body = delta_zst.get(8..end).ok_or_else(|| bad("truncated"))?;
        let rest = &delta_zst[end..];
        let body = body.strip_prefix(HEADER_TAG).ok_or_else(|| bad("unknown tag"))?;
        let mut cursor = body;
        let count = read_leb128(&mut cursor).ok_or_else(|| bad("truncated count"))?;
        if count > MAX_EXTENTS as u64 {
            return Err(bad("too many extents"));
        }
        let block = u64::from(BLOCK_SIZE);
        // Two bytes at least per extent: a tiny header cannot make a host reserve much.
        let mut out = Vec::with_capacity((count as usize).min(cursor.len() / 2));
        let (mut at, mut total) = (0u64, 0u64);
        for _ in 0..count {
            let (Some(gap), Some(blocks)) = (read_leb128(&mut cursor), read_leb128(&mut cursor)) else {
                return Err(bad("truncated extent"));
            };
            let start = at.checked_add(gap).filter(|_| blocks > 0 && (gap > 0 || at == 0));
            let Some((start, end)) = start.and_then(|s| Some((s, s.checked_add(blocks)?))) else {
                return Err(bad("extents overlap, touch or are empty"));
            };
            let (from, to) = (start.saturating_mul(block), end.saturating_mul(block).min(base_len));
            if from >= to || end.saturating_mul(block) - to >= block {
                return Err(bad("an extent lies beyond the base"));
            }
            total += to - from;
            if total > MAX_PREFIX_BYTES {
                return Err(bad("extents are larger than allowed"));
            }
            out.push(from..to);
            at = end;
        }
        if !cursor.is_empty() {
            return Err(bad("bytes after the extents"));
        }
        Ok((Extents(out), rest))
    }

    /// The prefix's bytes, written to `out`.
    fn copy_from(&self, base: &[u8], out: &mut impl Write) -> io::Result<()> {
        for r in &self.0 {
            out.write_all(&base[r.start as usize..r.end as usize])?;
        }
        Ok(())
    }
}

fn leb128(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_leb128(cursor: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = cursor.split_first()?;
        *cursor = rest;
        v |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// `zero` says which base blocks are all zeros.
pub fn compress(base: &[u8], zero: &[bool], raw: &[u8], zstd_level: i32, mut out: impl Write) -> io::Result<Extents> {
    let extents = Extents::unreferenced(base.len() as u64, zero, raw).map_err(io::Error::other)?;
    let mut prefix = Vec::with_capacity(extents.total() as usize);
    extents.copy_from(base, &mut prefix)?;
    out.write_all(&extents.header())?;
    super::compress_frames(&prefix, raw, zstd_level, &mut out)?;
    Ok(extents)
}

/// The assembled prefix: in memory, or in an unlinked file of a scratch directory so a
/// host's anonymous memory does not grow with it.
enum Prefix {
    Memory(Vec<u8>),
    File(memmap2::Mmap),
}

impl std::ops::Deref for Prefix {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Prefix::Memory(v) => v,
            Prefix::File(m) => m,
        }
    }
}

fn assemble(base: &[u8], extents: &Extents, scratch: Option<&Path>) -> Result<Prefix, DeltaError> {
    let Some(dir) = scratch.filter(|_| extents.total() > 0) else {
        let mut v = Vec::with_capacity(extents.total() as usize);
        extents.copy_from(base, &mut v)?;
        return Ok(Prefix::Memory(v));
    };
    let file = tempfile::tempfile_in(dir)?;
    let mut w = io::BufWriter::new(&file);
    extents.copy_from(base, &mut w)?;
    w.flush()?;
    drop(w);
    // SAFETY: an unlinked file only this process holds, not written while mapped.
    Ok(Prefix::File(unsafe { memmap2::Mmap::map(&file) }?))
}

/// Decompresses a delta of this format made against `base` into `out`, at most `limit`
/// bytes. The prefix is assembled in `scratch` (a directory) when given, else in memory.
pub fn decompress(
    base: &[u8],
    delta_zst: &[u8],
    out: &mut impl Write,
    limit: u64,
    scratch: Option<&Path>,
) -> Result<u64, DeltaError> {
    let (extents, frames) = Extents::parse(delta_zst, base.len() as u64)?;
    // Before the prefix is written: a delta whose frames are bad costs no disk.
    check_frames(frames, delta_zst.len() - frames.len(), limit)?;
    let prefix = assemble(base, &extents, scratch)?;
    decompress_frames(&prefix, frames, delta_zst.len() - frames.len(), out, limit)
}

/// The prefix size a delta of this format names, if its header parses (what a host
/// needs on disk beside the decoded delta).
pub fn prefix_size(delta_zst: &[u8], base_len: u64) -> Option<u64> {
    Extents::parse(delta_zst, base_len).ok().map(|(e, _)| e.total())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::tests::pseudo_random;
    use crate::delta::{apply, compress_with_base, make_raw, raw_delta_limit, signature_of, zero_blocks};

    fn zeros_of(base: &[u8]) -> Vec<bool> {
        zero_blocks(&signature_of(base))
    }

    /// A "security update" as a package manager makes it: a file's new version, a few
    /// bytes changed, lands elsewhere in the image and its old blocks get other content.
    fn patched_pair() -> (Vec<u8>, Vec<u8>) {
        let (base, mut target) = crate::delta::tests::patched_pair();
        target[300_000..700_000].copy_from_slice(&pseudo_random(400_000, 8));
        (base, target)
    }

    #[test]
    fn finds_what_the_whole_base_finds_and_round_trips() {
        let (base, target) = patched_pair();
        let raw = make_raw(&base, &target).unwrap();
        let mut whole = Vec::new();
        compress_with_base(&base, &raw, 19, &mut whole).unwrap();
        let mut ours = Vec::new();
        let extents = compress(&base, &zeros_of(&base), &raw, 19, &mut ours).unwrap();
        assert!(
            extents.total() < base.len() as u64 / 2,
            "prefix {} bytes",
            extents.total()
        );
        assert!(
            ours.len() as f64 <= whole.len() as f64 * 1.05,
            "extents {} bytes vs whole base {}",
            ours.len(),
            whole.len()
        );
        let dir = tempfile::tempdir().unwrap();
        for scratch in [None, Some(dir.path())] {
            let mut back = Vec::new();
            let n = decompress(&base, &ours, &mut back, raw_delta_limit(target.len() as u64), scratch).unwrap();
            assert_eq!((n as usize, &back), (raw.len(), &raw));
        }
        let mut out = Vec::new();
        apply(&base, &raw, target.len() as u64, &mut out).unwrap();
        assert!(out == target);
        assert_eq!(prefix_size(&ours, base.len() as u64), Some(extents.total()));
        assert_eq!(crate::delta::declared_size(&ours), Some(raw.len() as u64));
    }

    #[test]
    fn zero_and_copied_blocks_stay_out_of_the_prefix() {
        let mut base = pseudo_random(64 * 4096, 9);
        base[10 * 4096..20 * 4096].fill(0);
        let mut target = base.clone();
        target[40 * 4096..41 * 4096].copy_from_slice(&pseudo_random(4096, 10));
        let raw = make_raw(&base, &target).unwrap();
        let zero = zeros_of(&base);
        assert_eq!(zero.iter().filter(|z| **z).count(), 10);
        let e = Extents::unreferenced(base.len() as u64, &zero, &raw).unwrap();
        assert_eq!(e.ranges().to_vec(), vec![(40 * 4096..41 * 4096)]);
        let header = e.header();
        let (back, rest) = Extents::parse(&header, base.len() as u64).unwrap();
        assert_eq!((back, rest.len()), (e, 0));
    }

    #[test]
    fn hostile_headers_are_refused() {
        let (base, target) = patched_pair();
        let raw = make_raw(&base, &target).unwrap();
        let mut zst = Vec::new();
        compress(&base, &zeros_of(&base), &raw, 3, &mut zst).unwrap();
        let limit = raw_delta_limit(target.len() as u64);
        let header = |extents: &[(u64, u64)]| {
            let mut body = HEADER_TAG.to_vec();
            leb128(&mut body, extents.len() as u64);
            for &(gap, len) in extents {
                leb128(&mut body, gap);
                leb128(&mut body, len);
            }
            let mut out = HEADER_MAGIC.to_le_bytes().to_vec();
            out.extend_from_slice(&(body.len() as u32).to_le_bytes());
            out.extend_from_slice(&body);
            out
        };
        let blocks = base.len() as u64 / 4096;
        for (what, extents) in [
            ("beyond the base", vec![(blocks, 1)]),
            ("empty", vec![(0, 0)]),
            ("touching", vec![(0, 1), (0, 1)]),
            ("overflow", vec![(u64::MAX, 2)]),
        ] {
            let e = decompress(&base, &header(&extents), &mut Vec::new(), limit, None).unwrap_err();
            assert!(e.to_string().contains("base-extents header"), "{what}: {e}");
        }
        assert!(decompress(&base, &zst[..6], &mut Vec::new(), limit, None).is_err());
        assert!(decompress(&base, b"plain zstd", &mut Vec::new(), limit, None).is_err());
        let mut other = base.clone();
        other[500_000] ^= 1;
        assert!(
            decompress(&other, &zst, &mut Vec::new(), limit, None).is_err(),
            "wrong base"
        );
        assert!(matches!(
            decompress(&base, &zst, &mut Vec::new(), 100, None),
            Err(DeltaError::TooLarge { .. })
        ));
    }
}

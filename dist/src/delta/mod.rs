//! Binary deltas between images: fast_rsync (librsync format) deltas, zstd-compressed.
//!
//! The same format serves precomputed deltas in the repository and answers of the
//! rsync-style endpoint. Precomputed deltas may also be compressed with the base image
//! as zstd's prefix ([`compress_with_base`]): rsync's 4 KiB blocks miss the byte-level
//! likeness of a changed file to its old version, which zstd then finds in the base, as
//! `zstd --patch-from` does. A delta is untrusted input until the image it produces matches the
//! signed digest: fast_rsync's MD4 block matching gives no security of its own.

use std::io::{self, Read, Write};

use fast_rsync::{Signature, SignatureOptions};

use crate::manifest::DeltaFormat;

pub mod commands;
pub mod extents;

/// 4 KiB matches the ext4 block size, so copy commands line up with filesystem blocks.
pub const BLOCK_SIZE: u32 = 4096;
/// Truncated MD4 per block; 8 bytes keeps false matches negligible for multi-GiB images,
/// and the final BLAKE3 check catches any that remain.
pub const STRONG_HASH_BYTES: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("delta does not apply: {0}")]
    Apply(#[from] fast_rsync::ApplyError),
    #[error("delta produced {actual} bytes, expected {expected}")]
    WrongLength { expected: u64, actual: u64 },
    #[error("decompressed delta exceeds {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("delta i/o: {0}")]
    Io(#[from] io::Error),
    #[error("delta is malformed: {0}")]
    Frame(String),
    #[error("internal error: the delta made does not rebuild the target (it gives {0})")]
    DoesNotRebuild(crate::Digest),
}

/// fast_rsync's (librsync's) MD4 signature magic; the BLAKE2 variant is not supported by
/// its diff.
const MD4_SIGNATURE_MAGIC: u32 = 0x7273_0136;
const SIGNATURE_HEADER: usize = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureCheckError {
    #[error("signature is {0} bytes, shorter than its 12-byte header")]
    TooShort(usize),
    #[error("signature magic {0:#010x} is not an MD4 rsync signature")]
    WrongMagic(u32),
    #[error("signature block size {0} is not allowed (only {BLOCK_SIZE})")]
    BlockSize(u32),
    #[error("signature strong hash size {0} is not allowed (8 to 16)")]
    HashSize(u32),
    #[error("signature length does not match its block records")]
    Truncated,
    #[error("signature is {size} bytes, more than the {limit} allowed for this target")]
    TooLarge { size: usize, limit: usize },
}

/// Largest signature accepted for a base of at most `base_len` bytes.
pub fn signature_limit(base_len: u64) -> usize {
    let blocks = base_len.div_ceil(u64::from(BLOCK_SIZE)) as usize;
    SIGNATURE_HEADER + blocks * (4 + 16)
}

/// Checks the 12-byte header of an untrusted signature (magic, block size, hash size).
pub fn check_signature_header(raw: &[u8]) -> Result<(), SignatureCheckError> {
    if raw.len() < SIGNATURE_HEADER {
        return Err(SignatureCheckError::TooShort(raw.len()));
    }
    let word = |i: usize| u32::from_be_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
    let (magic, block_size, hash_size) = (word(0), word(4), word(8));
    if magic != MD4_SIGNATURE_MAGIC {
        return Err(SignatureCheckError::WrongMagic(magic));
    }
    if block_size != BLOCK_SIZE {
        return Err(SignatureCheckError::BlockSize(block_size));
    }
    if !(8..=16).contains(&hash_size) {
        return Err(SignatureCheckError::HashSize(hash_size));
    }
    Ok(())
}

/// Checks an untrusted signature before fast_rsync sees it: fast_rsync's own parser
/// accepts parameters its diff would panic on.
pub fn parse_signature(raw: Vec<u8>, limit: usize) -> Result<Signature, SignatureCheckError> {
    check_signature_header(&raw)?;
    if raw.len() > limit {
        return Err(SignatureCheckError::TooLarge { size: raw.len(), limit });
    }
    let hash_size = u32::from_be_bytes([raw[8], raw[9], raw[10], raw[11]]) as usize;
    if !(raw.len() - SIGNATURE_HEADER).is_multiple_of(4 + hash_size) {
        return Err(SignatureCheckError::Truncated);
    }
    Signature::deserialize(raw).map_err(|_| SignatureCheckError::Truncated)
}

/// The signature a client sends for its running slot.
pub fn signature_of(base: &[u8]) -> Signature {
    Signature::calculate(base, signature_options())
}

pub fn signature_options() -> SignatureOptions {
    SignatureOptions {
        block_size: BLOCK_SIZE,
        crypto_hash_size: STRONG_HASH_BYTES,
    }
}

/// Writes the zstd-compressed delta that turns `base` into `target`.
pub fn make(base: &[u8], target: &[u8], zstd_level: i32, out: impl Write) -> io::Result<()> {
    let sig = Signature::calculate(base, signature_options());
    make_with_signature(&sig, target, zstd_level, out)
}

/// Same as [`make`] when the base is known only by its signature (the rsync endpoint).
pub fn make_with_signature(sig: &Signature, target: &[u8], zstd_level: i32, out: impl Write) -> io::Result<()> {
    let mut enc = plain_encoder(out, zstd_level)?;
    diff(sig, target, &mut enc)?;
    enc.finish()?;
    Ok(())
}

fn plain_encoder<W: Write>(out: W, zstd_level: i32) -> io::Result<zstd::stream::write::Encoder<'static, W>> {
    let mut enc = zstd::stream::write::Encoder::new(out, zstd_level)?;
    enc.include_checksum(true)?;
    Ok(enc)
}

fn diff(sig: &Signature, target: &[u8], out: &mut impl Write) -> io::Result<()> {
    fast_rsync::diff(&sig.index(), target, out).map_err(|e| match e {
        fast_rsync::DiffError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    })
}

/// The largest zstd window (2^25 = 32 MiB) a payload or delta may use: what a host must
/// hold in memory to decode it. Publishers stay within it; hosts refuse more.
pub const MAX_WINDOW_LOG: u32 = 25;

/// A base-prefixed delta is cut into frames of at most this much raw delta: what a host
/// allocates to decode one frame.
pub const PREFIX_FRAME_BYTES: usize = 32 << 20;
/// The largest window a base-prefixed frame may declare: its matches reach 2 GiB back,
/// into the base. Decoding costs no window buffer (frames are decoded whole into a
/// buffer of their declared size), so this does not raise a host's memory.
pub const PREFIX_WINDOW_LOG: u32 = 31;

/// Raw deltas up to this size are compressed with (part of) the base as prefix: each
/// frame indexes the prefix again, so larger ones would cost minutes per base.
pub const BASE_PREFIX_MAX_RAW: usize = 4 * PREFIX_FRAME_BYTES;

/// How a precomputed delta is encoded: which agents can read it, and what it costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// zstd over the raw delta: every agent reads it; largest.
    Plain,
    /// The smaller of plain and the whole base as prefix of each frame: for fleets whose
    /// agents predate the base-extents format; slow to make for large images.
    BasePrefix,
    /// The base blocks the delta does not copy as prefix ([`extents`]): as small as
    /// `BasePrefix`, fast to make; read by agents that know the format (older ones
    /// skip the delta and take another route).
    BaseExtents,
}

/// A precomputed delta from `base` to `target` in `encoding` (falling back to plain for
/// raw deltas too large for a prefix), with the format that names it.
pub fn make_precomputed(
    base: &[u8],
    target: &[u8],
    zstd_level: i32,
    encoding: Encoding,
) -> io::Result<(DeltaFormat, Vec<u8>)> {
    let sig = signature_in_chunks(base, &mut |_| {});
    let raw = make_raw_in_chunks(&sig, target, &mut |_| {})?;
    encode_raw(base, &sig, &raw, zstd_level, encoding)
}

/// Encodes raw delta `raw` (from `base`, whose signature is `sig`) as [`make_precomputed`]
/// does.
pub fn encode_raw(
    base: &[u8],
    sig: &Signature,
    raw: &[u8],
    zstd_level: i32,
    encoding: Encoding,
) -> io::Result<(DeltaFormat, Vec<u8>)> {
    let plain = || -> io::Result<Vec<u8>> {
        let mut enc = plain_encoder(Vec::new(), zstd_level)?;
        enc.write_all(raw)?;
        enc.finish()
    };
    if encoding == Encoding::Plain || raw.len() > BASE_PREFIX_MAX_RAW {
        return Ok((DeltaFormat::FastRsyncZstd, plain()?));
    }
    if encoding == Encoding::BaseExtents {
        let mut out = Vec::new();
        let extents = extents::compress(base, &zero_blocks(sig), raw, zstd_level, &mut out)?;
        tracing::info!(
            raw = raw.len(),
            prefix = extents.total(),
            extents = extents.ranges().len(),
            encoded = out.len(),
            "delta encoded with the base's unreferenced blocks as prefix"
        );
        return Ok((DeltaFormat::FastRsyncZstdBaseExtents, out));
    }
    let plain = plain()?;
    let mut prefixed = Vec::new();
    compress_with_base(base, raw, zstd_level, &mut prefixed)?;
    tracing::info!(
        raw = raw.len(),
        plain = plain.len(),
        base_prefix = prefixed.len(),
        "delta encodings"
    );
    Ok(if prefixed.len() < plain.len() {
        (DeltaFormat::FastRsyncZstdBasePrefix, prefixed)
    } else {
        (DeltaFormat::FastRsyncZstd, plain)
    })
}

/// The raw (uncompressed) delta that turns `base` into `target`.
pub fn make_raw(base: &[u8], target: &[u8]) -> io::Result<Vec<u8>> {
    make_raw_in_chunks(&signature_in_chunks(base, &mut |_| {}), target, &mut |_| {})
}

/// Which blocks of a base are all zeros, read off its signature: no page of the base is
/// touched (most of an image's blocks are free space). A false "zero" (an 8-byte MD4
/// collision) would only leave a block out of a prefix, never make a delta wrong.
pub fn zero_blocks(sig: &Signature) -> Vec<bool> {
    let zero = Signature::calculate(&[0u8; BLOCK_SIZE as usize], signature_options()).into_serialized();
    let record = &zero[SIGNATURE_HEADER..];
    sig.serialized()[SIGNATURE_HEADER..]
        .chunks(record.len())
        .map(|r| r == record)
        .collect()
}

/// Signatures and diffs walk large images in chunks of this size (a multiple of the block
/// size), telling the caller each chunk they are done with: a publisher drops a mapped
/// image's pages as it goes instead of holding the whole image resident.
pub const WALK_CHUNK: usize = 64 << 20;

/// The signature of `base`, computed chunk by chunk; `done` sees each chunk after it.
pub fn signature_in_chunks(base: &[u8], done: &mut dyn FnMut(&[u8])) -> Signature {
    let mut serialized = Vec::new();
    for chunk in base.chunks(WALK_CHUNK) {
        let part = Signature::calculate(chunk, signature_options()).into_serialized();
        let skip = if serialized.is_empty() { 0 } else { SIGNATURE_HEADER };
        serialized.extend_from_slice(&part[skip..]);
        done(chunk);
    }
    if serialized.is_empty() {
        return Signature::calculate(base, signature_options());
    }
    Signature::deserialize(serialized).expect("a signature spliced from fast_rsync's own parts")
}

/// The raw delta from the base of `sig` to `target`, diffed chunk by chunk (a match across
/// a chunk boundary is lost: ext4 images align files to blocks, so none are); `done` sees
/// each chunk of `target` after it.
pub fn make_raw_in_chunks(sig: &Signature, target: &[u8], done: &mut dyn FnMut(&[u8])) -> io::Result<Vec<u8>> {
    let index = sig.index();
    let mut whole = Vec::new();
    let mut part = Vec::new();
    for chunk in target.chunks(WALK_CHUNK) {
        part.clear();
        fast_rsync::diff(&index, chunk, &mut part).map_err(|e| match e {
            fast_rsync::DiffError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        })?;
        commands::splice(&mut whole, &part).map_err(io::Error::other)?;
        done(chunk);
    }
    if whole.is_empty() {
        diff(sig, target, &mut whole)?;
    }
    Ok(whole)
}

fn zstd_error(what: &str, code: usize) -> io::Error {
    io::Error::other(format!("{what}: {}", zstd::zstd_safe::get_error_name(code)))
}

/// Compresses a raw delta in frames of [`PREFIX_FRAME_BYTES`], each with `base` as its
/// zstd prefix (long-distance matching on, window wide enough to reach all of the base).
/// Each frame loads the whole base again, so publishers keep this for small raw deltas.
pub fn compress_with_base(base: &[u8], raw: &[u8], zstd_level: i32, out: impl Write) -> io::Result<()> {
    compress_frames(base, raw, zstd_level, out)
}

/// Compresses `raw` in frames of at most [`PREFIX_FRAME_BYTES`], each declaring its size
/// and using `prefix` as its zstd prefix (long-distance matching on, a window reaching
/// back over all of it).
fn compress_frames(prefix: &[u8], raw: &[u8], zstd_level: i32, mut out: impl Write) -> io::Result<()> {
    use zstd::zstd_safe::{CCtx, CParameter, ResetDirective};
    let span = (prefix.len() + PREFIX_FRAME_BYTES).max(1 << 10) as u64;
    let window_log = (64 - (span - 1).leading_zeros()).min(PREFIX_WINDOW_LOG);
    let mut cctx = CCtx::create();
    let mut dst = Vec::new();
    for chunk in raw.chunks(PREFIX_FRAME_BYTES) {
        cctx.reset(ResetDirective::SessionAndParameters)
            .map_err(|c| zstd_error("reset", c))?;
        for p in [
            CParameter::CompressionLevel(zstd_level),
            CParameter::WindowLog(window_log),
            CParameter::EnableLongDistanceMatching(true),
            CParameter::ChecksumFlag(true),
            CParameter::ContentSizeFlag(true),
        ] {
            cctx.set_parameter(p).map_err(|c| zstd_error("parameter", c))?;
        }
        cctx.ref_prefix(prefix).map_err(|c| zstd_error("prefix", c))?;
        dst.clear();
        dst.reserve(zstd::zstd_safe::compress_bound(chunk.len()));
        cctx.compress2(&mut dst, chunk).map_err(|c| zstd_error("compress", c))?;
        out.write_all(&dst)?;
    }
    Ok(())
}

/// Decompresses a base-prefixed delta into `out`, frame by frame. Every frame must declare
/// its size, at most [`PREFIX_FRAME_BYTES`], and all together at most `limit`: an
/// untrusted delta cannot make a host allocate more than one frame's worth.
pub fn decompress_with_base(
    base: &[u8],
    delta_zst: &[u8],
    out: &mut impl Write,
    limit: u64,
) -> Result<u64, DeltaError> {
    decompress_frames(base, delta_zst, 0, out, limit)
}

/// Checks, without decoding, that every frame declares its size, at most
/// [`PREFIX_FRAME_BYTES`], and all together at most `limit`; returns their total.
fn check_frames(frames: &[u8], at: usize, limit: u64) -> Result<u64, DeltaError> {
    use zstd::zstd_safe::get_error_name;
    let mut rest = frames;
    let mut total = 0u64;
    while !rest.is_empty() {
        let len = zstd::zstd_safe::find_frame_compressed_size(rest).map_err(|c| {
            DeltaError::Frame(format!(
                "frame at byte {}: {}",
                at + frames.len() - rest.len(),
                get_error_name(c)
            ))
        })?;
        let size = match zstd::zstd_safe::get_frame_content_size(rest) {
            Ok(Some(n)) => n,
            _ => return Err(DeltaError::Frame("a frame does not declare its size".into())),
        };
        if size > PREFIX_FRAME_BYTES as u64 {
            return Err(DeltaError::Frame(format!(
                "a frame declares {size} bytes, more than {PREFIX_FRAME_BYTES}"
            )));
        }
        total += size;
        if total > limit {
            return Err(DeltaError::TooLarge { limit });
        }
        rest = &rest[len..];
    }
    Ok(total)
}

/// Decompresses `frames` (starting at byte `at` of the delta, for error messages), each
/// with `prefix` as its zstd prefix.
fn decompress_frames(
    prefix: &[u8],
    frames: &[u8],
    at: usize,
    out: &mut impl Write,
    limit: u64,
) -> Result<u64, DeltaError> {
    use zstd::zstd_safe::{DCtx, DParameter, ResetDirective, get_error_name};
    let bad = |what: String| DeltaError::Frame(what);
    let zbad = |code: usize| DeltaError::Frame(get_error_name(code).into());
    let mut dctx = DCtx::create();
    let mut rest = frames;
    let mut total = 0u64;
    let mut buf: Vec<u8> = Vec::new();
    while !rest.is_empty() {
        let len = zstd::zstd_safe::find_frame_compressed_size(rest).map_err(|c| {
            bad(format!(
                "frame at byte {}: {}",
                at + frames.len() - rest.len(),
                get_error_name(c)
            ))
        })?;
        let (frame, next) = rest.split_at(len);
        let size = match zstd::zstd_safe::get_frame_content_size(frame) {
            Ok(Some(n)) => n,
            _ => return Err(bad("a frame does not declare its size".into())),
        };
        if size > PREFIX_FRAME_BYTES as u64 {
            return Err(bad(format!(
                "a frame declares {size} bytes, more than {PREFIX_FRAME_BYTES}"
            )));
        }
        if total + size > limit {
            return Err(DeltaError::TooLarge { limit });
        }
        dctx.reset(ResetDirective::SessionAndParameters).map_err(zbad)?;
        dctx.set_parameter(DParameter::WindowLogMax(PREFIX_WINDOW_LOG))
            .map_err(zbad)?;
        dctx.ref_prefix(prefix).map_err(zbad)?;
        buf.clear();
        buf.reserve_exact(size as usize);
        let got = dctx.decompress(&mut buf, frame).map_err(zbad)?;
        if got as u64 != size {
            return Err(bad(format!("a frame gave {got} bytes, it declares {size}")));
        }
        out.write_all(&buf)?;
        total += size;
        rest = next;
    }
    Ok(total)
}

/// What a zstd delta's frames say they decompress to, if every frame says (a hint for
/// reserving room, not a fact: decoders check sizes themselves).
pub fn declared_size(delta_zst: &[u8]) -> Option<u64> {
    let mut rest = delta_zst;
    let mut total = 0u64;
    while !rest.is_empty() {
        let len = zstd::zstd_safe::find_frame_compressed_size(rest).ok()?;
        total = total.checked_add(zstd::zstd_safe::get_frame_content_size(rest).ok()??)?;
        rest = rest.get(len..)?;
    }
    Some(total)
}

/// Decompresses a delta of `format` made against `base` into `out`, at most `limit` bytes.
/// A base-extents delta's prefix is assembled in `scratch` (a directory) when given, else
/// in memory.
pub fn decompress_format(
    format: DeltaFormat,
    base: &[u8],
    delta_zst: &[u8],
    out: &mut impl Write,
    limit: u64,
    scratch: Option<&std::path::Path>,
) -> Result<u64, DeltaError> {
    match format {
        DeltaFormat::FastRsyncZstd => decompress_bounded(delta_zst, out, limit),
        DeltaFormat::FastRsyncZstdBasePrefix => decompress_with_base(base, delta_zst, out, limit),
        DeltaFormat::FastRsyncZstdBaseExtents => extents::decompress(base, delta_zst, out, limit, scratch),
        DeltaFormat::Unsupported => Err(DeltaError::Frame("a delta format this build does not read".into())),
    }
}

/// Decompresses a delta into `out`, refusing to produce more than `limit` bytes.
pub fn decompress_bounded(delta_zst: impl Read, out: &mut impl Write, limit: u64) -> Result<u64, DeltaError> {
    let mut dec = zstd::stream::read::Decoder::new(delta_zst)?;
    dec.window_log_max(MAX_WINDOW_LOG)?;
    let written = io::copy(&mut dec.take(limit + 1), out)?;
    if written > limit {
        return Err(DeltaError::TooLarge { limit });
    }
    Ok(written)
}

/// Checks that a delta just made (`encoded`, of `format`, from `base`) rebuilds the target
/// of `target_len` bytes and `target_digest`: a publisher or server hands it to every host
/// on that base, and a broken one would fail them all. `walked` is called after each
/// [`WALK_CHUNK`] of the rebuilt target (a publisher drops the base's pages there).
pub fn check_rebuilds(
    format: DeltaFormat,
    base: &[u8],
    encoded: &[u8],
    target_len: u64,
    target_digest: &crate::Digest,
    scratch: Option<&std::path::Path>,
    walked: &mut dyn FnMut(),
) -> Result<(), DeltaError> {
    let mut raw = Vec::new();
    decompress_format(format, base, encoded, &mut raw, raw_delta_limit(target_len), scratch)?;
    let mut rebuilt = crate::digest::HashingWriter::new(ChunkNotifier { since: 0, walked });
    apply(base, &raw, target_len, &mut rebuilt)?;
    let (_, digest, _) = rebuilt.finish();
    if digest != *target_digest {
        return Err(DeltaError::DoesNotRebuild(digest));
    }
    Ok(())
}

/// Upper bound for a legitimate decompressed delta of a `target_len` image: every byte a
/// literal, plus command headers (at most 9 bytes per 64 KiB literal run, and headers for
/// copies of at least one block each).
pub fn raw_delta_limit(target_len: u64) -> u64 {
    target_len + target_len / 256 + (target_len / u64::from(BLOCK_SIZE) + 1) * 20 + 64
}

/// Applies a decompressed delta to `base`, writing exactly `target_len` bytes to `out`.
pub fn apply(base: &[u8], raw_delta: &[u8], target_len: u64, out: &mut impl Write) -> Result<(), DeltaError> {
    let limit = usize::try_from(target_len).map_err(|_| DeltaError::TooLarge { limit: target_len })?;
    let mut counter = CountingWriter { inner: out, count: 0 };
    fast_rsync::apply_limited(base, raw_delta, &mut counter, limit)?;
    if counter.count != target_len {
        return Err(DeltaError::WrongLength {
            expected: target_len,
            actual: counter.count,
        });
    }
    Ok(())
}

/// A sink that calls `walked` after each [`WALK_CHUNK`] written.
struct ChunkNotifier<'a> {
    since: usize,
    walked: &'a mut dyn FnMut(),
}

impl Write for ChunkNotifier<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.since += buf.len();
        if self.since >= WALK_CHUNK {
            self.since = 0;
            (self.walked)();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct CountingWriter<'a, W> {
    inner: &'a mut W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A "security update": a file's new version differs from the old one in scattered
    /// bytes and lands elsewhere in the image, as a rewritten file does.
    pub(crate) fn patched_pair() -> (Vec<u8>, Vec<u8>) {
        let base = pseudo_random(2 << 20, 7);
        let mut target = base.clone();
        let mut moved = base[300_000..700_000].to_vec();
        for i in (0..moved.len()).step_by(1500) {
            moved[i] ^= 0x5a;
        }
        target[1_200_000..1_600_000].copy_from_slice(&moved);
        (base, target)
    }

    #[test]
    fn base_prefix_finds_byte_level_likeness_and_round_trips() {
        let (base, target) = patched_pair();
        let raw = make_raw(&base, &target).unwrap();
        let mut plain = Vec::new();
        make(&base, &target, 19, &mut plain).unwrap();
        let mut prefixed = Vec::new();
        compress_with_base(&base, &raw, 19, &mut prefixed).unwrap();
        assert!(
            prefixed.len() * 4 < plain.len(),
            "base prefix {} bytes vs plain {} bytes",
            prefixed.len(),
            plain.len()
        );
        assert_eq!(declared_size(&prefixed), Some(raw.len() as u64));
        assert_eq!(declared_size(&plain), None, "a streamed frame declares no size");
        assert_eq!(declared_size(&prefixed[..prefixed.len() - 1]), None);
        let mut back = Vec::new();
        let n = decompress_with_base(&base, &prefixed, &mut back, raw_delta_limit(target.len() as u64)).unwrap();
        assert_eq!((n as usize, &back), (raw.len(), &raw));
        let mut out = Vec::new();
        apply(&base, &back, target.len() as u64, &mut out).unwrap();
        assert!(out == target);
    }

    #[test]
    fn base_prefixed_delta_refuses_wrong_base_and_hostile_frames() {
        let (base, target) = patched_pair();
        let raw = make_raw(&base, &target).unwrap();
        let mut zst = Vec::new();
        compress_with_base(&base, &raw, 3, &mut zst).unwrap();
        let limit = raw_delta_limit(target.len() as u64);
        let mut other = base.clone();
        other[400_000] ^= 1;
        assert!(
            decompress_with_base(&other, &zst, &mut Vec::new(), limit).is_err(),
            "checksum catches a wrong base"
        );
        assert!(matches!(
            decompress_with_base(&base, &zst, &mut Vec::new(), 100),
            Err(DeltaError::TooLarge { .. })
        ));
        assert!(decompress_with_base(&base, &zst[..zst.len() - 9], &mut Vec::new(), limit).is_err());
        // A frame that does not declare its size (a streaming frame) is refused.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.write_all(&raw).unwrap();
        let unsized_frame = enc.finish().unwrap();
        let e = decompress_with_base(&base, &unsized_frame, &mut Vec::new(), limit).unwrap_err();
        assert!(e.to_string().contains("does not declare its size"), "{e}");
        assert!(decompress_with_base(&base, b"not zstd at all", &mut Vec::new(), limit).is_err());
    }

    #[test]
    fn a_delta_that_does_not_rebuild_its_target_is_caught() {
        let (base, target) = patched_pair();
        let (format, encoded) = make_precomputed(&base, &target, 3, Encoding::BaseExtents).unwrap();
        let len = target.len() as u64;
        let mut walked = 0;
        check_rebuilds(
            format,
            &base,
            &encoded,
            len,
            &crate::Digest::of(&target),
            None,
            &mut || walked += 1,
        )
        .unwrap();
        let e = check_rebuilds(
            format,
            &base,
            &encoded,
            len,
            &crate::Digest::of(&base),
            None,
            &mut || {},
        )
        .unwrap_err();
        assert!(matches!(e, DeltaError::DoesNotRebuild(_)), "{e}");
        let mut other = base.clone();
        other[100_000] ^= 1; // a copied byte: the rebuilt image differs
        assert!(
            check_rebuilds(
                format,
                &other,
                &encoded,
                len,
                &crate::Digest::of(&target),
                None,
                &mut || {}
            )
            .is_err()
        );
    }

    #[test]
    fn delta_reconstructs_target() {
        let base = pseudo_random(1 << 20, 1);
        let mut target = base.clone();
        target[5000..9000].copy_from_slice(&pseudo_random(4000, 2));
        target.extend_from_slice(&pseudo_random(10_000, 3));
        let mut zst = Vec::new();
        make(&base, &target, 3, &mut zst).unwrap();
        assert!(zst.len() < 30_000, "delta of a small change is small: {}", zst.len());

        let mut raw = Vec::new();
        decompress_bounded(&zst[..], &mut raw, raw_delta_limit(target.len() as u64)).unwrap();
        let mut out = Vec::new();
        apply(&base, &raw, target.len() as u64, &mut out).unwrap();
        assert_eq!(out, target);
    }

    #[test]
    fn signatures_are_checked_before_use() {
        let base = pseudo_random(100_000, 1);
        let good = signature_of(&base).into_serialized();
        let limit = signature_limit(100_000);
        assert!(parse_signature(good.clone(), limit).is_ok());
        assert_eq!(
            parse_signature(good[..5].to_vec(), limit).unwrap_err(),
            SignatureCheckError::TooShort(5)
        );
        assert_eq!(
            parse_signature(good[..good.len() - 3].to_vec(), limit).unwrap_err(),
            SignatureCheckError::Truncated
        );
        assert!(matches!(
            parse_signature(good.clone(), 100),
            Err(SignatureCheckError::TooLarge { .. })
        ));
        let mut bad = good.clone();
        bad[0] = 0;
        assert!(matches!(
            parse_signature(bad, limit),
            Err(SignatureCheckError::WrongMagic(_))
        ));
        let other = Signature::calculate(
            &base,
            SignatureOptions {
                block_size: 1024,
                crypto_hash_size: 8,
            },
        );
        assert_eq!(
            parse_signature(other.into_serialized(), usize::MAX).unwrap_err(),
            SignatureCheckError::BlockSize(1024)
        );
        let mut big_hash = good.clone();
        big_hash[8..12].copy_from_slice(&200u32.to_be_bytes());
        assert_eq!(
            parse_signature(big_hash, limit).unwrap_err(),
            SignatureCheckError::HashSize(200)
        );
    }

    #[test]
    fn wrong_length_and_garbage_are_errors() {
        let base = pseudo_random(100_000, 1);
        let target = pseudo_random(50_000, 4);
        let mut zst = Vec::new();
        make(&base, &target, 1, &mut zst).unwrap();
        let mut raw = Vec::new();
        decompress_bounded(&zst[..], &mut raw, raw_delta_limit(50_000)).unwrap();

        let mut out = Vec::new();
        assert!(apply(&base, &raw, 49_999, &mut out).is_err(), "output limit enforced");
        let mut out = Vec::new();
        assert!(matches!(
            apply(&base, &raw, 60_000, &mut out),
            Err(DeltaError::WrongLength { .. })
        ));
        let mut out = Vec::new();
        assert!(apply(&base, b"garbage", 10, &mut out).is_err());
        assert!(decompress_bounded(&b"not zstd"[..], &mut Vec::new(), 100).is_err());
        assert!(matches!(
            decompress_bounded(&zst[..], &mut Vec::new(), 100),
            Err(DeltaError::TooLarge { .. })
        ));
    }
}

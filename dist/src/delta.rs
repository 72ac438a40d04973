//! Binary deltas between images: fast_rsync (librsync format) deltas, zstd-compressed.
//!
//! The same format serves precomputed deltas in the repository and answers of the
//! rsync-style endpoint. A delta is untrusted input until the image it produces matches the
//! signed digest: fast_rsync's MD4 block matching gives no security of its own.

use std::io::{self, Read, Write};

use fast_rsync::{Signature, SignatureOptions};

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
    let mut enc = zstd::stream::write::Encoder::new(out, zstd_level)?;
    enc.include_checksum(true)?;
    fast_rsync::diff(&sig.index(), target, &mut enc).map_err(|e| match e {
        fast_rsync::DiffError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    })?;
    enc.finish()?;
    Ok(())
}

/// The largest zstd window (2^25 = 32 MiB) a payload or delta may use: what a host must
/// hold in memory to decode it. Publishers stay within it; hosts refuse more.
pub const MAX_WINDOW_LOG: u32 = 25;

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
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
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

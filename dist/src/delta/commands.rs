//! Reading and splicing librsync-format deltas (the format fast_rsync writes) without
//! applying them: which parts of the base a delta copies, and one delta from several.

use std::ops::Range;

const DELTA_MAGIC: [u8; 4] = 0x7273_0236u32.to_be_bytes();
const OP_END: u8 = 0;
const OP_LITERAL_64: u8 = 0x40;
const OP_LITERAL_N1: u8 = 0x41;
const OP_LITERAL_N8: u8 = 0x44;
const OP_COPY_N1_N1: u8 = 0x45;
const OP_COPY_N8_N8: u8 = 0x54;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("not a librsync delta (magic)")]
    Magic,
    #[error("delta ends inside a command at byte {0}")]
    Truncated(usize),
    #[error("unknown delta command {cmd:#04x} at byte {at}")]
    Unknown { cmd: u8, at: usize },
    #[error("{0} bytes after the delta's end command")]
    Trailing(usize),
}

/// The base ranges a raw delta copies, in the order it copies them.
pub fn copied_ranges(raw: &[u8]) -> Result<Vec<Range<u64>>, CommandError> {
    let mut copies = Vec::new();
    walk(raw, |cmd| {
        if let Command::Copy { offset, len } = cmd {
            copies.push(offset..offset.saturating_add(len));
        }
    })?;
    Ok(copies)
}

enum Command {
    Literal,
    Copy { offset: u64, len: u64 },
}

/// Walks a raw delta's commands; returns the offset of its end command.
fn walk(raw: &[u8], mut each: impl FnMut(Command)) -> Result<usize, CommandError> {
    if raw.get(..4) != Some(&DELTA_MAGIC[..]) {
        return Err(CommandError::Magic);
    }
    let mut at = 4;
    let int = |at: &mut usize, width: usize| -> Result<u64, CommandError> {
        let bytes = raw.get(*at..*at + width).ok_or(CommandError::Truncated(*at))?;
        *at += width;
        Ok(bytes.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b)))
    };
    loop {
        let cmd = *raw.get(at).ok_or(CommandError::Truncated(at))?;
        let start = at;
        at += 1;
        match cmd {
            OP_END => break,
            1..=OP_LITERAL_64 => {
                at += usize::from(cmd);
                each(Command::Literal);
            }
            OP_LITERAL_N1..=OP_LITERAL_N8 => {
                let n = int(&mut at, 1 << (cmd - OP_LITERAL_N1))?;
                at = usize::try_from(n)
                    .ok()
                    .and_then(|n| at.checked_add(n))
                    .ok_or(CommandError::Truncated(start))?;
                each(Command::Literal);
            }
            OP_COPY_N1_N1..=OP_COPY_N8_N8 => {
                let mode = cmd - OP_COPY_N1_N1;
                let offset = int(&mut at, 1 << (mode / 4))?;
                let len = int(&mut at, 1 << (mode % 4))?;
                each(Command::Copy { offset, len });
            }
            _ => return Err(CommandError::Unknown { cmd, at: start }),
        }
        if at > raw.len() {
            return Err(CommandError::Truncated(start));
        }
    }
    let end = at - 1;
    if at != raw.len() {
        return Err(CommandError::Trailing(raw.len() - at));
    }
    Ok(end)
}

/// Appends the commands of raw delta `part` to `whole` (a raw delta being built, or empty),
/// so that applying `whole` writes what applying each part in turn would.
pub fn splice(whole: &mut Vec<u8>, part: &[u8]) -> Result<(), CommandError> {
    let end = walk(part, |_| {})?;
    if whole.is_empty() {
        whole.extend_from_slice(&DELTA_MAGIC);
    } else {
        debug_assert_eq!(whole.last(), Some(&OP_END));
        whole.pop();
    }
    whole.extend_from_slice(&part[4..end]);
    whole.push(OP_END);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{signature_of, tests::pseudo_random};

    fn raw(base: &[u8], target: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        fast_rsync::diff(&signature_of(base).index(), target, &mut out).unwrap();
        out
    }

    #[test]
    fn copies_are_read_as_fast_rsync_wrote_them() {
        let base = pseudo_random(4 << 20, 1);
        let mut target = base[..300 * 4096].to_vec();
        target.extend_from_slice(&pseudo_random(10_000, 2));
        target.extend_from_slice(&base[500 * 4096..600 * 4096]);
        let copies = copied_ranges(&raw(&base, &target)).unwrap();
        assert_eq!(copies, vec![0..300 * 4096, 500 * 4096..600 * 4096]);
    }

    #[test]
    fn spliced_parts_apply_as_the_whole() {
        let base = pseudo_random(1 << 20, 3);
        let mut target = base.clone();
        target[70_000..75_000].copy_from_slice(&pseudo_random(5000, 4));
        let cut = 128 * 4096;
        let mut whole = Vec::new();
        splice(&mut whole, &raw(&base, &target[..cut])).unwrap();
        splice(&mut whole, &raw(&base, &target[cut..])).unwrap();
        let mut out = Vec::new();
        fast_rsync::apply(&base, &whole, &mut out).unwrap();
        assert!(out == target);
    }

    #[test]
    fn hostile_deltas_are_errors_not_panics() {
        let base = pseudo_random(100_000, 5);
        let good = raw(&base, &pseudo_random(50_000, 6));
        assert_eq!(copied_ranges(b"xx"), Err(CommandError::Magic));
        for cut in 4..good.len() {
            assert!(copied_ranges(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(copied_ranges(&trailing), Err(CommandError::Trailing(1)));
        let mut unknown = DELTA_MAGIC.to_vec();
        unknown.push(0x60);
        assert!(matches!(
            copied_ranges(&unknown),
            Err(CommandError::Unknown { cmd: 0x60, .. })
        ));
        let mut huge = DELTA_MAGIC.to_vec();
        huge.push(OP_LITERAL_N8);
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(copied_ranges(&huge).is_err());
    }
}

//! The boot flag: ChromeOS-compatible slot attributes in the GPT entry's attribute word.
//!
//! ```text
//! bit  63 … 57 | 56         | 55 … 52 | 51 … 48  | 47 … 0
//!      other   | successful | tries   | priority | other (e.g. bit 0 "required", bit 2 "legacy BIOS bootable")
//! ```
//!
//! * priority 0–15: 0 = never boot; the highest bootable priority boots.
//! * tries 0–15: boots left for a slot that has not yet been marked successful.
//! * successful: the slot booted and passed its health checks.
//!
//! These are the bits `cgpt add -P/-T/-S` and `cgpt show -P/-T/-S` use (and Flatcar and
//! Bottlerocket), so Google's tooling can read and repair what Atom writes. Bits outside
//! 48–56 belong to others and are always preserved.

const PRIORITY_SHIFT: u32 = 48;
const TRIES_SHIFT: u32 = 52;
const SUCCESSFUL_BIT: u64 = 1 << 56;
const NIBBLE: u64 = 0xf;
const OURS: u64 = (NIBBLE << PRIORITY_SHIFT) | (NIBBLE << TRIES_SHIFT) | SUCCESSFUL_BIT;

pub const MAX_PRIORITY: u8 = 15;
pub const MAX_TRIES: u8 = 15;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotFlags {
    pub priority: u8,
    pub tries: u8,
    pub successful: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what} {value} is out of range (0-15)")]
pub struct OutOfRange {
    pub what: &'static str,
    pub value: u8,
}

impl SlotFlags {
    pub fn new(priority: u8, tries: u8, successful: bool) -> Result<Self, OutOfRange> {
        if priority > MAX_PRIORITY {
            return Err(OutOfRange {
                what: "priority",
                value: priority,
            });
        }
        if tries > MAX_TRIES {
            return Err(OutOfRange {
                what: "tries",
                value: tries,
            });
        }
        Ok(SlotFlags {
            priority,
            tries,
            successful,
        })
    }

    pub fn from_attributes(bits: u64) -> Self {
        SlotFlags {
            priority: ((bits >> PRIORITY_SHIFT) & NIBBLE) as u8,
            tries: ((bits >> TRIES_SHIFT) & NIBBLE) as u8,
            successful: bits & SUCCESSFUL_BIT != 0,
        }
    }

    /// `bits` with our fields replaced and every other bit kept.
    pub fn apply_to(self, bits: u64) -> u64 {
        let mut out = bits & !OURS;
        out |= u64::from(self.priority.min(MAX_PRIORITY)) << PRIORITY_SHIFT;
        out |= u64::from(self.tries.min(MAX_TRIES)) << TRIES_SHIFT;
        if self.successful {
            out |= SUCCESSFUL_BIT;
        }
        out
    }

    /// The ChromeOS rule for "may be booted": some priority, and either known good or
    /// with tries left.
    pub fn is_bootable(self) -> bool {
        self.priority > 0 && (self.successful || self.tries > 0)
    }

    /// The flags of a slot whose boot failed before its init ran: out of tries and not
    /// successful, priority kept, so the selection rule skips it and the agent reports a
    /// fallback from it (as after tries running out), until an update rewrites it.
    pub fn failed(self) -> Self {
        SlotFlags {
            tries: 0,
            successful: false,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_positions_match_cgpt() {
        // cgpt add -P 15 -T 0 -S 0 → 0x000F_0000_0000_0000; -T 15 → 0x00F0_…; -S 1 → bit 56.
        assert_eq!(SlotFlags::new(15, 0, false).unwrap().apply_to(0), 0x000F_0000_0000_0000);
        assert_eq!(SlotFlags::new(0, 15, false).unwrap().apply_to(0), 0x00F0_0000_0000_0000);
        assert_eq!(SlotFlags::new(0, 0, true).unwrap().apply_to(0), 0x0100_0000_0000_0000);
        let f = SlotFlags::from_attributes(0x0135_0000_0000_0000);
        assert_eq!(
            f,
            SlotFlags {
                priority: 5,
                tries: 3,
                successful: true
            }
        );
    }

    #[test]
    fn other_bits_are_preserved() {
        let foreign = 0xFE00_FFFF_FFFF_FFFFu64;
        let bits = SlotFlags::new(2, 1, true).unwrap().apply_to(foreign);
        assert_eq!(bits & !OURS, foreign & !OURS);
        assert_eq!(SlotFlags::from_attributes(bits), SlotFlags::new(2, 1, true).unwrap());
        assert_eq!(SlotFlags::default().apply_to(u64::MAX), !OURS);
    }

    #[test]
    fn every_pattern_round_trips() {
        for p in 0..=15 {
            for t in 0..=15 {
                for s in [false, true] {
                    let f = SlotFlags::new(p, t, s).unwrap();
                    assert_eq!(SlotFlags::from_attributes(f.apply_to(0xdead_beef)), f);
                }
            }
        }
        assert!(SlotFlags::new(16, 0, false).is_err());
        assert!(SlotFlags::new(0, 16, false).is_err());
    }

    #[test]
    fn bootable_rule() {
        let b = |p, t, s| SlotFlags::new(p, t, s).unwrap().is_bootable();
        assert!(!b(0, 15, true), "priority 0 never boots");
        assert!(b(1, 0, true), "successful needs no tries");
        assert!(b(1, 1, false), "tries left");
        assert!(!b(1, 0, false), "out of tries and never successful");
    }
}

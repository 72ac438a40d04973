//! Named flag changes, checked in memory. Nothing here touches the disk: callers commit.

use crate::attrs::{MAX_PRIORITY, SlotFlags};
use crate::table::{BootTable, SlotName};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpError {
    #[error("tries must be 1-15, not {0}")]
    BadTries(u8),
    #[error("slot {0} is not bootable ({1}); refusing to make it the next boot")]
    NotBootable(SlotName, &'static str),
}

impl BootTable {
    /// The running slot passed its health checks: it stays the slot to boot.
    pub fn mark_successful(&mut self, slot: SlotName) {
        let f = self.slot(slot).flags;
        self.set_flags(
            slot,
            SlotFlags {
                successful: true,
                tries: 0,
                ..f
            },
        );
    }

    /// Takes a slot out of the running, e.g. before writing a new image into it or when
    /// the running slot failed its health checks ("mark bad").
    pub fn disable(&mut self, slot: SlotName) {
        self.set_flags(
            slot,
            SlotFlags {
                priority: 0,
                tries: 0,
                successful: false,
            },
        );
    }

    /// Makes a freshly written slot the next boot, on trial for `tries` boots: priority
    /// above the other slot, not successful. The other slot keeps its flags so it is the
    /// fallback.
    pub fn start_trial(&mut self, slot: SlotName, tries: u8) -> Result<(), OpError> {
        if tries == 0 || tries > 15 {
            return Err(OpError::BadTries(tries));
        }
        let priority = self.make_room_above(slot.other());
        self.set_flags(
            slot,
            SlotFlags {
                priority,
                tries,
                successful: false,
            },
        );
        Ok(())
    }

    /// Makes `slot` the next boot with the flags it has (used for rollback to the other,
    /// known-good slot). Refuses a slot that could not boot.
    pub fn prefer(&mut self, slot: SlotName) -> Result<(), OpError> {
        let f = self.slot(slot).flags;
        let candidate = SlotFlags {
            priority: f.priority.max(1),
            ..f
        };
        if let Some(why) = crate::select::why_not_bootable(candidate) {
            return Err(OpError::NotBootable(slot, why));
        }
        let priority = self.make_room_above(slot.other());
        self.set_flags(slot, SlotFlags { priority, ..f });
        Ok(())
    }

    /// A priority one above `below`'s, lowering `below` if it sits at the maximum.
    fn make_room_above(&mut self, below: SlotName) -> u8 {
        let other = self.slot(below).flags;
        if other.priority >= MAX_PRIORITY {
            self.set_flags(
                below,
                SlotFlags {
                    priority: MAX_PRIORITY - 1,
                    ..other
                },
            );
        }
        (self.slot(below).flags.priority + 1).min(MAX_PRIORITY)
    }
}

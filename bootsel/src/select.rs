//! The selection rule, as the ChromeOS firmware applies it, on slots in table order.
//!
//! Among slots with priority > 0 and (successful or tries > 0), the highest priority wins;
//! ties go to the slot that comes first in the partition table. A chosen slot that is not
//! yet successful spends one try, and that must be written to disk *before* the slot is
//! mounted, so a slot that crashes the machine every time runs out of tries and stops
//! being a candidate.

use std::fmt;

use crate::attrs::SlotFlags;

/// What the chooser decided for this boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Index into the slot list given to [`choose`].
    pub index: usize,
    /// Flags to write back before booting (tries spent); equal to the old ones for a
    /// successful slot.
    pub new_flags: SlotFlags,
    pub reason: Reason,
    /// A slot that would have been preferred but is no longer a candidate.
    pub fell_back_from: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The highest-priority slot is known good.
    Successful,
    /// The highest-priority slot is on trial; `tries_left` boots remain after this one.
    Trial { tries_left: u8 },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Successful => f.write_str("highest priority, marked successful"),
            Reason::Trial { tries_left } => write!(
                f,
                "highest priority, on trial ({tries_left} tries left after this boot)"
            ),
        }
    }
}

/// Why a slot is not a candidate.
pub fn why_not_bootable(flags: SlotFlags) -> Option<&'static str> {
    if flags.priority == 0 {
        Some("priority 0 (disabled)")
    } else if !flags.successful && flags.tries == 0 {
        Some("out of tries and never marked successful")
    } else {
        None
    }
}

/// Applies the rule; `None` when no slot is bootable.
pub fn choose(slots: &[SlotFlags]) -> Option<Decision> {
    let mut best: Option<usize> = None;
    for (i, f) in slots.iter().enumerate() {
        if f.is_bootable() && best.is_none_or(|b| f.priority > slots[b].priority) {
            best = Some(i);
        }
    }
    let index = best?;
    let chosen = slots[index];
    let (new_flags, reason) = if chosen.successful {
        (chosen, Reason::Successful)
    } else {
        let tries_left = chosen.tries - 1;
        (
            SlotFlags {
                tries: tries_left,
                ..chosen
            },
            Reason::Trial { tries_left },
        )
    };
    // A disabled slot (priority 0) was taken out on purpose; one with priority that lost
    // its tries is a failed update we are falling back from.
    let fell_back_from = slots.iter().enumerate().position(|(i, f)| {
        i != index
            && f.priority > 0
            && !f.is_bootable()
            && (f.priority > chosen.priority || (f.priority == chosen.priority && i < index))
    });
    Some(Decision {
        index,
        new_flags,
        reason,
        fell_back_from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(priority: u8, tries: u8, successful: bool) -> SlotFlags {
        SlotFlags::new(priority, tries, successful).unwrap()
    }

    #[test]
    fn highest_priority_successful_slot_boots_without_spending_tries() {
        let d = choose(&[f(1, 0, true), f(2, 0, true)]).unwrap();
        assert_eq!(d.index, 1);
        assert_eq!(d.reason, Reason::Successful);
        assert_eq!(d.new_flags, f(2, 0, true));
        assert_eq!(d.fell_back_from, None);
    }

    #[test]
    fn ties_go_to_table_order() {
        assert_eq!(choose(&[f(3, 0, true), f(3, 0, true)]).unwrap().index, 0);
        assert_eq!(
            choose(&[f(0, 0, true), f(3, 0, true), f(3, 5, false)]).unwrap().index,
            1
        );
    }

    #[test]
    fn trial_slot_spends_a_try() {
        let d = choose(&[f(1, 0, true), f(2, 3, false)]).unwrap();
        assert_eq!(d.index, 1);
        assert_eq!(d.new_flags, f(2, 2, false));
        assert_eq!(d.reason, Reason::Trial { tries_left: 2 });
    }

    #[test]
    fn tries_run_out_over_repeated_boots_then_fall_back() {
        let mut slots = vec![f(1, 0, true), f(2, 3, false)];
        for expected_left in [2, 1, 0] {
            let d = choose(&slots).unwrap();
            assert_eq!(d.index, 1, "B boots while it has tries");
            assert_eq!(
                d.reason,
                Reason::Trial {
                    tries_left: expected_left
                }
            );
            slots[d.index] = d.new_flags;
        }
        let d = choose(&slots).unwrap();
        assert_eq!(d.index, 0, "A boots once B is out of tries");
        assert_eq!(d.fell_back_from, Some(1));
        assert_eq!(d.reason, Reason::Successful);
        assert_eq!(d.new_flags, slots[0], "falling back to a good slot writes nothing");
    }

    #[test]
    fn disabled_slots_are_skipped_without_calling_it_a_fallback() {
        let d = choose(&[f(0, 5, false), f(1, 0, true)]).unwrap();
        assert_eq!(d.index, 1);
        assert_eq!(d.fell_back_from, None);
    }

    #[test]
    fn lower_priority_trial_loses_to_higher_successful() {
        assert_eq!(choose(&[f(2, 0, true), f(1, 5, false)]).unwrap().index, 0);
    }

    #[test]
    fn no_bootable_slot() {
        assert_eq!(choose(&[]), None);
        assert_eq!(choose(&[f(0, 0, true), f(0, 15, false)]), None);
        assert_eq!(choose(&[f(5, 0, false), f(0, 0, true)]), None);
        assert_eq!(
            why_not_bootable(f(5, 0, false)),
            Some("out of tries and never marked successful")
        );
        assert_eq!(why_not_bootable(f(0, 1, true)), Some("priority 0 (disabled)"));
        assert_eq!(why_not_bootable(f(1, 0, true)), None);
    }

    #[test]
    fn last_try_boots_once() {
        let d = choose(&[f(1, 0, true), f(2, 1, false)]).unwrap();
        assert_eq!(d.index, 1);
        assert_eq!(d.new_flags, f(2, 0, false));
    }
}

//! The Atom boot flag and slot chooser.
//!
//! This crate owns the meaning of the GPT slot attributes: [`attrs`] is the bit layout,
//! [`select`] the rule that picks the slot to boot, and [`table`] reads and writes them on
//! a real disk. The agent changes flags only through this crate. The `bootsel` binary is
//! both the initramfs `/init` and a debugging tool.

pub mod attrs;
pub mod etcmerge;
pub mod handover;
pub mod initconfig;
pub mod ops;
pub mod record;
pub mod select;
pub mod sysfs;
pub mod table;

pub use attrs::SlotFlags;
pub use table::{BootTable, SlotLabels, SlotName};

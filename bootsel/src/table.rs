//! The slots as stored on disk: both GPT copies read and checked, flag changes made in
//! memory and written by [`BootTable::commit`] in a power-loss-safe order.
//!
//! A GPT has a primary copy (header at LBA 1, entries from LBA 2) and a backup (header in
//! the last sector, entries just before it). Reading checks both. Writing always writes the
//! primary, flushes it to the device, then writes the backup and flushes again: a power cut
//! in the first write leaves the old backup intact, one in the second leaves the new
//! primary intact, so the disk never has zero valid tables. A copy that is corrupt or
//! differs from the other is rewritten from the good one on the next commit ("repair").

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use gptman::{GPTHeader, GPTPartitionEntry};

use crate::attrs::SlotFlags;
use crate::select::{self, Decision};

const ENTRY_SIZE: u32 = 128;
/// The UEFI minimum is 128 entries; nothing legitimate has more than a few thousand.
const MAX_ENTRIES: u32 = 4096;

/// The two slots; A is the first in every listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotName {
    A,
    B,
}

impl SlotName {
    pub fn other(self) -> SlotName {
        match self {
            SlotName::A => SlotName::B,
            SlotName::B => SlotName::A,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SlotName::A => "A",
            SlotName::B => "B",
        }
    }
}

impl std::fmt::Display for SlotName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SlotName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "A" | "a" => Ok(SlotName::A),
            "B" | "b" => Ok(SlotName::B),
            _ => Err(format!("slot {s:?} is not A or B")),
        }
    }
}

/// PARTLABELs that identify the slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotLabels {
    pub a: String,
    pub b: String,
}

impl Default for SlotLabels {
    fn default() -> Self {
        SlotLabels {
            a: "root-a".into(),
            b: "root-b".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub name: SlotName,
    pub label: String,
    /// 1-based partition number (the N in /dev/sdaN).
    pub partition: u32,
    pub part_uuid: String,
    pub flags: SlotFlags,
    pub offset_bytes: u64,
    pub size_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("i/o on the disk: {0}")]
    Io(#[from] io::Error),
    #[error("no GPT on the disk (neither a primary nor a backup header)")]
    NoGpt,
    #[error("both GPT copies are corrupt (primary: {primary}; backup: {backup})")]
    BothCorrupt { primary: String, backup: String },
    #[error("no partition labelled {0:?} in the GPT")]
    MissingSlot(String),
    #[error("more than one partition labelled {0:?}")]
    DuplicateSlot(String),
    #[error("cannot write the GPT: {0}")]
    Write(String),
    #[error("invalid GPT: {0}; refusing to use it (writing a slot could overwrite another partition)")]
    Geometry(String),
}

/// State of one GPT copy as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyState {
    Valid,
    Corrupt(String),
    /// Valid on its own but its entries differ from the other copy (an interrupted write).
    Stale,
}

struct Copy {
    header: GPTHeader,
    entries: Vec<GPTPartitionEntry>,
}

pub struct BootTable {
    sector_size: u64,
    primary_header: GPTHeader,
    backup_header: GPTHeader,
    entries: Vec<GPTPartitionEntry>,
    slots: [Slot; 2],
    primary_state: CopyState,
    backup_state: CopyState,
    dirty: bool,
}

fn read_copy(disk: &mut File, sector_size: u64, header_lba: u64, disk_sectors: u64) -> Result<Copy, String> {
    disk.seek(SeekFrom::Start(header_lba * sector_size))
        .map_err(|e| e.to_string())?;
    let header = GPTHeader::read_from(disk).map_err(|e| e.to_string())?;
    if header.primary_lba != header_lba {
        return Err(format!(
            "header at LBA {header_lba} says it is at LBA {}",
            header.primary_lba
        ));
    }
    // Checked before gptman allocates and reads the entry array: a hostile header must not
    // make us allocate gigabytes or seek past the disk.
    if header.size_of_partition_entry != ENTRY_SIZE {
        return Err(format!(
            "entry size {} is not supported (only {ENTRY_SIZE})",
            header.size_of_partition_entry
        ));
    }
    if header.number_of_partition_entries == 0 || header.number_of_partition_entries > MAX_ENTRIES {
        return Err(format!(
            "{} partition entries is out of range",
            header.number_of_partition_entries
        ));
    }
    let entry_sectors = (u64::from(header.number_of_partition_entries) * u64::from(ENTRY_SIZE)).div_ceil(sector_size);
    if header
        .partition_entry_lba
        .checked_add(entry_sectors)
        .is_none_or(|end| end > disk_sectors)
        || header.backup_lba >= disk_sectors
        || header.first_usable_lba > header.last_usable_lba
        || header.last_usable_lba >= disk_sectors
    {
        return Err("header points outside the disk".into());
    }
    // The usable area holds the partitions: it must leave out both tables, wherever this
    // copy's header is (LBA 0 the protective MBR, 1 the primary header and its entries
    // after it, the backup's entries and header at the end), or a slot there would overwrite
    // the table itself.
    let table_sectors = 1 + entry_sectors;
    if header.first_usable_lba <= table_sectors || header.last_usable_lba.saturating_add(table_sectors) >= disk_sectors
    {
        return Err("usable area overlaps the partition table itself".into());
    }
    let entries = header.read_partitions(disk, sector_size).map_err(|e| e.to_string())?;
    Ok(Copy { header, entries })
}

fn has_signature(disk: &mut File, offset: u64) -> io::Result<bool> {
    let mut sig = [0u8; 8];
    disk.seek(SeekFrom::Start(offset))?;
    match disk.read_exact(&mut sig) {
        Ok(()) => Ok(&sig == b"EFI PART"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn disk_len(disk: &mut File) -> io::Result<u64> {
    disk.seek(SeekFrom::End(0))
}

/// 512 unless a GPT signature is found where a 4096-byte-sector disk keeps it.
fn detect_sector_size(disk: &mut File) -> Result<u64, TableError> {
    let len = disk_len(disk)?;
    for ss in [512u64, 4096] {
        if len >= 2 * ss && (has_signature(disk, ss)? || has_signature(disk, (len / ss - 1) * ss)?) {
            return Ok(ss);
        }
    }
    Err(TableError::NoGpt)
}

fn same_table(a: &Copy, b: &Copy) -> bool {
    a.entries == b.entries
        && a.header.disk_guid == b.header.disk_guid
        && a.header.first_usable_lba == b.header.first_usable_lba
        && a.header.last_usable_lba == b.header.last_usable_lba
        && a.header.number_of_partition_entries == b.header.number_of_partition_entries
}

fn find_slot(entries: &[GPTPartitionEntry], name: SlotName, label: &str, ss: u64) -> Result<Slot, TableError> {
    let mut found = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.is_used() && e.partition_name.as_str() == label);
    let (i, e) = found.next().ok_or_else(|| TableError::MissingSlot(label.into()))?;
    if found.next().is_some() {
        return Err(TableError::DuplicateSlot(label.into()));
    }
    let bad = |why: String| TableError::Geometry(format!("slot {name} ({label}, partition {}): {why}", i + 1));
    if e.ending_lba < e.starting_lba {
        return Err(bad(format!(
            "ends (LBA {}) before it starts (LBA {})",
            e.ending_lba, e.starting_lba
        )));
    }
    // Checked: a start LBA of 2^55 times the sector size wraps to 0 (the protective MBR).
    let offset_bytes = e
        .starting_lba
        .checked_mul(ss)
        .ok_or_else(|| bad(format!("start LBA {} overflows a byte offset", e.starting_lba)))?;
    let size_bytes = (e.ending_lba - e.starting_lba + 1)
        .checked_mul(ss)
        .ok_or_else(|| bad("its size overflows".into()))?;
    Ok(Slot {
        name,
        label: label.into(),
        partition: i as u32 + 1,
        part_uuid: guid_string(&e.unique_partition_guid),
        flags: SlotFlags::from_attributes(e.attribute_bits),
        offset_bytes,
        size_bytes,
    })
}

/// Each slot lies within the usable LBAs and overlaps no other used partition (the other
/// slot, the ESP, the state partition): otherwise writing the inactive slot overwrites
/// the running one, or the table itself.
fn check_geometry(header: &GPTHeader, entries: &[GPTPartitionEntry], slots: &[Slot; 2]) -> Result<(), TableError> {
    for slot in slots {
        let e = &entries[slot.partition as usize - 1];
        if e.starting_lba < header.first_usable_lba || e.ending_lba > header.last_usable_lba {
            return Err(TableError::Geometry(format!(
                "slot {} (partition {}) spans LBAs {}..={}, outside the usable {}..={}",
                slot.name,
                slot.partition,
                e.starting_lba,
                e.ending_lba,
                header.first_usable_lba,
                header.last_usable_lba
            )));
        }
        for (j, other) in entries.iter().enumerate() {
            let overlaps = other.is_used()
                && j + 1 != slot.partition as usize
                && other.starting_lba <= e.ending_lba
                && e.starting_lba <= other.ending_lba;
            if overlaps {
                return Err(TableError::Geometry(format!(
                    "slot {} (partition {}, LBAs {}..={}) overlaps partition {} {:?} (LBAs {}..={})",
                    slot.name,
                    slot.partition,
                    e.starting_lba,
                    e.ending_lba,
                    j + 1,
                    other.partition_name.as_str(),
                    other.starting_lba,
                    other.ending_lba
                )));
            }
        }
    }
    Ok(())
}

/// GPT GUIDs are stored mixed-endian; this gives the usual text form (as blkid shows it).
pub fn guid_string(g: &[u8; 16]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
    )
}

impl BootTable {
    /// Reads both GPT copies and finds the slots. Succeeds as long as one copy is valid.
    pub fn load(disk: &mut File, labels: &SlotLabels) -> Result<Self, TableError> {
        let ss = detect_sector_size(disk)?;
        let len = disk_len(disk)?;
        let sectors = len / ss;
        let last_lba = sectors - 1;
        let primary = read_copy(disk, ss, 1, sectors);
        let backup_lba = primary.as_ref().map_or(last_lba, |p| p.header.backup_lba);
        let backup = read_copy(disk, ss, backup_lba, sectors);
        let (good, primary_state, backup_state) = match (&primary, &backup) {
            (Ok(p), Ok(b)) if same_table(p, b) => (p, CopyState::Valid, CopyState::Valid),
            // Both valid but different: a write was cut between the two copies. The primary
            // is written first, so it holds the newer table.
            (Ok(p), Ok(_)) => (p, CopyState::Valid, CopyState::Stale),
            (Ok(p), Err(e)) => (p, CopyState::Valid, CopyState::Corrupt(e.clone())),
            (Err(e), Ok(b)) => (b, CopyState::Corrupt(e.clone()), CopyState::Valid),
            (Err(pe), Err(be)) => {
                return Err(TableError::BothCorrupt {
                    primary: pe.clone(),
                    backup: be.clone(),
                });
            }
        };
        let entries = good.entries.clone();
        let entry_sectors = (u64::from(good.header.number_of_partition_entries) * u64::from(ENTRY_SIZE)).div_ceil(ss);
        let mut primary_header = good.header.clone();
        let mut backup_header = good.header.clone();
        if good.header.primary_lba == 1 {
            backup_header.primary_lba = good.header.backup_lba;
            backup_header.backup_lba = 1;
            backup_header.partition_entry_lba = good
                .header
                .backup_lba
                .checked_sub(entry_sectors)
                .filter(|lba| *lba > good.header.last_usable_lba)
                .ok_or_else(|| TableError::Geometry("the backup header leaves no room for its entries".into()))?;
        } else {
            primary_header.primary_lba = 1;
            primary_header.backup_lba = good.header.primary_lba;
            primary_header.partition_entry_lba = 2;
        }
        let slots = [
            find_slot(&entries, SlotName::A, &labels.a, ss)?,
            find_slot(&entries, SlotName::B, &labels.b, ss)?,
        ];
        check_geometry(&good.header, &entries, &slots)?;
        Ok(BootTable {
            sector_size: ss,
            primary_header,
            backup_header,
            entries,
            slots,
            primary_state,
            backup_state,
            dirty: false,
        })
    }

    /// The GPT name of partition `number` (1-based), from a valid copy of the table: how
    /// a partition device given by path maps to a slot label.
    pub fn partition_name(disk: &mut File, number: u32) -> Result<Option<String>, TableError> {
        let ss = detect_sector_size(disk)?;
        let sectors = disk_len(disk)? / ss;
        let good = match read_copy(disk, ss, 1, sectors) {
            Ok(p) => p,
            Err(primary) => read_copy(disk, ss, sectors - 1, sectors)
                .map_err(|backup| TableError::BothCorrupt { primary, backup })?,
        };
        Ok(number
            .checked_sub(1)
            .and_then(|i| good.entries.get(i as usize))
            .filter(|e| e.is_used())
            .map(|e| e.partition_name.as_str().to_owned()))
    }

    pub fn slots(&self) -> &[Slot; 2] {
        &self.slots
    }

    pub fn slot(&self, name: SlotName) -> &Slot {
        &self.slots[name as usize]
    }

    /// The disk GUID of the GPT (lower case, as blkid prints it).
    pub fn disk_guid(&self) -> String {
        guid_string(&self.primary_header.disk_guid)
    }

    pub fn sector_size(&self) -> u64 {
        self.sector_size
    }

    pub fn copy_states(&self) -> (&CopyState, &CopyState) {
        (&self.primary_state, &self.backup_state)
    }

    /// A copy is corrupt or out of date and the next commit will rewrite it.
    pub fn needs_repair(&self) -> bool {
        self.primary_state != CopyState::Valid || self.backup_state != CopyState::Valid
    }

    pub fn has_changes(&self) -> bool {
        self.dirty || self.needs_repair()
    }

    pub fn set_flags(&mut self, name: SlotName, flags: SlotFlags) {
        let slot = &mut self.slots[name as usize];
        if slot.flags != flags {
            slot.flags = flags;
            let e = &mut self.entries[slot.partition as usize - 1];
            e.attribute_bits = flags.apply_to(e.attribute_bits);
            self.dirty = true;
        }
    }

    /// The selection rule on this table, in partition-table order.
    pub fn decide(&self) -> Option<(SlotName, Decision)> {
        let ordered = self.in_table_order();
        let flags: Vec<SlotFlags> = ordered.iter().map(|s| s.flags).collect();
        let d = select::choose(&flags)?;
        let name = ordered[d.index].name;
        Some((name, d))
    }

    /// The slot a decision of [`Self::decide`] fell back from, by name.
    pub fn fallback_slot(&self, d: &Decision) -> Option<SlotName> {
        d.fell_back_from.map(|i| self.in_table_order()[i].name)
    }

    /// The selection rule breaks ties in partition-table order.
    fn in_table_order(&self) -> Vec<&Slot> {
        let mut ordered: Vec<&Slot> = self.slots.iter().collect();
        ordered.sort_by_key(|s| s.partition);
        ordered
    }

    /// Writes the table: primary, flush, backup, flush. Repairs a bad copy on the way.
    pub fn commit(&mut self, disk: &mut File) -> Result<(), TableError> {
        if !self.has_changes() {
            return Ok(());
        }
        let ss = self.sector_size;
        let write =
            |disk: &mut File, header: &mut GPTHeader, entries: &[GPTPartitionEntry]| -> Result<(), TableError> {
                header
                    .write_into(disk, ss, entries)
                    .map_err(|e| TableError::Write(e.to_string()))?;
                disk.flush()?;
                disk.sync_all()?;
                Ok(())
            };
        write(disk, &mut self.primary_header, &self.entries)?;
        self.primary_state = CopyState::Valid;
        write(disk, &mut self.backup_header, &self.entries)?;
        self.backup_state = CopyState::Valid;
        self.dirty = false;
        Ok(())
    }
}

impl BootTable {
    /// 1-based number of the partition with this label (e.g. the state partition).
    pub fn find_partition(&self, label: &str) -> Option<u32> {
        self.entries
            .iter()
            .position(|e| e.is_used() && e.partition_name.as_str() == label)
            .map(|i| i as u32 + 1)
    }
}

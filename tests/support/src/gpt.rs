//! Writing GPTs that partitioning tools refuse to write: overlapping or out-of-range
//! partitions with valid CRCs, as a hostile or broken disk could carry.

use std::fs::OpenOptions;
use std::path::Path;

/// Sets partition `number`'s (1-based) first and last LBA in both GPT copies, with the
/// CRCs recomputed, bypassing every boundary check.
pub fn set_geometry(disk: &Path, number: u32, first_lba: u64, last_lba: u64) {
    rewrite(disk, |gpt| {
        gpt[number].starting_lba = first_lba;
        gpt[number].ending_lba = last_lba;
    });
}

/// Sets the header's first usable LBA (both copies, CRCs recomputed).
pub fn set_first_usable(disk: &Path, lba: u64) {
    rewrite(disk, |gpt| gpt.header.first_usable_lba = lba);
}

fn rewrite(disk: &Path, change: impl FnOnce(&mut gptman::GPT)) {
    let mut f = OpenOptions::new().read(true).write(true).open(disk).unwrap();
    let mut gpt = gptman::GPT::find_from(&mut f).expect("a GPT");
    change(&mut gpt);
    let ss = gpt.sector_size;
    let partitions: Vec<gptman::GPTPartitionEntry> = (1..=gpt.header.number_of_partition_entries)
        .map(|i| gpt[i].clone())
        .collect();
    let mut primary = gpt.header.clone();
    let mut backup = gpt.header.clone();
    if primary.primary_lba != 1 {
        std::mem::swap(&mut primary, &mut backup);
    }
    backup.primary_lba = primary.backup_lba;
    backup.backup_lba = 1;
    backup.partition_entry_lba = primary.last_usable_lba + 1;
    primary.write_into(&mut f, ss, &partitions).unwrap();
    backup.write_into(&mut f, ss, &partitions).unwrap();
    f.sync_all().unwrap();
}

/// Partition `number`'s first and last LBA.
pub fn geometry(disk: &Path, number: u32) -> (u64, u64) {
    let mut f = std::fs::File::open(disk).unwrap();
    let gpt = gptman::GPT::find_from(&mut f).expect("a GPT");
    (gpt[number].starting_lba, gpt[number].ending_lba)
}

//! A disk's partition tables as bootsel reads them at boot (both GPT copies, the entries,
//! the slot attributes), and the repair write-back.
#![no_main]
use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small disk: the fuzzer's bytes at the front (MBR, primary header and entries) and,
    // mirrored, at the end where the backup copy lives.
    let mut disk = vec![0u8; 256 * 1024];
    let n = data.len().min(disk.len() / 2);
    disk[..n].copy_from_slice(&data[..n]);
    let tail = disk.len() - n;
    disk[tail..].copy_from_slice(&data[..n]);
    let mut f = tempfile::tempfile().expect("tempfile");
    f.write_all(&disk).expect("write");
    let labels = bootsel::SlotLabels::default();
    if let Ok(mut table) = bootsel::BootTable::load(&mut f, &labels) {
        let _ = table.decide();
        if table.needs_repair() {
            let _ = table.commit(&mut f);
        }
    }
    let _ = bootsel::BootTable::partition_name(&mut f, 1);
});

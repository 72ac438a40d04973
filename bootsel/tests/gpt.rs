//! bootsel on real GPT disk images: cgpt interoperability both ways, every corruption case
//! and repair, and the tries rule over repeated boots.

mod common;

use std::fs::File;

use bootsel::table::CopyState;
use bootsel::{BootTable, SlotFlags, SlotLabels, SlotName};
use common::*;

fn load(disk: &std::path::Path) -> BootTable {
    BootTable::load(&mut File::open(disk).unwrap(), &SlotLabels::default()).unwrap()
}

fn flags(disk: &std::path::Path, slot: SlotName) -> SlotFlags {
    load(disk).slot(slot).flags
}

#[test]
fn bootsel_writes_what_cgpt_reads() {
    let (_d, disk) = scratch();
    for (p, t, s) in [(15u8, 0u8, 1u8), (2, 7, 0), (0, 15, 1), (1, 1, 0)] {
        bootsel_ok(
            &[
                "set",
                "--slot",
                "B",
                "--priority",
                &p.to_string(),
                "--tries",
                &t.to_string(),
                "--successful",
                &s.to_string(),
            ],
            &disk,
        );
        assert_eq!(
            (
                cgpt_field(&disk, 3, "-P"),
                cgpt_field(&disk, 3, "-T"),
                cgpt_field(&disk, 3, "-S")
            ),
            (p, t, s)
        );
        // Slot A untouched.
        assert_eq!(
            (
                cgpt_field(&disk, 2, "-P"),
                cgpt_field(&disk, 2, "-T"),
                cgpt_field(&disk, 2, "-S")
            ),
            (0, 0, 0)
        );
    }
}

#[test]
fn cgpt_writes_what_bootsel_reads() {
    let (_d, disk) = scratch();
    for (p, t, s) in [(15u8, 0u8, 1u8), (3, 9, 0), (0, 15, 1), (1, 1, 0)] {
        cgpt_set(&disk, 2, p, t, s);
        assert_eq!(flags(&disk, SlotName::A), SlotFlags::new(p, t, s == 1).unwrap());
        let status = bootsel_ok(&["status"], &disk);
        assert!(
            status.contains("GPT primary: valid; backup: valid"),
            "cgpt keeps both copies valid: {status}"
        );
    }
    let json: serde_json::Value = serde_json::from_str(&bootsel_ok(&["status", "--json"], &disk)).unwrap();
    assert_eq!(json["slots"][0]["label"], "root-a");
    assert_eq!(json["slots"][0]["tries"], 1);
    assert_eq!(json["next_boot"], "A");
    assert_eq!(
        json["slots"][0]["kernel"],
        serde_json::Value::Null,
        "no record, no kernel"
    );

    // The boot record names the booted slot and its kernel: status shows it on that row.
    let record = disk.with_extension("boot.toml");
    std::fs::write(
        &record,
        format!(
            "slot = \"B\"\nlabel = \"root-b\"\npartition = 3\npartuuid = \"{}\"\ndisk = \"x\"\n\
             reason = \"trial\"\ntrial = true\ntries_left = 1\nstate = \"none\"\nkernel = \"6.1.0-57-amd64\"\n",
            common::cgpt_uuid(&disk, 3).to_ascii_uppercase()
        ),
    )
    .unwrap();
    let rec = record.to_str().unwrap();
    let status = bootsel_ok(&["status", "--record", rec], &disk);
    let b_row = status.lines().find(|l| l.starts_with("B ")).unwrap();
    assert!(b_row.contains("6.1.0-57-amd64 (booted)"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(&bootsel_ok(&["status", "--json", "--record", rec], &disk)).unwrap();
    assert_eq!(json["slots"][1]["kernel"], "6.1.0-57-amd64");
    assert_eq!(json["slots"][1]["booted"], true);
    assert_eq!(json["slots"][0]["booted"], false);
}

#[test]
fn new_slot_on_trial_runs_out_of_tries_and_falls_back() {
    let (_d, disk) = scratch();
    cgpt_set(&disk, 2, 1, 0, 1); // A: good
    cgpt_set(&disk, 3, 2, 3, 0); // B: new, 3 tries
    for left in [2, 1, 0] {
        let out = bootsel_ok(&["choose"], &disk);
        assert!(out.starts_with("boot B"), "{out}");
        assert!(out.contains(&format!("{left} tries left")), "{out}");
        assert_eq!(cgpt_field(&disk, 3, "-T"), left, "try spent on disk");
    }
    let out = bootsel_ok(&["choose"], &disk);
    assert!(out.starts_with("boot A"), "{out}");
    assert!(out.contains("fell back from B"), "{out}");
    // A dry run never writes.
    cgpt_set(&disk, 3, 2, 3, 0);
    let before = std::fs::read(&disk).unwrap();
    let out = bootsel_ok(&["choose", "--dry-run"], &disk);
    assert!(out.contains("dry run"), "{out}");
    assert!(std::fs::read(&disk).unwrap() == before, "dry run changed the disk");
}

#[test]
fn ties_go_to_table_order_on_disk() {
    let (_d, disk) = scratch();
    cgpt_set(&disk, 2, 5, 0, 1);
    cgpt_set(&disk, 3, 5, 0, 1);
    assert!(bootsel_ok(&["choose", "--dry-run"], &disk).starts_with("boot A"));
}

#[test]
fn no_bootable_slot_exits_4() {
    let (_d, disk) = scratch();
    let out = bootsel(&["choose"], &disk);
    assert_eq!(out.status.code(), Some(4));
    let status = bootsel_ok(&["status"], &disk);
    assert!(status.contains("next boot: NONE"), "{status}");
    assert!(status.contains("priority 0 (disabled)"), "{status}");
}

/// Corrupts one GPT structure, checks bootsel still reads the table from the other copy,
/// reports the damage, and repairs it on the next write so that cgpt sees a clean disk.
fn corrupt_and_repair(offset_of: impl Fn(u64) -> u64, primary_broken: bool) {
    let (_d, disk) = scratch();
    cgpt_set(&disk, 2, 1, 0, 1);
    flip(&disk, offset_of(disk_len(&disk)));
    let table = load(&disk);
    let (p, b) = table.copy_states();
    assert_eq!(matches!(p, CopyState::Corrupt(_)), primary_broken, "primary {p:?}");
    assert_eq!(matches!(b, CopyState::Corrupt(_)), !primary_broken, "backup {b:?}");
    assert_eq!(
        table.slot(SlotName::A).flags,
        SlotFlags::new(1, 0, true).unwrap(),
        "read from the good copy"
    );
    let status = bootsel_ok(&["status"], &disk);
    assert!(status.contains("corrupt"), "{status}");

    bootsel_ok(
        &[
            "set",
            "--slot",
            "B",
            "--priority",
            "2",
            "--tries",
            "1",
            "--successful",
            "0",
        ],
        &disk,
    );
    let table = load(&disk);
    assert_eq!(table.copy_states(), (&CopyState::Valid, &CopyState::Valid), "repaired");
    let cgpt = ok(std::process::Command::new("cgpt").arg("show").arg(&disk));
    assert!(!cgpt.to_lowercase().contains("invalid"), "{cgpt}");
    assert_eq!(cgpt_field(&disk, 3, "-P"), 2);
    assert_eq!(cgpt_field(&disk, 2, "-S"), 1);
}

#[test]
fn corrupt_primary_header_is_repaired() {
    corrupt_and_repair(|_| 512 + 24, true);
}

#[test]
fn corrupt_primary_entries_are_repaired() {
    corrupt_and_repair(|_| 1024 + 128 + 40, true);
}

#[test]
fn corrupt_backup_header_is_repaired() {
    corrupt_and_repair(|len| len - 512 + 24, false);
}

#[test]
fn corrupt_backup_entries_are_repaired() {
    corrupt_and_repair(|len| len - 512 - 32 * 512 + 128 + 40, false);
}

#[test]
fn interrupted_write_keeps_the_newer_primary() {
    let (_d, disk) = scratch();
    cgpt_set(&disk, 2, 1, 0, 1);
    let len = disk_len(&disk);
    let backup_start = len - 33 * 512;
    let old_backup = std::fs::read(&disk).unwrap()[backup_start as usize..].to_vec();
    bootsel_ok(&["set", "--slot", "B", "--priority", "2", "--tries", "3"], &disk);
    // Undo the backup half of the write, as a power cut between the two flushes would.
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&old_backup, backup_start)
        .unwrap();
    let table = load(&disk);
    assert_eq!(table.copy_states().1, &CopyState::Stale);
    assert_eq!(table.slot(SlotName::B).flags.priority, 2, "newer primary wins");
    bootsel_ok(&["choose"], &disk);
    assert_eq!(load(&disk).copy_states(), (&CopyState::Valid, &CopyState::Valid));
}

#[test]
fn unusable_disks_give_clear_errors() {
    let (_d, disk) = scratch();
    let len = disk_len(&disk);
    flip(&disk, 512 + 24);
    flip(&disk, len - 512 + 24);
    let out = bootsel(&["status"], &disk);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("both GPT copies are corrupt"));

    let blank = _d.path().join("blank.img");
    File::create(&blank).unwrap().set_len(8 << 20).unwrap();
    let out = bootsel(&["status"], &blank);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no GPT"));

    let (_d2, disk2) = scratch();
    let out = bootsel(&["status", "--labels", "system-a,system-b"], &disk2);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no partition labelled \"system-a\""));

    let out = bootsel(&["status"], &_d.path().join("missing"));
    assert_eq!(out.status.code(), Some(1));
    let out = bootsel(&["frobnicate"], &disk2);
    assert_eq!(out.status.code(), Some(2));
    let out = bootsel(&["set", "--slot", "C"], &disk2);
    assert_eq!(out.status.code(), Some(2));
    let out = bootsel(&["set", "--slot", "A", "--priority", "16"], &disk2);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn agent_operations_on_disk() {
    let (_d, disk) = scratch();
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&disk).unwrap();
    let mut t = BootTable::load(&mut f, &SlotLabels::default()).unwrap();
    t.set_flags(SlotName::A, SlotFlags::new(15, 0, true).unwrap());
    t.disable(SlotName::B);
    t.commit(&mut f).unwrap();
    t.start_trial(SlotName::B, 3).unwrap();
    t.commit(&mut f).unwrap();
    assert_eq!(
        (
            cgpt_field(&disk, 3, "-P"),
            cgpt_field(&disk, 3, "-T"),
            cgpt_field(&disk, 3, "-S")
        ),
        (15, 3, 0)
    );
    assert_eq!(
        cgpt_field(&disk, 2, "-P"),
        14,
        "room made above A at the maximum priority"
    );
    assert_eq!(t.decide().unwrap().0, SlotName::B);
    t.mark_successful(SlotName::B);
    t.commit(&mut f).unwrap();
    assert_eq!(cgpt_field(&disk, 3, "-S"), 1);
    t.prefer(SlotName::A).unwrap();
    t.commit(&mut f).unwrap();
    assert_eq!(t.decide().unwrap().0, SlotName::A, "rollback to A");
    t.disable(SlotName::B);
    assert!(
        t.prefer(SlotName::B).is_err(),
        "a disabled, never-good slot cannot be preferred"
    );
    assert!(t.start_trial(SlotName::B, 0).is_err());
}

/// Tables with valid CRCs but impossible geometry (what a hostile or broken disk can carry):
/// a slot over the other slot, over the ESP, outside the usable LBAs, or at an LBA whose byte
/// offset overflows. Every reader refuses them, and `status` calls them invalid.
#[test]
fn slot_geometry_that_could_overwrite_other_partitions_is_refused() {
    use atom_test_support::gpt::{geometry, set_geometry};
    let (_d, disk) = scratch();
    let (a_first, a_last) = geometry(&disk, 2);
    let (esp_first, _) = geometry(&disk, 1);
    let (b_first, b_last) = geometry(&disk, 3);
    for (first, last, want) in [
        (a_first, a_last, "overlaps partition 3 \"root-b\""),
        (esp_first, esp_first + 100, "overlaps partition 1 \"esp\""),
        (b_first, u64::MAX / 2, "its size overflows"),
        (1u64 << 55, (1u64 << 55) + 10, "overflows a byte offset"),
        (b_first, (96 << 20) / 512 - 10, "outside the usable"),
        (b_last, b_first, "ends (LBA"),
    ] {
        set_geometry(&disk, 3, first, last);
        for args in [&["status"][..], &["status", "--json"], &["choose", "--dry-run"]] {
            let out = bootsel(args, &disk);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?} {first}..={last}: {err}");
            assert!(
                err.contains("invalid GPT") && err.contains(want),
                "{args:?} {first}..={last}: {err}"
            );
        }
    }
    set_geometry(&disk, 3, b_first, b_last);
    assert!(bootsel_ok(&["status"], &disk).contains("next boot"));

    // A header whose usable area takes in the table itself, and a slot there.
    atom_test_support::gpt::set_first_usable(&disk, 1);
    set_geometry(&disk, 3, 1, 100);
    let out = bootsel(&["status"], &disk);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("usable area overlaps the partition table itself"), "{err}");
}

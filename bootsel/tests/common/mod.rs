//! Real GPT disk images for the bootsel tests, made with sfdisk and inspected with cgpt.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_bootsel");

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn bootsel(args: &[&str], disk: &Path) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).arg("--disk").arg(disk);
    run(&mut c)
}

pub fn bootsel_ok(args: &[&str], disk: &Path) -> String {
    let mut c = Command::new(BIN);
    c.args(args).arg("--disk").arg(disk);
    ok(&mut c)
}

/// A 96 MiB GPT disk: esp (1), root-a (2), root-b (3), state (4).
pub fn make_disk(path: &Path) {
    std::fs::File::create(path).unwrap().set_len(96 << 20).unwrap();
    let script = "label: gpt\n\
        size=8MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\n\
        size=32MiB, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name=root-a\n\
        size=32MiB, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name=root-b\n\
        type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=state\n";
    let mut child = Command::new("sfdisk")
        .arg("--quiet")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sfdisk (package fdisk) is needed");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
}

/// `cgpt show -i N -P|-T|-S DISK`, as a number.
pub fn cgpt_field(disk: &Path, partition: u32, flag: &str) -> u8 {
    let out = ok(Command::new("cgpt")
        .args(["show", "-i", &partition.to_string(), flag])
        .arg(disk));
    out.trim().parse().unwrap_or_else(|_| panic!("cgpt printed {out:?}"))
}

pub fn cgpt_set(disk: &Path, partition: u32, p: u8, t: u8, s: u8) {
    ok(Command::new("cgpt")
        .args([
            "add",
            "-i",
            &partition.to_string(),
            "-P",
            &p.to_string(),
            "-T",
            &t.to_string(),
            "-S",
            &s.to_string(),
        ])
        .arg(disk));
}

pub fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk);
    (dir, disk)
}

/// Flips one byte of the file at `offset`.
pub fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
}

pub fn disk_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// The unique partition GUID of partition `n`, lower case (as the hand-over spells it).
pub fn cgpt_uuid(disk: &Path, partition: u32) -> String {
    ok(Command::new("cgpt")
        .args(["show", "-i", &partition.to_string(), "-u"])
        .arg(disk))
    .trim()
    .to_ascii_lowercase()
}

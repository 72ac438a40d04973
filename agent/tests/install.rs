//! `atom-install` onto real loop-device disks, from a medium made by the real
//! `atom-build installer --medium-dir`: the installed disk is read back with sfdisk, cgpt
//! and e2fsck; tampered, truncated, wrongly signed and interrupted installs leave no
//! bootable table (and the kept partitions). Runs as root.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{detach_if_backed_by, ok, sibling};

const INSTALL: &str = env!("CARGO_BIN_EXE_atom-install");
const MIB: u64 = 1 << 20;

struct Loop {
    dev: String,
    file: PathBuf,
}

impl Loop {
    /// A disk of `mib` MiB; with `script`, partitioned by sfdisk first.
    fn new(file: &Path, mib: u64, script: Option<&str>) -> Loop {
        match script {
            Some(s) => common::partitioned_file(file, mib * MIB, s),
            None => fs::File::create(file).unwrap().set_len(mib * MIB).unwrap(),
        }
        let dev = ok(Command::new("losetup").args(["-f", "--show", "-P"]).arg(file))
            .trim()
            .to_string();
        Loop {
            dev,
            file: file.to_path_buf(),
        }
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = fs::File::open(&self.dev).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).unwrap();
        buf
    }

    fn write(&self, offset: u64, bytes: &[u8]) {
        let mut f = fs::OpenOptions::new().write(true).open(&self.dev).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
    }

    /// sfdisk's view: (name, start sector, sectors) of each partition; None without a table.
    fn partitions(&self) -> Option<Vec<(String, u64, u64)>> {
        let out = Command::new("sfdisk").arg("--json").arg(&self.dev).output().unwrap();
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        Some(
            v["partitiontable"]["partitions"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap_or_default().to_string(),
                        p["start"].as_u64().unwrap(),
                        p["size"].as_u64().unwrap(),
                    )
                })
                .collect(),
        )
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        detach_if_backed_by(&self.dev, &self.file);
    }
}

struct Setup {
    dir: tempfile::TempDir,
    /// The slot image of 1.0.0 and the medium holding the disk built from it.
    image: Vec<u8>,
    medium: PathBuf,
}

impl Setup {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// 1.0.0 published (single key), a hybrid disk of it, its medium.
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let p = |s: &str| dir.path().join(s);
        let build = || Command::new(sibling("atom-build"));
        ok(build().args(["keygen", "--out"]).arg(p("signer")));
        fs::create_dir_all(p("keys")).unwrap();
        fs::copy(p("signer.pub"), p("keys/signer.pub")).unwrap();
        common::tree(&p("tree"), 1);
        ok(build()
            .args([
                "image",
                "--kernel",
                "none",
                "--size",
                "32M",
                "--version",
                "1.0.0",
                "--rootfs",
            ])
            .arg(p("tree"))
            .arg("--out")
            .arg(p("v1.img")));
        ok(build()
            .args(["publish", "--channel", "stable", "--zstd-level", "3", "--repo"])
            .arg(p("repo"))
            .arg("--key")
            .arg(p("signer.key"))
            .arg(p("v1.img")));
        fs::write(p("vmlinuz"), common::bytes(1 << 20, 7)).unwrap();
        fs::write(p("initrd.img"), common::bytes(1 << 19, 8)).unwrap();
        let mut efi = b"MZ".to_vec();
        efi.extend(common::bytes(40_000, 9));
        fs::write(p("BOOTX64.EFI"), efi).unwrap();
        ok(build()
            .args(["disk", "--image"])
            .arg(p("v1.img"))
            .arg("--kernel")
            .arg(p("vmlinuz"))
            .arg("--initramfs")
            .arg(p("initrd.img"))
            .arg("--bootloader")
            .arg(p("BOOTX64.EFI"))
            .args(["--esp-size", "16M", "--state-size", "16M", "--out"])
            .arg(p("disk.img")));
        ok(build()
            .args(["installer", "--disk"])
            .arg(p("disk.img"))
            .arg("--repo")
            .arg(p("repo"))
            .arg("--key")
            .arg(p("signer.key"))
            .arg("--medium-dir")
            .arg(p("medium")));
        let image = fs::read(p("v1.img")).unwrap();
        Setup {
            medium: p("medium"),
            image,
            dir,
        }
    }

    fn install(&self, medium: &Path, target: &Loop, extra: &[&str]) -> Output {
        Command::new(INSTALL)
            .arg("--medium")
            .arg(medium)
            .arg("--keys")
            .arg(self.path("keys"))
            .arg("--target")
            .arg(&target.dev)
            .args(extra)
            .output()
            .unwrap()
    }

    /// A copy of the medium whose disk has one byte of root-a changed, recompressed and
    /// padded with a zstd skippable frame to the signed compressed size.
    fn tampered_medium(&self, name: &str, at: usize) -> PathBuf {
        let dir = self.path(name);
        ok(Command::new("cp").arg("-a").arg(&self.medium).arg(&dir));
        let zst = dir.join("disk.img.zst");
        let want = fs::metadata(&zst).unwrap().len() as usize;
        let mut disk = zstd::decode_all(fs::File::open(&zst).unwrap()).unwrap();
        disk[at] ^= 0x40;
        let mut packed = zstd::encode_all(&disk[..], 19).unwrap();
        assert!(packed.len() + 8 <= want, "the tampered disk compresses larger");
        let pad = want - packed.len() - 8;
        packed.extend(0x184D_2A50u32.to_le_bytes());
        packed.extend((pad as u32).to_le_bytes());
        packed.extend(vec![0u8; pad]);
        fs::write(&zst, packed).unwrap();
        dir
    }
}

fn fails(out: Output, needle: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "atom-install succeeded:\n{err}");
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    err
}

const OLD_TABLE: &str = "label: gpt\nsize=60MiB, name=old-root\nsize=60MiB, name=old-home\nname=data\n";

#[test]
fn installs_verified_grows_state_and_keeps_named_partitions() {
    let s = Setup::new();
    let target = Loop::new(&s.path("target.img"), 256, Some(OLD_TABLE));
    let old = target.partitions().unwrap();
    let (_, data_start, data_len) = old[2].clone();
    let data = common::bytes(1 << 20, 42);
    target.write(data_start * 512, &data);

    let out = s.install(&s.medium, &target, &["--keep-partlabel", "dat?", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["version"], "1.0.0");
    assert_eq!(done["warnings"], serde_json::json!([]), "{done}");

    let parts = target.partitions().expect("a partition table");
    let names: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["esp", "root-a", "root-b", "state", "data"], "{parts:?}");
    assert_eq!(
        (parts[4].1, parts[4].2),
        (data_start, data_len),
        "the kept partition stays where it was"
    );
    assert_eq!(target.read(data_start * 512, data.len()), data, "and keeps its data");
    let (_, state_start, state_len) = parts[3];
    assert_eq!(
        state_start + state_len,
        data_start / 2048 * 2048,
        "state grows up to the kept partition"
    );
    assert!(state_len * 512 > 32 * MIB, "state grew past its 16 MiB: {state_len}");

    // root-a holds the published image, marked good (cgpt as a second opinion).
    let (_, a_start, _) = parts[1];
    assert!(
        target.read(a_start * 512, s.image.len()) == s.image,
        "root-a is the image"
    );
    let cgpt = |flag: &str| {
        ok(Command::new("cgpt").args(["show", "-i", "2", flag]).arg(&target.dev))
            .trim()
            .to_string()
    };
    assert_eq!((cgpt("-P"), cgpt("-S")), ("1".into(), "1".into()));
    assert_eq!(cgpt("-l"), "root-a");

    // The state filesystem fills its partition and is clean.
    let state = format!("{}p4", target.dev);
    ok(Command::new("e2fsck").args(["-f", "-n"]).arg(&state));
    let info = ok(Command::new("dumpe2fs").arg("-h").arg(&state));
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(field("Block count:") * field("Block size:"), state_len * 512);
    assert_eq!(done["state_bytes"].as_u64(), Some(state_len * 512));
}

#[test]
fn a_tampered_truncated_or_wrongly_signed_medium_leaves_nothing_bootable() {
    let s = Setup::new();
    let target = Loop::new(&s.path("target.img"), 256, Some(OLD_TABLE));
    let old = target.partitions().unwrap();

    // Wrong keys: refused before the target is touched.
    let other = s.path("other");
    ok(Command::new(sibling("atom-build"))
        .args(["keygen", "--out"])
        .arg(&other));
    fs::create_dir_all(s.path("otherkeys")).unwrap();
    fs::copy(s.path("other.pub"), s.path("otherkeys/other.pub")).unwrap();
    let out = Command::new(INSTALL)
        .arg("--medium")
        .arg(&s.medium)
        .arg("--keys")
        .arg(s.path("otherkeys"))
        .arg("--target")
        .arg(&target.dev)
        .output()
        .unwrap();
    fails(out, "is refused");
    assert_eq!(target.partitions().as_ref(), Some(&old), "the target is untouched");

    // A pattern to keep that matches nothing (a typo): refused before anything is cleared.
    let err = fails(
        s.install(&s.medium, &target, &["--keep-partlabel", "dta"]),
        "matches no partition",
    );
    assert!(err.contains("\"data\""), "the error lists the partitions there: {err}");
    assert_eq!(target.partitions().as_ref(), Some(&old), "the target is untouched");

    // Too small a target: refused before anything is cleared.
    let small = Loop::new(&s.path("small.img"), 60, Some("label: gpt\nname=keepme\n"));
    let before = small.partitions();
    fails(s.install(&s.medium, &small, &[]), "the image's partitions need");
    assert_eq!(small.partitions(), before);

    // Tampered: written, found out by the digest, no table; the kept partition survives.
    // A changed partition table (the image's first MiB): refused before it is parsed.
    let head = s.tampered_medium("tampered-head", 1024 + 128 + 40);
    fails(s.install(&head, &target, &[]), "does not match the signed description");
    assert_eq!(target.partitions().as_ref(), Some(&old), "the target is untouched");

    let root_a = 17 * MIB as usize; // 1 MiB + the 16 MiB ESP
    let tampered = s.tampered_medium("tampered", root_a + 5000);
    let err = fails(
        s.install(&tampered, &target, &["--keep-partlabel", "data"]),
        "the image was changed",
    );
    assert!(err.contains("nothing bootable was written"), "{err}");
    let left = target.partitions().expect("the kept partition's table");
    assert_eq!(left.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), ["data"]);
    // Without kept partitions: no table at all, no boot code.
    fails(s.install(&tampered, &target, &[]), "the image was changed");
    assert_eq!(target.partitions(), None);
    assert!(
        target.read(0, 1 << 20).iter().all(|&b| b == 0),
        "the first MiB is clear"
    );

    // Truncated: the compressed size is not the signed one.
    let cut = s.path("cut");
    ok(Command::new("cp").arg("-a").arg(&s.medium).arg(&cut));
    let zst = cut.join("disk.img.zst");
    let len = fs::metadata(&zst).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&zst)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    fails(s.install(&cut, &target, &[]), "the medium is damaged or was changed");

    // A good install still works on the same disk afterwards.
    let out = s.install(&s.medium, &target, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(target.partitions().unwrap().len(), 4);
}

#[test]
fn an_interrupted_install_leaves_no_table() {
    let s = Setup::new();
    let target = Loop::new(&s.path("target.img"), 256, None);
    // A first install, so the disk had a bootable table before the interrupted one.
    assert!(s.install(&s.medium, &target, &[]).status.success());
    let out = Command::new(INSTALL)
        .arg("--medium")
        .arg(&s.medium)
        .arg("--keys")
        .arg(s.path("keys"))
        .arg("--target")
        .arg(&target.dev)
        .env("ATOM_UPDATE_FAILPOINT", "install-chunk:30")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(target.partitions(), None, "killed midway: no table to boot from");
    let out = Command::new(INSTALL)
        .arg("--medium")
        .arg(&s.medium)
        .arg("--verify-only")
        .arg("--keys")
        .arg(s.path("keys"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("1.0.0"), "{text}");
}

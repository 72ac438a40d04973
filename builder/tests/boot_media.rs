//! `atom-build initramfs` and `atom-build disk` on real files, read back with independent
//! tools: the cpio reader, sfdisk, cgpt, mtools, e2fsck. (The VM test, tests/vm.sh, boots
//! them.)

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{atom_build, fails_with, make_tree, ok};

/// busybox-static is a static executable, as bootsel must be.
const STATIC_EXE: &str = "/bin/busybox";

fn fake_modules(dir: &Path) {
    for m in [
        "kernel/fs/ext4/ext4.ko",
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/lib/crc16.ko",
        "kernel/drivers/block/virtio_blk.ko",
    ] {
        let p = dir.join(m);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, format!("module {m}")).unwrap();
    }
    let zst = zstd::bulk::compress(b"module zstd-compressed", 3).unwrap();
    fs::create_dir_all(dir.join("kernel/fs/overlayfs")).unwrap();
    fs::write(dir.join("kernel/fs/overlayfs/overlay.ko.zst"), zst).unwrap();
    fs::write(
        dir.join("modules.dep"),
        "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko\nkernel/fs/jbd2/jbd2.ko:\nkernel/lib/crc16.ko:\n\
         kernel/drivers/block/virtio_blk.ko:\nkernel/fs/overlayfs/overlay.ko.zst:\n",
    )
    .unwrap();
    fs::write(dir.join("modules.builtin"), "kernel/drivers/virtio/virtio_pci.ko\n").unwrap();
}

/// (name, mode, content) of every entry of a zstd-compressed newc archive.
fn unpack(path: &Path) -> Vec<(String, u32, Vec<u8>)> {
    let raw = zstd::stream::decode_all(&fs::read(path).unwrap()[..]).unwrap();
    let mut rest = &raw[..];
    let mut out = Vec::new();
    loop {
        let mut r = cpio::NewcReader::new(rest).unwrap();
        if r.entry().is_trailer() {
            return out;
        }
        let (name, mode) = (r.entry().name().to_owned(), r.entry().mode());
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut data).unwrap();
        out.push((name, mode, data));
        rest = r.finish().unwrap();
    }
}

#[test]
fn initramfs_has_static_init_modules_in_dependency_order_and_config() {
    let t = tempfile::tempdir().unwrap();
    let mods = t.path().join("modules");
    fake_modules(&mods);
    let cfg = t.path().join("bootsel.toml");
    fs::write(&cfg, "disk = \"/dev/vda\"\nwait_seconds = 5\n").unwrap();
    let out = t.path().join("initrd.img");
    let build = |out: &std::path::Path| {
        ok(atom_build(&[
            &"initramfs",
            &"--bootsel",
            &STATIC_EXE,
            &"--kernel-modules",
            &mods,
            &"--module",
            &"virtio-pci",
            &"--module",
            &"virtio_blk",
            &"--module",
            &"ext4",
            &"--module",
            &"overlay",
            &"--module",
            &"jbd2",
            &"--config",
            &cfg,
            &"--shell",
            &STATIC_EXE,
            &"--out",
            &out,
        ]))
    };
    let stdout = build(&out);
    assert!(
        stdout.contains("4 module(s)") || stdout.contains("5 module(s)"),
        "{stdout}"
    );
    let entries = unpack(&out);
    let get = |n: &str| {
        entries
            .iter()
            .find(|e| e.0 == n)
            .unwrap_or_else(|| panic!("no {n} in {entries:?}"))
    };
    assert_eq!(get("init").1, 0o100755);
    assert_eq!(get("init").2, fs::read(STATIC_EXE).unwrap());
    assert_eq!(get("dev/console").1, 0o020600);
    assert_eq!(get("bin/sh").2, b"busybox");
    assert_eq!(
        get("lib/modules/kernel/fs/overlayfs/overlay.ko").2,
        b"module zstd-compressed"
    );
    let config = bootsel::initconfig::Config::parse(std::str::from_utf8(&get("etc/bootsel.toml").2).unwrap()).unwrap();
    assert_eq!(config.disk.as_deref(), Some("/dev/vda"));
    assert_eq!(config.wait_seconds, 5);
    assert_eq!(config.emergency_shell, "/bin/sh");
    assert_eq!(
        config.modules,
        [
            "/lib/modules/kernel/drivers/block/virtio_blk.ko",
            "/lib/modules/kernel/lib/crc16.ko",
            "/lib/modules/kernel/fs/jbd2/jbd2.ko",
            "/lib/modules/kernel/fs/ext4/ext4.ko",
            "/lib/modules/kernel/fs/overlayfs/overlay.ko",
        ],
        "dependencies first, each once, built-in virtio_pci skipped"
    );
    for m in &config.modules {
        get(m.trim_start_matches('/'));
    }

    // Reproducible: the same inputs give the same bytes.
    let again = t.path().join("again.img");
    build(&again);
    assert_eq!(fs::read(&out).unwrap(), fs::read(&again).unwrap());
}

#[test]
fn initramfs_refuses_what_would_not_boot() {
    let t = tempfile::tempdir().unwrap();
    let mods = t.path().join("modules");
    fake_modules(&mods);
    let out = t.path().join("initrd.img");
    fails_with(
        atom_build(&[&"initramfs", &"--bootsel", &"/bin/ls", &"--out", &out]),
        1,
        "dynamically linked",
    );
    fails_with(
        atom_build(&[
            &"initramfs",
            &"--bootsel",
            &STATIC_EXE,
            &"--kernel-modules",
            &mods,
            &"--module",
            &"nosuch",
            &"--out",
            &out,
        ]),
        1,
        "\"nosuch\"",
    );
    fails_with(
        atom_build(&[
            &"initramfs",
            &"--bootsel",
            &STATIC_EXE,
            &"--kernel-modules",
            &t.path(),
            &"--module",
            &"ext4",
            &"--out",
            &out,
        ]),
        1,
        "depmod",
    );
    let cfg = t.path().join("bad.toml");
    fs::write(&cfg, "etc = \"sometimes\"\n").unwrap();
    fails_with(
        atom_build(&[
            &"initramfs",
            &"--bootsel",
            &STATIC_EXE,
            &"--config",
            &cfg,
            &"--out",
            &out,
        ]),
        1,
        "not valid",
    );
    fs::write(&cfg, "modules = [\"/x.ko\"]\n").unwrap();
    fails_with(
        atom_build(&[
            &"initramfs",
            &"--bootsel",
            &STATIC_EXE,
            &"--config",
            &cfg,
            &"--out",
            &out,
        ]),
        1,
        "--module",
    );
    assert!(!out.exists(), "nothing written on failure");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn disk_has_gpt_esp_with_systemd_boot_slot_a_good_and_empty_state() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    make_tree(&tree, 30, 7);
    let image = t.path().join("v1.img");
    ok(atom_build(&[
        &"image",
        &"--kernel",
        &"none",
        &"--rootfs",
        &tree,
        &"--version",
        &"1.0.0",
        &"--size",
        &"24M",
        &"--out",
        &image,
    ]));
    let kernel = t.path().join("vmlinuz");
    fs::write(&kernel, common::bytes(3 << 20, 1)).unwrap();
    let initrd = t.path().join("initrd.img");
    fs::write(&initrd, common::bytes(1 << 20, 2)).unwrap();
    let loader = t.path().join("BOOTX64.EFI");
    let mut efi = b"MZ".to_vec();
    efi.extend(common::bytes(100_000, 3));
    fs::write(&loader, &efi).unwrap();
    let disk = t.path().join("disk.img");
    let args: [&dyn AsRef<std::ffi::OsStr>; 17] = [
        &"disk",
        &"--image",
        &image,
        &"--kernel",
        &kernel,
        &"--initramfs",
        &initrd,
        &"--bootloader",
        &loader,
        &"--cmdline",
        &"console=ttyS0 quiet",
        &"--slot-size",
        &"32M",
        &"--state-size",
        &"20M",
        &"--out",
        &disk,
    ];
    ok(atom_build(&args));

    // The partition table, as util-linux reads it.
    let table: serde_json::Value = serde_json::from_str(&run(Command::new("sfdisk").arg("--json").arg(&disk))).unwrap();
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    let summary: Vec<(String, String, u64, u64)> = parts
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["type"].as_str().unwrap().to_owned(),
                p["start"].as_u64().unwrap(),
                p["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "esp".into(),
                "C12A7328-F81F-11D2-BA4B-00A0C93EC93B".into(),
                2048,
                64 << 11
            ),
            (
                "root-a".into(),
                "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709".into(),
                2048 + (64 << 11),
                32 << 11
            ),
            (
                "root-b".into(),
                "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709".into(),
                2048 + (96 << 11),
                32 << 11
            ),
            (
                "state".into(),
                "0FC63DAF-8483-4772-8E79-3D69D8477DE4".into(),
                2048 + (128 << 11),
                20 << 11
            ),
        ]
    );

    // Hybrid by default: the ESP is the partition gptmbr.bin boots (legacy BIOS bootable).
    assert_eq!(parts[0]["attrs"].as_str(), Some("LegacyBIOSBootable"), "{:?}", parts[0]);

    // Slot attributes, as Google's cgpt reads them: A good, B never.
    let cgpt = |i: &str, flag: &str| {
        run(Command::new("cgpt").args(["show", "-i", i, flag]).arg(&disk))
            .trim()
            .to_owned()
    };
    assert_eq!(
        (cgpt("2", "-P"), cgpt("2", "-T"), cgpt("2", "-S")),
        ("1".into(), "0".into(), "1".into())
    );
    assert_eq!(
        (cgpt("3", "-P"), cgpt("3", "-T"), cgpt("3", "-S")),
        ("0".into(), "0".into(), "0".into())
    );
    let status = run(
        Command::new(env!("CARGO_BIN_EXE_atom-build").replace("atom-build", "bootsel"))
            .args(["status", "--disk"])
            .arg(&disk),
    );
    assert!(
        status.contains("next boot: A") || status.contains("boots next"),
        "{status}"
    );

    // root-a holds the image byte for byte; root-b is empty.
    let bytes = fs::read(&disk).unwrap();
    let a = (1 + 64) << 20;
    assert_eq!(&bytes[a..a + (24 << 20)], &fs::read(&image).unwrap()[..]);
    assert!(bytes[a + (32 << 20)..a + (64 << 20)].iter().all(|&b| b == 0));

    // The ESP, as mtools reads it: systemd-boot where firmware looks, one loader entry.
    let esp = format!("{}@@1M", disk.display());
    let mtype = |p: &str| {
        run(Command::new("mtype")
            .args(["-i", &esp, p])
            .env("MTOOLS_SKIP_CHECK", "1"))
    };
    assert_eq!(mtype("::/loader/loader.conf"), "default atom.conf\ntimeout 0\n");
    assert_eq!(
        mtype("::/loader/entries/atom.conf"),
        "title Atom\nlinux /atom/vmlinuz\ninitrd /atom/initrd.img\noptions console=ttyS0 quiet\n"
    );
    let copy = t.path().join("copied.efi");
    run(Command::new("mcopy")
        .args(["-i", &esp, "::/EFI/BOOT/BOOTX64.EFI"])
        .arg(&copy)
        .env("MTOOLS_SKIP_CHECK", "1"));
    assert_eq!(fs::read(&copy).unwrap(), efi);
    let fat = t.path().join("esp.img");
    fs::write(&fat, &bytes[1 << 20..65 << 20]).unwrap();
    run(Command::new("fsck.vfat").arg("-n").arg(&fat));

    // Legacy BIOS: syslinux's GPT MBR code in front of the protective MBR's table, its
    // loader on the ESP, and a config that starts the same kernel with the same line.
    let gptmbr = fs::read("/usr/lib/syslinux/mbr/gptmbr.bin").expect("syslinux-common installed");
    assert_eq!(&bytes[..gptmbr.len()], &gptmbr[..], "MBR boot code is gptmbr.bin");
    assert_eq!(&bytes[510..512], &[0x55, 0xaa]);
    assert_eq!(bytes[446 + 4], 0xee, "the protective MBR's partition entry stays");
    assert_eq!(
        mtype("::/syslinux/syslinux.cfg"),
        "SERIAL 0 115200\nDEFAULT atom\nPROMPT 0\nTIMEOUT 0\nLABEL atom\n  LINUX /atom/vmlinuz\n  INITRD /atom/initrd.img\n  APPEND console=ttyS0 quiet\n"
    );
    let listing = run(Command::new("mdir")
        .args(["-a", "-b", "-i", &esp, "::/syslinux"])
        .env("MTOOLS_SKIP_CHECK", "1"));
    assert!(
        listing.contains("ldlinux.sys") && listing.contains("ldlinux.c32"),
        "{listing}"
    );

    // The record and the sums beside the disk.
    let record: toml::Table = toml::from_str(&fs::read_to_string(t.path().join("disk.toml")).unwrap()).unwrap();
    assert_eq!(record["version"].as_str(), Some("1.0.0"));
    assert_eq!(record["firmware"].as_str(), Some("hybrid"));
    let (image_digest, _) = atom_dist::digest::Digest::of_file(&image).unwrap();
    assert_eq!(record["image"].as_str().unwrap(), image_digest.to_string());
    let sums = run(Command::new("sha256sum")
        .args(["-c", "--strict", "SHA256SUMS"])
        .current_dir(t.path()));
    assert!(
        sums.contains("disk.img: OK") && sums.contains("disk.toml: OK"),
        "{sums}"
    );

    // The state partition is a clean, empty ext4 labelled "state".
    let state = t.path().join("state.img");
    fs::write(&state, &bytes[(129 << 20)..(149 << 20)]).unwrap();
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(&state));
    assert_eq!(run(Command::new("e2label").arg(&state)).trim(), "state");

    // Reproducible.
    let again = t.path().join("again.img");
    let mut args2 = args;
    args2[16] = &again;
    ok(atom_build(&args2));
    assert!(fs::read(&again).unwrap() == bytes, "same inputs, same disk");

    // Bad inputs: a file that is not an Atom image, a slot too small, a loader that is not EFI.
    let out = t.path().join("bad.img");
    let mut bad = args;
    bad[16] = &out;
    bad[2] = &kernel;
    fails_with(atom_build(&bad), 1, "not an Atom slot image");
    let mut bad = args;
    bad[16] = &out;
    bad[12] = &"8M";
    fails_with(atom_build(&bad), 1, "smaller than the image");
    let mut bad = args;
    bad[16] = &out;
    bad[8] = &kernel;
    fails_with(atom_build(&bad), 1, "not an EFI executable");
    assert!(!out.exists());
}

/// A slot image, kernel, initramfs and EFI loader for `atom-build disk`.
fn disk_inputs(f: &common::Fixture) -> [std::path::PathBuf; 4] {
    let dir = f.dir.path();
    let tree = dir.join("tree");
    make_tree(&tree, 10, 3);
    let image = f.image_of_size("v1", "1.0.0", &tree, None, "16M");
    let kernel = dir.join("vmlinuz");
    fs::write(&kernel, common::bytes(1 << 20, 1)).unwrap();
    let initrd = dir.join("initrd.img");
    fs::write(&initrd, common::bytes(1 << 19, 2)).unwrap();
    let loader = dir.join("BOOTX64.EFI");
    let mut efi = b"MZ".to_vec();
    efi.extend(common::bytes(50_000, 3));
    fs::write(&loader, &efi).unwrap();
    [image, kernel, initrd, loader]
}

fn disk_command(inputs: &[std::path::PathBuf; 4], out: &Path, extra: &[&str]) -> std::process::Output {
    let [image, kernel, initrd, loader] = inputs;
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"disk",
        &"--image",
        image,
        &"--kernel",
        kernel,
        &"--initramfs",
        initrd,
        &"--bootloader",
        loader,
        &"--state-size",
        &"16M",
        &"--esp-size",
        &"16M",
        &"--out",
        &out,
    ];
    for e in extra {
        args.push(e);
    }
    atom_build(&args)
}

#[test]
fn disk_formats_convert_back_to_the_raw_disk_and_are_summed() {
    let f = common::Fixture::new();
    let inputs = disk_inputs(&f);
    let t = &f.dir;
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    let raw = out.join("host.disk.img");
    ok(disk_command(
        &inputs,
        &raw,
        &["--format", "raw,raw.zst,qcow2", "--format", "vmdk", "--format", "vhd"],
    ));
    let names: Vec<String> = {
        let mut v: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names,
        [
            "SHA256SUMS",
            "host.disk.img",
            "host.disk.img.zst",
            "host.disk.qcow2",
            "host.disk.toml",
            "host.disk.vhd",
            "host.disk.vmdk"
        ]
    );
    let sums = run(Command::new("sha256sum")
        .args(["-c", "--strict", "SHA256SUMS"])
        .current_dir(&out));
    assert_eq!(sums.lines().filter(|l| l.ends_with(": OK")).count(), 6, "{sums}");

    // Each format holds the same disk, as qemu-img (and zstd) read it back.
    let unpacked = t.path().join("unpacked.img");
    run(Command::new("zstd")
        .args(["-q", "-d", "-o"])
        .arg(&unpacked)
        .arg(out.join("host.disk.img.zst")));
    assert!(
        fs::read(&unpacked).unwrap() == fs::read(&raw).unwrap(),
        "raw.zst unpacks to the raw disk"
    );
    for (file, format) in [
        ("host.disk.qcow2", "qcow2"),
        ("host.disk.vmdk", "vmdk"),
        ("host.disk.vhd", "vpc"),
    ] {
        run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", format])
            .arg(&raw)
            .arg(out.join(file)));
        let info: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
            .args(["info", "--output=json", "-f", format])
            .arg(out.join(file))))
        .unwrap();
        assert_eq!(
            info["virtual-size"].as_u64(),
            Some(fs::metadata(&raw).unwrap().len()),
            "{file}: {info}"
        );
        if format == "vmdk" {
            assert!(info.to_string().contains("streamOptimized"), "{info}");
        }
    }
    let record: toml::Table = toml::from_str(&fs::read_to_string(out.join("host.disk.toml")).unwrap()).unwrap();
    let outputs = record["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 5);
    for o in outputs {
        assert!(sums.contains(&format!("{}: OK", o["file"].as_str().unwrap())), "{o}");
    }

    // Without raw in the list, no raw disk is left behind; a second disk in the same
    // directory keeps the first one's sums.
    let other = out.join("other.disk.img");
    ok(disk_command(
        &inputs,
        &other,
        &["--format", "qcow2", "--firmware", "uefi"],
    ));
    assert!(!other.exists());
    let sums = run(Command::new("sha256sum")
        .args(["-c", "--strict", "SHA256SUMS"])
        .current_dir(&out));
    assert_eq!(sums.lines().filter(|l| l.ends_with(": OK")).count(), 8, "{sums}");

    // All or nothing: when one format cannot be made (qemu-img fails), the earlier build's
    // disk, formats, record and sums stay as they were, and no temporary file is left.
    let before = common::snapshot(&out);
    let bin = t.path().join("failing-bin");
    fs::create_dir(&bin).unwrap();
    let fake = bin.join("qemu-img");
    fs::write(&fake, "#!/bin/sh\necho 'qemu-img: injected failure' >&2\nexit 1\n").unwrap();
    fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let [image, kernel, initrd, loader] = &inputs;
    let failed = Command::new(common::BIN)
        .arg("disk")
        .arg("--image")
        .arg(image)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(initrd)
        .arg("--bootloader")
        .arg(loader)
        .args(["--state-size", "16M", "--esp-size", "16M", "--cmdline", "ro quiet"])
        .args(["--format", "raw,raw.zst,qcow2", "--out"])
        .arg(&raw)
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()))
        .output()
        .unwrap();
    fails_with(failed, 1, "injected failure");
    assert!(
        common::snapshot(&out) == before,
        "a failed build changed the output directory"
    );
}

#[test]
fn disk_firmware_uefi_and_bios_carry_only_their_loader() {
    let f = common::Fixture::new();
    let inputs = disk_inputs(&f);
    let t = &f.dir;
    let list = |disk: &Path| {
        run(Command::new("mdir")
            .args(["-a", "-b", "-/", "-i", &format!("{}@@1M", disk.display()), "::/"])
            .env("MTOOLS_SKIP_CHECK", "1"))
    };
    let attrs = |disk: &Path| {
        let table: serde_json::Value =
            serde_json::from_str(&run(Command::new("sfdisk").arg("--json").arg(disk))).unwrap();
        table["partitiontable"]["partitions"][0]["attrs"]
            .as_str()
            .map(str::to_owned)
    };

    let uefi = t.path().join("uefi.img");
    ok(disk_command(&inputs, &uefi, &["--firmware", "uefi"]));
    let files = list(&uefi);
    assert!(files.contains("BOOTX64.EFI") && !files.contains("syslinux"), "{files}");
    assert_eq!(attrs(&uefi), None);
    // The protective entry's boot indicator: clear as the UEFI spec wants, set (0x80) only
    // on a BIOS-only disk, for BIOSes that boot only an active entry.
    let boot_indicator = |disk: &Path| fs::read(disk).unwrap()[446];
    assert_eq!(boot_indicator(&uefi), 0);
    assert!(
        fs::read(&uefi).unwrap()[..440].iter().all(|&b| b == 0),
        "no MBR boot code"
    );

    let bios = t.path().join("bios.img");
    ok(disk_command(&inputs, &bios, &["--firmware", "bios"]));
    let files = list(&bios);
    assert!(files.contains("ldlinux.sys") && !files.contains("EFI"), "{files}");
    assert_eq!(attrs(&bios).as_deref(), Some("LegacyBIOSBootable"));
    assert_eq!(boot_indicator(&bios), 0x80);

    // Missing syslinux files name the package.
    let bad = t.path().join("bad.img");
    fails_with(
        disk_command(&inputs, &bad, &["--syslinux-dir", "/nonexistent"]),
        1,
        "syslinux-common",
    );
    assert!(!bad.exists());
}

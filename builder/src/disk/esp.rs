//! The EFI system partition and the boot loaders that start the first stage from it.
//!
//! UEFI: systemd-boot as the removable-media loader with one loader entry. Legacy BIOS:
//! syslinux, chosen over GRUB's i386-pc core because it needs no extra partition (the
//! layout stays ESP, root-a, root-b, state), installs into the FAT image file without a
//! loop device or device probing, and reads the same kernel and initramfs from the ESP:
//! gptmbr.bin in the MBR boot code finds the partition marked legacy-BIOS-bootable (the
//! ESP) and starts its boot sector, which loads ldlinux.sys. Neither loader chooses the
//! slot: both start the first stage, which reads the GPT bits (bootsel).

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};

use super::MIB;
use crate::cli::{DiskArgs, Firmware};

const ENTRY_NAME: &str = "atom.conf";
/// The MBR boot code area: the bytes before the partition table and disk signature.
const MBR_CODE: usize = 440;

/// What the ESP carries for `firmware`, for the summary line.
pub fn loaders(firmware: Firmware) -> &'static str {
    match firmware {
        Firmware::Uefi => "UEFI: systemd-boot, entry atom.conf",
        Firmware::Bios => "BIOS: syslinux",
        Firmware::Hybrid => "UEFI: systemd-boot, entry atom.conf; BIOS: syslinux",
    }
}

/// The FAT file system of the ESP: the kernel and initramfs, and the loaders `firmware`
/// needs.
pub fn filesystem(args: &DiskArgs, seed: &str, scratch: &Path, epoch: i64) -> Result<Vec<u8>> {
    let read = |p: &Path| fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let kernel = read(&args.kernel)?;
    let initrd = read(&args.initramfs)?;
    let mut files: Vec<(&str, Vec<u8>)> = vec![("atom/vmlinuz", kernel), ("atom/initrd.img", initrd)];
    let mut dirs = vec!["::/atom"];
    if args.firmware.uefi() {
        let loader = read(&args.bootloader)?;
        ensure!(
            loader.starts_with(b"MZ"),
            "{} is not an EFI executable (install systemd-boot-efi?)",
            args.bootloader.display()
        );
        let entry = format!(
            "title Atom\nlinux /atom/vmlinuz\ninitrd /atom/initrd.img\noptions {}\n",
            args.cmdline
        );
        files.push(("EFI/BOOT/BOOTX64.EFI", loader));
        files.push((
            "loader/loader.conf",
            format!("default {ENTRY_NAME}\ntimeout 0\n").into_bytes(),
        ));
        files.push(("loader/entries/atom.conf", entry.into_bytes()));
        dirs.extend(["::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"]);
    }
    if args.firmware.bios() {
        // SERIAL first: a headless server's only console is often the serial port.
        let config = format!(
            "SERIAL 0 115200\nDEFAULT atom\nPROMPT 0\nTIMEOUT 0\nLABEL atom\n  LINUX /atom/vmlinuz\n  INITRD /atom/initrd.img\n  APPEND {}\n",
            args.cmdline
        );
        files.push(("syslinux/syslinux.cfg", config.into_bytes()));
        dirs.push("::/syslinux");
    }
    let needed: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    ensure!(
        needed + 2 * MIB < args.esp_size,
        "kernel, initramfs and loaders need {needed} bytes; make --esp-size larger"
    );
    // dosfstools and mtools rather than a Rust FAT crate: fatfs 0.3 writes long-name
    // entries for "." and "..", which fsck.fat rejects. Both honour SOURCE_DATE_EPOCH.
    let volume = scratch.join("esp.img");
    File::create(&volume)
        .and_then(|f| f.set_len(args.esp_size))
        .context("cannot create the ESP image")?;
    let id = hex::encode(&blake3::hash(format!("esp\0{seed}").as_bytes()).as_bytes()[..4]);
    let tool = |program: &str| {
        let mut c = Command::new(program);
        c.env("SOURCE_DATE_EPOCH", epoch.to_string())
            .env("MTOOLS_SKIP_CHECK", "1")
            .env("LC_ALL", "C");
        c
    };
    crate::cmd::run(
        tool("mkfs.vfat")
            .args(["--invariant", "-n", "ATOM-ESP", "-i", &id])
            .arg(&volume),
    )?;
    let image = format!("{}", volume.display());
    crate::cmd::run(tool("mmd").args(["-i", &image]).args(&dirs))?;
    for (i, (path, bytes)) in files.iter().enumerate() {
        let src = scratch.join(format!("esp-file-{i}"));
        fs::write(&src, bytes).with_context(|| format!("cannot stage {path}"))?;
        crate::cmd::run(tool("mcopy").args(["-i", &image]).arg(&src).arg(format!("::/{path}")))
            .with_context(|| format!("cannot copy {path} into the ESP"))?;
    }
    if args.firmware.bios() {
        // The mtools flavour of the installer works on the image file: it writes
        // ldlinux.sys and ldlinux.c32 through mtools and patches the FAT boot sector.
        crate::cmd::run(
            tool("syslinux")
                .args(["--install", "--directory", "/syslinux"])
                .arg(&volume),
        )
        .with_context(|| format!("cannot install syslinux into the ESP (install the syslinux package, {UEFI_ONLY})"))?;
    }
    fs::read(&volume).context("cannot read the ESP image back")
}

const UEFI_ONLY: &str = "or make a UEFI-only disk: --firmware uefi, outputs.disk.firmware = \"uefi\"";

/// Writes syslinux's GPT-aware MBR boot code in front of the protective MBR's table.
pub fn write_mbr_boot_code(disk: &mut File, syslinux_dir: &Path) -> Result<()> {
    let path = syslinux_dir.join("mbr/gptmbr.bin");
    let mut code = Vec::new();
    File::open(&path)
        .and_then(|f| f.take(MBR_CODE as u64 + 1).read_to_end(&mut code))
        .with_context(|| format!("cannot read {} (install syslinux-common, {UEFI_ONLY})", path.display()))?;
    ensure!(
        !code.is_empty() && code.len() <= MBR_CODE,
        "{} is {} bytes; MBR boot code is at most {MBR_CODE}",
        path.display(),
        code.len()
    );
    disk.seek(SeekFrom::Start(0))?;
    disk.write_all(&code).context("cannot write the MBR boot code")
}

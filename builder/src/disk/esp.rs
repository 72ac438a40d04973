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
    if args.firmware.uefi() {
        files.extend(uefi_loader(&args.bootloader, &args.cmdline)?);
    }
    if args.firmware.bios() {
        // SERIAL first: a headless server's only console is often the serial port.
        files.push(("syslinux/syslinux.cfg", syslinux_config(&args.cmdline).into_bytes()));
    }
    let needed: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    ensure!(
        needed + 2 * MIB < args.esp_size,
        "kernel, initramfs and loaders need {needed} bytes; make --esp-size larger"
    );
    let volume = scratch.join("esp.img");
    let id = hex::encode(&blake3::hash(format!("esp\0{seed}").as_bytes()).as_bytes()[..4]);
    fat_image(&volume, args.esp_size, "ATOM-ESP", &id, &files, scratch, epoch)?;
    if args.firmware.bios() {
        // The mtools flavour of the installer works on the image file: it writes
        // ldlinux.sys and ldlinux.c32 through mtools and patches the FAT boot sector.
        crate::cmd::run(
            tool("syslinux", epoch)
                .args(["--install", "--directory", "/syslinux"])
                .arg(&volume),
        )
        .with_context(|| format!("cannot install syslinux into the ESP (install the syslinux package, {UEFI_ONLY})"))?;
    }
    fs::read(&volume).context("cannot read the ESP image back")
}

/// systemd-boot as the removable-media loader, starting /atom/vmlinuz with
/// /atom/initrd.img and `cmdline` at once.
pub fn uefi_loader(bootloader: &Path, cmdline: &str) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let loader = fs::read(bootloader).with_context(|| format!("cannot read {}", bootloader.display()))?;
    ensure!(
        loader.starts_with(b"MZ"),
        "{} is not an EFI executable (install systemd-boot-efi?)",
        bootloader.display()
    );
    let entry = format!("title Atom\nlinux /atom/vmlinuz\ninitrd /atom/initrd.img\noptions {cmdline}\n");
    Ok(vec![
        ("EFI/BOOT/BOOTX64.EFI", loader),
        (
            "loader/loader.conf",
            format!("default {ENTRY_NAME}\ntimeout 0\n").into_bytes(),
        ),
        ("loader/entries/atom.conf", entry.into_bytes()),
    ])
}

/// A syslinux/isolinux config starting /atom/vmlinuz with /atom/initrd.img.
pub fn syslinux_config(cmdline: &str) -> String {
    format!(
        "SERIAL 0 115200\nDEFAULT atom\nPROMPT 0\nTIMEOUT 0\nLABEL atom\n  LINUX /atom/vmlinuz\n  INITRD /atom/initrd.img\n  APPEND {cmdline}\n"
    )
}

/// A FAT file system image of `size` bytes at `volume` holding `files` (directories are
/// made as their paths need them), stamped with `epoch`.
pub fn fat_image(
    volume: &Path,
    size: u64,
    label: &str,
    id: &str,
    files: &[(&str, Vec<u8>)],
    scratch: &Path,
    epoch: i64,
) -> Result<()> {
    // dosfstools and mtools rather than a Rust FAT crate: fatfs 0.3 writes long-name
    // entries for "." and "..", which fsck.fat rejects. Both honour SOURCE_DATE_EPOCH.
    File::create(volume)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("cannot create {}", volume.display()))?;
    crate::cmd::run(
        tool("mkfs.vfat", epoch)
            .args(["--invariant", "-n", label, "-i", id])
            .arg(volume),
    )?;
    let image = format!("{}", volume.display());
    let mut dirs: Vec<String> = Vec::new();
    for (path, _) in files {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            let dir = format!("::/{}", &path[..at + i]);
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
            at += i + 1;
        }
    }
    if !dirs.is_empty() {
        crate::cmd::run(tool("mmd", epoch).args(["-i", &image]).args(&dirs))?;
    }
    for (i, (path, bytes)) in files.iter().enumerate() {
        let src = scratch.join(format!("fat-file-{i}"));
        fs::write(&src, bytes).with_context(|| format!("cannot stage {path}"))?;
        crate::cmd::run(
            tool("mcopy", epoch)
                .args(["-i", &image])
                .arg(&src)
                .arg(format!("::/{path}")),
        )
        .with_context(|| format!("cannot copy {path} into {}", volume.display()))?;
        fs::remove_file(&src).ok();
    }
    Ok(())
}

fn tool(program: &str, epoch: i64) -> Command {
    let mut c = Command::new(program);
    c.env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("LC_ALL", "C");
    c
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

//! The hybrid ISO: isolinux for BIOS (El Torito no-emulation from a CD, isohdpfx.bin in
//! the MBR from a USB stick) and systemd-boot in an El Torito EFI image that is also a
//! GPT/MBR partition (isohybrid-gpt-basdat), so UEFI firmware finds it on a CD and on a
//! stick. Both start the same kernel and initramfs with the same command line.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cli::InstallerArgs;
use crate::disk::esp;

const MIB: u64 = 1 << 20;

pub fn write(args: &InstallerArgs, out: &Path, tree: &Path, initrd: &[u8], scratch: &Path, epoch: i64) -> Result<()> {
    let kernel_path = args.kernel.as_deref().context("--kernel is needed")?;
    let kernel = fs::read(kernel_path).with_context(|| format!("cannot read {}", kernel_path.display()))?;
    let cmdline = &args.cmdline;

    // BIOS: isolinux reads the ISO 9660 tree.
    let atom = tree.join("atom");
    fs::create_dir_all(&atom)?;
    fs::write(atom.join("vmlinuz"), &kernel)?;
    fs::write(atom.join("initrd.img"), initrd)?;
    let isolinux = tree.join("isolinux");
    fs::create_dir_all(&isolinux)?;
    let copy = |from: &Path, to: &Path| {
        fs::copy(from, to).map(drop).with_context(|| {
            format!(
                "cannot read {} (Debian packages isolinux and syslinux-common)",
                from.display()
            )
        })
    };
    copy(&args.isolinux_dir.join("isolinux.bin"), &isolinux.join("isolinux.bin"))?;
    copy(
        &args.syslinux_modules.join("ldlinux.c32"),
        &isolinux.join("ldlinux.c32"),
    )?;
    fs::write(isolinux.join("isolinux.cfg"), esp::syslinux_config(cmdline))?;

    // UEFI: firmware reads FAT, not ISO 9660: the EFI image carries its own copy.
    let mut files = esp::uefi_loader(&args.bootloader, cmdline)?;
    files.push(("atom/vmlinuz", kernel));
    files.push(("atom/initrd.img", initrd.to_vec()));
    let needed: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let size = (needed + 4 * MIB).div_ceil(MIB) * MIB;
    let boot = tree.join("boot");
    fs::create_dir_all(&boot)?;
    let id = hex::encode(&blake3::hash(format!("installer\0{}", args.label).as_bytes()).as_bytes()[..4]);
    esp::fat_image(&boot.join("efiboot.img"), size, "ATOM-EFI", &id, &files, scratch, epoch)?;

    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write into {}", dir.display()))?;
    let mut cmd = Command::new("xorriso");
    cmd.env("SOURCE_DATE_EPOCH", epoch.to_string())
        .args([
            "-as",
            "mkisofs",
            "-quiet",
            "-iso-level",
            "3",
            "-full-iso9660-filenames",
            "-joliet",
            "-rational-rock",
        ])
        .args(["-volid", &args.label])
        .arg("-isohybrid-mbr")
        .arg(args.isolinux_dir.join("isohdpfx.bin"))
        .args([
            "-eltorito-boot",
            "isolinux/isolinux.bin",
            "-eltorito-catalog",
            "isolinux/boot.cat",
        ])
        .args(["-no-emul-boot", "-boot-load-size", "4", "-boot-info-table"])
        .args([
            "-eltorito-alt-boot",
            "-e",
            "boot/efiboot.img",
            "-no-emul-boot",
            "-isohybrid-gpt-basdat",
        ])
        .arg("-output")
        .arg(tmp.path())
        .arg(tree);
    crate::cmd::run_from(&mut cmd, Some("xorriso")).context("xorriso could not make the ISO")?;
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file().set_permissions(fs::Permissions::from_mode(0o644))?;
    tmp.persist(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    Ok(())
}

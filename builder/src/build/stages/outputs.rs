//! outputs: what else the recipe asks for beside the slot image: a bootable disk
//! (`atom-build disk`, the image in slot A) and the root tree as a reproducible tar.zst.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result};

use super::{Context, Plan, host_path, options, stem};
use crate::build::cache::Inputs;
use crate::build::hooks::run_logged;
use crate::cli::DiskArgs;

const DEFAULT_BOOTLOADER: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
const SYSLINUX_DIR: &str = "/usr/lib/syslinux";

/// `program`'s path on PATH, so its contents can be part of the cache key.
fn which(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| {
            let package = match program {
                "mkfs.vfat" => "dosfstools",
                "mmd" | "mcopy" => "mtools",
                "qemu-img" => "qemu-utils",
                other => other,
            };
            format!("{program} is not on PATH (outputs.disk needs it: Debian package {package})")
        })
}

pub fn inputs(p: &Plan<'_>) -> Result<Inputs> {
    let mut i = Inputs::new();
    let o = &p.recipe.outputs;
    i.insert("outputs".into(), options(o)?);
    i.insert("os".into(), options(&p.recipe.os)?);
    i.insert("epoch".into(), p.epoch.to_string());
    if let Some(d) = &o.disk {
        i.insert("outputs.disk.kernel".into(), host_path(&d.kernel)?);
        i.insert("outputs.disk.initramfs".into(), host_path(&d.initramfs)?);
        if d.firmware.uefi() {
            let boot = d.bootloader.clone().unwrap_or_else(|| DEFAULT_BOOTLOADER.into());
            i.insert("outputs.disk.bootloader".into(), host_path(&boot)?);
        }
        // The tools that make the disk are part of it: another version may write other bytes.
        for tool in ["mkfs.vfat", "mmd", "mcopy"] {
            i.insert(format!("outputs.disk.{tool}"), host_path(&which(tool)?)?);
        }
        if d.formats
            .iter()
            .any(|f| *f != crate::cli::DiskFormat::Raw && *f != crate::cli::DiskFormat::RawZst)
        {
            i.insert("outputs.disk.qemu-img".into(), host_path(&which("qemu-img")?)?);
        }
        if d.firmware.bios() {
            // The installer program carries ldlinux.sys; gptmbr.bin goes into the MBR.
            i.insert("outputs.disk.syslinux".into(), host_path(&which("syslinux")?)?);
            i.insert(
                "outputs.disk.gptmbr".into(),
                host_path(&std::path::Path::new(SYSLINUX_DIR).join("mbr/gptmbr.bin"))?,
            );
        }
    }
    Ok(i)
}

pub fn run(cx: &Context<'_>) -> Result<Vec<PathBuf>> {
    let o = &cx.recipe.outputs;
    let name = stem(cx.recipe);
    let mut made = Vec::new();
    if let Some(d) = &o.disk {
        cx.progress.step("bootable disk");
        let out = cx.out_dir.join(format!("{name}.disk.img"));
        let args = DiskArgs {
            image: cx.out_dir.join(format!("{name}.img")),
            kernel: d.kernel.clone(),
            initramfs: d.initramfs.clone(),
            cmdline: d
                .cmdline
                .clone()
                .unwrap_or_else(|| "ro console=tty0 console=ttyS0 panic=10".into()),
            bootloader: d.bootloader.clone().unwrap_or_else(|| DEFAULT_BOOTLOADER.into()),
            slot_size: d
                .slot_size
                .as_deref()
                .map(crate::cli::parse_size)
                .transpose()
                .map_err(|e| anyhow::anyhow!("outputs.disk.slot_size: {e}"))?,
            esp_size: 64 << 20,
            state_size: 128 << 20,
            out: out.clone(),
            firmware: d.firmware,
            syslinux_dir: SYSLINUX_DIR.into(),
            formats: d.formats.clone(),
        };
        made.extend(crate::disk::run(&args, cx.epoch).context("outputs.disk")?);
    }
    if o.tarball {
        cx.progress.step("root tree as tar.zst");
        let out = cx.out_dir.join(format!("{name}.tar.zst"));
        run_logged(
            Command::new("tar")
                .args([
                    "--sort=name",
                    "--numeric-owner",
                    "--xattrs",
                    "--xattrs-include=*",
                    "--format=posix",
                ])
                .arg(format!("--mtime=@{}", cx.epoch))
                .args([
                    "--clamp-mtime",
                    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
                    "--use-compress-program=zstd -T0 -19",
                    "-cf",
                ])
                .arg(&out)
                .arg("-C")
                .arg(cx.tree)
                .arg("."),
            cx.log,
            cx.command_timeout,
        )
        .context("outputs.tarball")?;
        let sums = crate::disk::add_to_sums(std::slice::from_ref(&out)).context("outputs.tarball")?;
        made.push(out);
        if !made.contains(&sums) {
            made.push(sums);
        }
    }
    Ok(made)
}

//! `atom-build installer`: a hybrid ISO (BIOS and UEFI, CD or USB stick) that installs a
//! disk made by `atom-build disk`, verified against the publisher's signatures.
//!
//! 1. [`medium::stage`]: the medium's files under /atom: the disk (zstd), the release's
//!    signed manifest (and keys.toml), install.toml describing the disk, signed.
//! 2. [`initramfs`]: `atom-install` as /init, its modules, config and the trusted keys.
//! 3. [`iso::write`]: isolinux and systemd-boot around them, xorriso.

mod iso;
mod medium;

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};
use atom_dist::install::{After, CONFIG_PATH, InstallerConfig};
use atom_dist::keys::PublicKey;

use crate::cli::InstallerArgs;
use crate::initramfs::{Archive, DIRS, ZSTD_LEVEL, add_modules, require_static};
use crate::modules::ModulesDep;

/// Drivers an installer needs on common machines: virtio, SATA/IDE, NVMe, USB storage, the
/// CD and its filesystem, and ext4 (the state filesystem grows mounted).
const DEFAULT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "ata_piix",
    "ahci",
    "nvme",
    "sd_mod",
    "sr_mod",
    "isofs",
    "xhci_pci",
    "ehci_pci",
    "usb_storage",
    "uas",
    "crc32c_generic",
    "ext4",
];

pub fn run(args: &InstallerArgs, epoch: i64) -> Result<Vec<PathBuf>> {
    if let Some(dir) = &args.medium_dir {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let staged = medium::stage(args, dir, epoch)?;
        println!(
            "wrote the medium for {} {} into {}: disk {} bytes ({} compressed), signed by {}",
            staged.description.version,
            staged.description.board,
            dir.display(),
            staged.description.disk.size,
            staged.description.disk.compressed_size,
            staged.signed_by
        );
        return Ok(vec![dir.clone()]);
    }
    let out = args.out.as_deref().context("--out is needed")?;
    let scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
    let tree = scratch.path().join("iso");
    let staged = medium::stage(args, &tree.join(atom_dist::install::DIR), epoch)?;
    let initrd = initramfs(args, &staged, epoch)?;
    iso::write(args, out, &tree, &initrd, scratch.path(), epoch)?;
    let sums = crate::disk::add_to_sums(&[out.to_path_buf()])?;
    println!(
        "built {}: {} bytes; installs {} {} (disk {} bytes), signed by {}; initramfs {} bytes",
        out.display(),
        fs::metadata(out)?.len(),
        staged.description.version,
        staged.description.board,
        staged.description.disk.size,
        staged.signed_by,
        initrd.len()
    );
    Ok(vec![out.to_path_buf(), sums])
}

/// The installer's initramfs: /init, modules, /etc/atom/install.toml and the keys.
fn initramfs(args: &InstallerArgs, staged: &medium::Staged, epoch: i64) -> Result<Vec<u8>> {
    let trust = &staged.trust;
    let installer = args.installer.as_deref().context("--installer is needed")?;
    let init = fs::read(installer).with_context(|| format!("cannot read {}", installer.display()))?;
    require_static(&init).with_context(|| format!("{} cannot be /init", installer.display()))?;
    let mut archive = Archive::new(epoch);
    for d in DIRS {
        archive.dir(d);
    }
    archive.char_device("dev/console", 0o600, (5, 1));
    archive.file("init", 0o755, init);
    let modules = match &args.kernel_modules {
        Some(dir) => {
            let wanted: Vec<String> = if args.modules.is_empty() {
                let dep = ModulesDep::load(dir)?;
                DEFAULT_MODULES
                    .iter()
                    .filter(|m| dep.knows(m))
                    .map(|m| m.to_string())
                    .collect()
            } else {
                args.modules.clone()
            };
            add_modules(&mut archive, dir, &wanted)?
        }
        None => Vec::new(),
    };
    let parse_after = |flag: &str, value: &str| {
        After::parse(value).with_context(|| format!("--{flag} {value}: give reboot, poweroff or halt"))
    };
    let config = InstallerConfig {
        target: args.target.clone(),
        keep_partlabel: args.keep_partlabel.clone(),
        after: parse_after("after", &args.after)?,
        on_failure: parse_after("on-failure", &args.on_failure)?,
        medium_label: args.label.clone(),
        wait_secs: 30,
        modules: modules.iter().map(|m| format!("/{m}")).collect(),
        description_digest: Some(staged.description_digest),
    };
    archive.dir("etc/atom");
    archive.file(
        CONFIG_PATH,
        0o644,
        toml::to_string(&config)
            .context("cannot write the installer config")?
            .into_bytes(),
    );
    archive.dir("etc/atom/keys");
    let keys_dir = match trust {
        medium::Trust::Single(_) => "etc/atom/keys",
        medium::Trust::Roles(_) => {
            archive.dir("etc/atom/keys/root");
            "etc/atom/keys/root"
        }
    };
    for key in trust.keys() {
        archive.file(
            &format!("{keys_dir}/{}.pub", key.id()),
            0o644,
            PublicKey::to_file_text(key).into_bytes(),
        );
    }
    let cpio = archive.finish()?;
    zstd::bulk::compress(&cpio, ZSTD_LEVEL).context("cannot compress the installer's initramfs")
}

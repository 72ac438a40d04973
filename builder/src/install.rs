//! `atom-build install-units`: puts the agent, its systemd units, presets and config
//! skeleton into a target root (an image's root filesystem before `atom-build image`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cli::InstallArgs;

const UNITS: &[(&str, &str)] = &[
    ("atom-update.service", include_str!("../../systemd/atom-update.service")),
    ("atom-update.timer", include_str!("../../systemd/atom-update.timer")),
    (
        "atom-updated.service",
        include_str!("../../systemd/atom-updated.service"),
    ),
    ("atom-health.service", include_str!("../../systemd/atom-health.service")),
    (
        "atom-mark-good.service",
        include_str!("../../systemd/atom-mark-good.service"),
    ),
    (
        "atom-mark-bad.service",
        include_str!("../../systemd/atom-mark-bad.service"),
    ),
];
/// The initramfs-tools hook that makes Debian's own initramfs an Atom second stage.
const INITRAMFS_TOOLS: &[(&str, &str)] = &[
    (
        "usr/share/initramfs-tools/hooks/atom",
        include_str!("../../bootsel/initramfs-tools/hooks/atom"),
    ),
    (
        "usr/share/initramfs-tools/scripts/local-bottom/atom",
        include_str!("../../bootsel/initramfs-tools/scripts/local-bottom/atom"),
    ),
];
/// Where the slot keeps the static bootsel that the hook copies into its initramfs.
const BOOTSEL_IN_ROOT: &str = "usr/lib/atom/bootsel";
const PRESET: &str = include_str!("../../systemd/80-atom.preset");
const BINARIES: &[&str] = &["atom-update"];

const CONFIG_EXAMPLE: &str = "\
# Atom update agent configuration. Copy to update.toml and adjust; every key is
# described in `atom-update --help` and the README.
repositories = [\"https://updates.example.com/atom\"]
channel = \"stable\"
board = \"x86_64-generic\"
# tries = 3
# reboot = \"never\"          # never | immediate | window
# maintenance_window = \"02:00-04:00\"
# labels = [\"root-a\", \"root-b\"]  # slot partitions by GPT name, or by device:
# slot_devices = [\"/dev/sda2\", \"/dev/sda3\"]
";

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

pub fn run(args: &InstallArgs) -> Result<()> {
    let root = &args.root;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    install_into(root, &bin_dir, args.bootsel.as_deref())?;
    if args.bootsel.is_some() {
        println!(
            "installed bootsel and the initramfs-tools hook (run update-initramfs in the tree, then \
             atom-build image --initramfs tree)"
        );
    }
    println!(
        "installed {} units, the preset and {} into {} (enable with: systemctl --root={} preset-all)",
        UNITS.len(),
        BINARIES.join(", "),
        root.display(),
        root.display()
    );
    Ok(())
}

/// The units, the preset, the binaries of `bin_dir`, Atom's directories and, with
/// `bootsel`, the initramfs-tools hook, into the tree at `root`.
pub fn install_into(root: &Path, bin_dir: &Path, bootsel: Option<&Path>) -> Result<()> {
    let unit_dir = root.join("usr/lib/systemd/system");
    for (name, text) in UNITS {
        write(&unit_dir.join(name), text, 0o644)?;
    }
    write(
        &root.join("usr/lib/systemd/system-preset/80-atom.preset"),
        PRESET,
        0o644,
    )?;
    for name in BINARIES {
        let src = bin_dir.join(name);
        let dst = root.join("usr/bin").join(name);
        fs::create_dir_all(dst.parent().expect("has parent"))?;
        fs::copy(&src, &dst).with_context(|| format!("cannot copy {} (use --bin-dir)", src.display()))?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
    }
    for dir in [
        "etc/atom/keys",
        "etc/atom/health.d",
        "usr/lib/atom/health.d",
        "var/lib/atom",
    ] {
        fs::create_dir_all(root.join(dir)).with_context(|| format!("cannot create {dir}"))?;
    }
    if let Some(bootsel) = bootsel {
        let dst = root.join(BOOTSEL_IN_ROOT);
        fs::create_dir_all(dst.parent().expect("has parent"))?;
        fs::copy(bootsel, &dst).with_context(|| format!("cannot copy {}", bootsel.display()))?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
        for (path, text) in INITRAMFS_TOOLS {
            write(&root.join(path), text, 0o755)?;
        }
    }
    let example = root.join("etc/atom/update.toml.example");
    write(&example, CONFIG_EXAMPLE, 0o644)
}

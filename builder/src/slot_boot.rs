//! The slot's own boot files: the kernel found in the root tree and an initramfs for it,
//! put where the first stage looks for them (`bootsel::handover::SLOT_*`), so a slot
//! update brings its kernel, modules and initramfs with it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bootsel::handover::{self, SLOT_INITRAMFS, SLOT_KERNEL, SLOT_KERNEL_RELEASE};

use crate::cli::{ImageArgs, InitramfsKind};
use crate::initramfs;

/// A kernel in a root tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundKernel {
    pub release: String,
    /// The kernel image, inside the tree.
    pub image: PathBuf,
    /// Its modules directory (with modules.dep), inside the tree.
    pub modules: PathBuf,
}

/// `path` inside `root` when it is a real directory all the way (no symlink on the way
/// could lead out of the tree).
fn real_dir(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut at = root.to_path_buf();
    for c in rel.split('/') {
        at.push(c);
        if !fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir()) {
            return None;
        }
    }
    Some(at)
}

fn is_regular(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.is_file())
}

/// The modules directory of `release`: /usr/lib/modules (merged /usr) or /lib/modules.
fn modules_dir(root: &Path, release: &str) -> Option<PathBuf> {
    ["usr/lib/modules", "lib/modules"]
        .iter()
        .find_map(|d| real_dir(root, &format!("{d}/{release}")))
}

/// Every kernel in the tree: Debian's `/boot/vmlinuz-RELEASE` and the newer
/// `/usr/lib/modules/RELEASE/vmlinuz`, one entry per release, sorted.
pub fn find_kernels(root: &Path) -> Vec<FoundKernel> {
    let mut found: Vec<FoundKernel> = Vec::new();
    let mut add = |release: String, image: PathBuf| {
        if release.is_empty() || release.contains('/') || found.iter().any(|k| k.release == release) {
            return;
        }
        let modules = modules_dir(root, &release).unwrap_or_else(|| root.join("usr/lib/modules").join(&release));
        found.push(FoundKernel {
            release,
            image,
            modules,
        });
    };
    if let Some(usr_modules) = real_dir(root, "usr/lib/modules")
        && let Ok(rd) = fs::read_dir(&usr_modules)
    {
        for e in rd.flatten() {
            let image = e.path().join("vmlinuz");
            if is_regular(&image) {
                add(e.file_name().to_string_lossy().into_owned(), image);
            }
        }
    }
    if let Some(boot) = real_dir(root, "boot")
        && let Ok(rd) = fs::read_dir(&boot)
    {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(release) = name.strip_prefix("vmlinuz-")
                && is_regular(&e.path())
            {
                add(release.to_owned(), e.path());
            }
        }
    }
    found.sort_by(|a, b| a.release.cmp(&b.release));
    found
}

/// Picks the kernel `--kernel` names: `auto` takes the only one, a release picks it.
pub fn choose(root: &Path, wanted: &str) -> Result<FoundKernel> {
    let kernels = find_kernels(root);
    let list = || {
        kernels
            .iter()
            .map(|k| k.release.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kernel = match wanted {
        "auto" => match kernels.len() {
            0 => bail!(
                "the root filesystem has no kernel (looked for /boot/vmlinuz-RELEASE and \
                 /usr/lib/modules/RELEASE/vmlinuz); install one, or build a slot booted by the \
                 first stage's kernel with --kernel none"
            ),
            1 => kernels[0].clone(),
            _ => bail!(
                "the root filesystem has {} kernels ({}); choose one with --kernel RELEASE",
                kernels.len(),
                list()
            ),
        },
        release => match kernels.iter().find(|k| k.release == release) {
            Some(k) => k.clone(),
            None if kernels.is_empty() => bail!("--kernel {release}: the root filesystem has no kernel"),
            None => bail!("--kernel {release}: the root filesystem has {}", list()),
        },
    };
    let header = read_head(&kernel.image, 4096)?;
    let len = fs::metadata(&kernel.image)?.len();
    handover::check_kernel(&header, len).map_err(|e| anyhow::anyhow!("{}: {e}", shown(root, &kernel.image)))?;
    Ok(kernel)
}

fn read_head(path: &Path, n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(n);
    fs::File::open(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .take(n as u64)
        .read_to_end(&mut out)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(out)
}

/// A path inside the tree as the booted system will see it.
fn shown(root: &Path, p: &Path) -> String {
    format!("/{}", p.strip_prefix(root).unwrap_or(p).display())
}

/// What [`install`] put into the slot.
pub struct Installed {
    pub release: String,
    pub initramfs_bytes: u64,
    pub modules: usize,
}

/// Puts the slot's kernel, its initramfs and the kernel release under `boot/atom/` of the
/// staged tree. `None` with `--kernel none`.
pub fn install(staging: &Path, args: &ImageArgs, epoch: i64) -> Result<Option<Installed>> {
    if args.kernel == "none" {
        return Ok(None);
    }
    let kernel = choose(staging, &args.kernel)?;
    let (initramfs, modules) = match args.initramfs {
        InitramfsKind::Bootsel => {
            let bootsel = args.bootsel.as_deref().context(
                "--bootsel FILE is needed to build the slot's initramfs (or --initramfs tree, or --kernel none)",
            )?;
            if !kernel.modules.join("modules.dep").is_file() && !args.modules.is_empty() {
                bail!(
                    "{} has no modules.dep (run depmod in the tree) but --module was given",
                    shown(staging, &kernel.modules)
                );
            }
            let spec = initramfs::Spec {
                bootsel,
                kernel_modules: (!args.modules.is_empty()).then_some(kernel.modules.as_path()),
                modules: &args.modules,
                config: args.initramfs_config.as_deref(),
                shell: args.shell.as_deref(),
            };
            let built = initramfs::build(&spec, epoch).context("cannot build the slot's initramfs")?;
            (built.compressed, built.modules.len())
        }
        InitramfsKind::Tree => {
            let path = staging.join(format!("boot/initrd.img-{}", kernel.release));
            if !is_regular(&path) {
                bail!(
                    "--initramfs tree: the root filesystem has no {} (run update-initramfs -c -k {} in it)",
                    shown(staging, &path),
                    kernel.release
                );
            }
            let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            (bytes, 0)
        }
    };
    handover::check_initramfs(&initramfs).map_err(|e| anyhow::anyhow!("the slot's initramfs: {e}"))?;
    let boot_dir = Path::new(SLOT_KERNEL).parent().expect("has a directory");
    crate::image::create_dirs_in_tree(staging, boot_dir)?;
    let dest = |rel: &str| -> Result<PathBuf> {
        let p = staging.join(rel);
        if fs::symlink_metadata(&p).is_ok_and(|m| !m.is_file()) {
            bail!("/{rel} in the root filesystem is not a regular file");
        }
        Ok(p)
    };
    let kernel_dest = dest(SLOT_KERNEL)?;
    fs::copy(&kernel.image, &kernel_dest).with_context(|| format!("cannot copy the kernel to /{SLOT_KERNEL}"))?;
    fs::set_permissions(&kernel_dest, fs::Permissions::from_mode(0o644))?;
    let initramfs_bytes = initramfs.len() as u64;
    fs::write(dest(SLOT_INITRAMFS)?, initramfs).with_context(|| format!("cannot write /{SLOT_INITRAMFS}"))?;
    fs::write(dest(SLOT_KERNEL_RELEASE)?, format!("{}\n", kernel.release))
        .with_context(|| format!("cannot write /{SLOT_KERNEL_RELEASE}"))?;
    Ok(Some(Installed {
        release: kernel.release,
        initramfs_bytes,
        modules,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_kernel(len: usize) -> Vec<u8> {
        let mut k = vec![0u8; len];
        k[0x1f1] = 1;
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        k[0x1f4..0x1f8].copy_from_slice(&((len as u32 - 1024) / 16).to_le_bytes());
        k
    }

    #[test]
    fn kernels_are_found_in_both_places_and_choice_is_explicit() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        assert!(choose(root, "auto").unwrap_err().to_string().contains("no kernel"));
        fs::create_dir_all(root.join("boot")).unwrap();
        fs::create_dir_all(root.join("usr/lib/modules/6.1.0-50-amd64")).unwrap();
        fs::write(root.join("boot/vmlinuz-6.1.0-50-amd64"), fake_kernel(8192)).unwrap();
        // A symlink (Debian's /vmlinuz style) is not a second kernel.
        std::os::unix::fs::symlink("vmlinuz-6.1.0-50-amd64", root.join("boot/vmlinuz-link")).unwrap();
        let k = choose(root, "auto").unwrap();
        assert_eq!(k.release, "6.1.0-50-amd64");
        assert_eq!(k.modules, root.join("usr/lib/modules/6.1.0-50-amd64"));

        fs::create_dir_all(root.join("usr/lib/modules/6.12.0-1-amd64")).unwrap();
        fs::write(root.join("usr/lib/modules/6.12.0-1-amd64/vmlinuz"), fake_kernel(8192)).unwrap();
        let e = choose(root, "auto").unwrap_err().to_string();
        assert!(
            e.contains("2 kernels") && e.contains("6.12.0-1-amd64") && e.contains("--kernel"),
            "{e}"
        );
        assert_eq!(choose(root, "6.12.0-1-amd64").unwrap().release, "6.12.0-1-amd64");
        assert!(choose(root, "5.10").unwrap_err().to_string().contains("6.1.0-50-amd64"));
    }

    #[test]
    fn a_file_that_is_not_a_kernel_is_refused() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("boot")).unwrap();
        fs::write(t.path().join("boot/vmlinuz-1"), b"#!/bin/sh\necho not a kernel\n").unwrap();
        let e = choose(t.path(), "auto").unwrap_err().to_string();
        assert!(e.contains("/boot/vmlinuz-1") && e.contains("too short"), "{e}");
        let mut truncated = fake_kernel(8192);
        truncated.truncate(4096);
        fs::write(t.path().join("boot/vmlinuz-1"), truncated).unwrap();
        assert!(choose(t.path(), "auto").unwrap_err().to_string().contains("truncated"));
    }
}

//! kernel: the slot's kernel and modules into the tree (a Debian package through apt, or
//! an unpacked kernel with only the modules named), then its initramfs (bootsel as /init,
//! or the distribution's made by update-initramfs) into /boot/atom, where the first stage
//! finds them: the kernel updates and rolls back with the slot.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use super::packages::Apt;
use super::{Context, Plan, host_path, options};
use crate::build::cache::Inputs;
use crate::build::hooks::{in_tree, run_logged};
use crate::cli::{ImageArgs, InitramfsKind};
use crate::slot_boot;

pub fn inputs(p: &Plan<'_>) -> Result<Inputs> {
    let mut i = Inputs::new();
    let Some(k) = &p.recipe.kernel else { return Ok(i) };
    i.insert("kernel".into(), options(k)?);
    i.insert("epoch".into(), p.epoch.to_string());
    for (name, path) in [
        ("kernel.from", &k.from),
        ("kernel.bootsel", &k.bootsel),
        ("kernel.initramfs_config", &k.initramfs_config),
        ("kernel.shell", &k.shell),
    ] {
        if let Some(path) = path {
            i.insert(name.into(), host_path(path)?);
        }
    }
    Ok(i)
}

pub fn run(cx: &Context<'_>) -> Result<()> {
    let Some(k) = &cx.recipe.kernel else {
        cx.log.note("no [kernel]: the slot boots on the first stage's kernel");
        return Ok(());
    };
    if let Some(pkg) = &k.package {
        cx.progress.step(&format!("apt-get install {pkg}"));
        let apt = Apt::enter(cx.tree)?;
        apt.get(cx, &["update"])?;
        // A locked build takes the locked version.
        let spec = match cx.locked.and_then(|l| l.packages.iter().find(|p| &p.name == pkg)) {
            Some(p) => format!("{pkg}={}", p.version),
            None => pkg.clone(),
        };
        apt.get(
            cx,
            &["install", "-y", "--no-install-recommends", "--allow-downgrades", &spec],
        )?;
        apt.get(cx, &["clean"])?;
    }
    if let Some(from) = &k.from {
        copy_kernel(cx, from, &k.release, &k.modules)?;
    }
    crate::build::rootpath::check_inside(cx.tree, &["boot", "usr", "usr/lib", "lib"])?;
    let found = slot_boot::choose(cx.tree, &k.release)?;
    if k.initramfs == "tree" && !cx.tree.join(format!("boot/initrd.img-{}", found.release)).is_file() {
        cx.progress.step(&format!("update-initramfs -c -k {}", found.release));
        let _mounts = crate::build::chroot::Mounts::prepare(cx.tree)?;
        let mut cmd = in_tree(cx.tree, "update-initramfs");
        cmd.args(["-c", "-k", &found.release]);
        run_logged(&mut cmd, cx.log, cx.command_timeout).context("update-initramfs in the tree")?;
    }
    cx.progress.step("the slot's initramfs into /boot/atom");
    let args = ImageArgs {
        rootfs: cx.tree.to_path_buf(),
        version: cx.recipe.os.version.clone(),
        board: cx.recipe.os.board.clone(),
        size: 0,
        out: cx.tree.to_path_buf(),
        base: None,
        kernel: found.release.clone(),
        initramfs: if k.initramfs == "tree" {
            InitramfsKind::Tree
        } else {
            InitramfsKind::Bootsel
        },
        bootsel: k.bootsel.clone(),
        modules: k.initramfs_modules.clone(),
        initramfs_config: k.initramfs_config.clone(),
        shell: k.shell.clone(),
    };
    let installed = slot_boot::install(cx.tree, &args, cx.epoch)?.expect("a kernel was chosen");
    cx.log.note(&format!(
        "kernel {}: initramfs {} bytes, {} module(s)",
        installed.release, installed.initramfs_bytes, installed.modules
    ));
    Ok(())
}

/// An unpacked kernel (boot/vmlinuz-R, lib/modules/R) into the tree, with all modules or
/// only the named ones and what they depend on; then depmod.
fn copy_kernel(cx: &Context<'_>, from: &Path, release: &str, modules: &[String]) -> Result<()> {
    let found = slot_boot::choose(from, release).with_context(|| format!("kernel.from {}", from.display()))?;
    let r = &found.release;
    cx.progress.step(&format!("kernel {r} from {}", from.display()));
    let boot = crate::build::rootpath::create_dirs(cx.tree, "/boot")?;
    fs::copy(&found.image, boot.join(format!("vmlinuz-{r}")))?;
    let config = from.join(format!("boot/config-{r}"));
    if config.is_file() {
        fs::copy(&config, boot.join(format!("config-{r}")))?;
    }
    let dst = crate::build::rootpath::create_dirs(cx.tree, &format!("/lib/modules/{r}"))?;
    if modules.is_empty() {
        crate::build::tree::copy(&found.modules, &dst)?;
    } else {
        for f in ["modules.order", "modules.builtin", "modules.builtin.modinfo"] {
            let p = found.modules.join(f);
            if p.is_file() {
                fs::copy(&p, dst.join(f))?;
            }
        }
        let out = crate::cmd::run(
            Command::new("modprobe")
                .arg("-d")
                .arg(from)
                .args(["-S", r, "--show-depends", "-a"])
                .args(modules),
        )
        .context("kernel.modules: cannot resolve them (modprobe --show-depends)")?;
        let prefix = found.modules.to_string_lossy().into_owned();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut w = line.split_whitespace();
            if w.next() != Some("insmod") {
                continue;
            }
            let Some(ko) = w.next() else { continue };
            let Some(rel) = ko.strip_prefix(&prefix) else {
                bail!("modprobe named {ko}, outside {}", found.modules.display());
            };
            let target = dst.join(rel.trim_start_matches('/'));
            fs::create_dir_all(target.parent().expect("a module has a directory"))?;
            fs::copy(ko, &target).with_context(|| format!("cannot copy {ko}"))?;
        }
    }
    run_logged(
        Command::new("depmod").arg("-b").arg(cx.tree).arg(r),
        cx.log,
        cx.command_timeout,
    )
    .context("depmod in the tree")
}

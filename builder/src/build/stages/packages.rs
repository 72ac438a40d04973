//! packages: apt inside the Debian tree installs and removes what the recipe lists; with
//! `--locked`, every package is brought to its locked version or the build stops naming
//! the one that is no longer available.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use super::{Context, Plan, options};
use crate::build::cache::Inputs;
use crate::build::chroot::{Mounts, Resolver};
use crate::build::hooks::{in_tree, run_logged};
use crate::build::lock::{self, Package};

pub fn inputs(p: &Plan<'_>) -> Result<Inputs> {
    let mut i = Inputs::new();
    i.insert("packages".into(), options(&p.recipe.packages)?);
    if let Some(l) = p.locked {
        i.insert("locked packages".into(), options(&l.packages)?);
    }
    Ok(i)
}

pub fn run(cx: &Context<'_>) -> Result<()> {
    let p = &cx.recipe.packages;
    let locked = cx.locked.filter(|l| !l.packages.is_empty());
    if cx.recipe.base.debian.is_none() || (p.install.is_empty() && p.remove.is_empty() && locked.is_none()) {
        cx.log.note("nothing to install or remove");
        return Ok(());
    }
    let apt = Apt::enter(cx.tree)?;
    apt.get(cx, &["update"])?;
    if !p.install.is_empty() {
        cx.progress.step(&format!("apt-get install {}", p.install.join(" ")));
        let mut args = vec!["install", "-y"];
        if p.no_recommends {
            args.push("--no-install-recommends");
        }
        // Names only: a name that looks like an option is a package apt will not find.
        args.push("--");
        args.extend(p.install.iter().map(String::as_str));
        apt.get(cx, &args)?;
    }
    if !p.remove.is_empty() {
        cx.progress.step(&format!("apt-get purge {}", p.remove.join(" ")));
        let mut args = vec!["purge", "-y", "--"];
        args.extend(p.remove.iter().map(String::as_str));
        apt.get(cx, &args)?;
    }
    if let Some(l) = locked {
        enforce(cx, &apt, &l.packages)?;
    }
    apt.get(cx, &["clean"])?;
    Ok(())
}

/// Brings the installed packages to their locked versions with apt (a package the lock
/// has but the tree does not yet is left to the stage that installs it, such as the
/// kernel's); then every installed package must be the locked one. The whole list is
/// compared once more when the build ends.
fn enforce(cx: &Context<'_>, apt: &Apt, wanted: &[Package]) -> Result<()> {
    let have = lock::dpkg_packages(cx.tree)?;
    let locked: BTreeMap<&str, &str> = wanted.iter().map(|p| (p.name.as_str(), p.version.as_str())).collect();
    let fix: Vec<String> = have
        .iter()
        .filter_map(|h| match locked.get(h.name.as_str()) {
            Some(v) if *v != h.version => Some(format!("{}={v}", h.name)),
            _ => None,
        })
        .collect();
    if !fix.is_empty() {
        cx.progress
            .step(&format!("bringing {} package(s) to their locked versions", fix.len()));
        for spec in &fix {
            let (name, version) = spec.split_once('=').expect("built with =");
            let out = in_tree(cx.tree, "apt-cache")
                .args(["madison", name])
                .output()
                .context("cannot run apt-cache in the tree")?;
            let known = String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.split('|').nth(1).map(str::trim) == Some(version));
            if !known {
                bail!(
                    "--locked: package {name} {version} is no longer available from the mirrors ({}); \
                     use a snapshot mirror (snapshot.debian.org) in base.debian.mirrors, or rebuild without \
                     --locked to take what the mirrors have",
                    mirrors(cx)
                );
            }
        }
        let mut args = vec!["install", "-y", "--allow-downgrades", "--no-install-recommends"];
        args.extend(fix.iter().map(String::as_str));
        apt.get(cx, &args)?;
    }
    let now = lock::dpkg_packages(cx.tree)?;
    let stray: Vec<String> = now
        .iter()
        .filter(|p| locked.get(p.name.as_str()) != Some(&p.version.as_str()))
        .map(|p| format!("{} {}", p.name, p.version))
        .collect();
    if !stray.is_empty() {
        bail!(
            "--locked: the tree has packages the lock does not: {}",
            stray.join(", ")
        );
    }
    Ok(())
}

fn mirrors(cx: &Context<'_>) -> String {
    match &cx.recipe.base.debian {
        Some(d) if !d.mirrors.is_empty() => d.mirrors.join(", "),
        _ => "this machine's apt sources".into(),
    }
}

/// apt inside the tree: /proc, /sys, /dev, the host's resolver, and a policy-rc.d that
/// keeps package scripts from starting services on the build host.
pub struct Apt {
    tree: std::path::PathBuf,
    _mounts: Mounts,
    _resolver: Resolver,
    _policy: crate::build::chroot::NoServices,
}

impl Apt {
    pub fn enter(tree: &Path) -> Result<Apt> {
        let mounts = Mounts::prepare(tree)?;
        let resolver = Resolver::borrow_host(tree)?;
        let policy = crate::build::chroot::NoServices::install(tree)?;
        Ok(Apt {
            tree: tree.to_path_buf(),
            _mounts: mounts,
            _resolver: resolver,
            _policy: policy,
        })
    }

    pub fn get(&self, cx: &Context<'_>, args: &[&str]) -> Result<()> {
        let mut cmd: Command = in_tree(&self.tree, "apt-get");
        cmd.args([
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
        ])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive");
        run_logged(&mut cmd, cx.log, cx.command_timeout)
            .with_context(|| format!("apt-get {} in the tree", args.join(" ")))
    }
}

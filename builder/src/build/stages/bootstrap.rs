//! bootstrap: the tree's starting point. A Debian suite through mmdebstrap, a tarball of
//! any distribution, a copy of an existing tree, or nothing.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use super::{Context, Plan, host_path, options};
use crate::build::cache::Inputs;
use crate::build::hooks::run_logged;
use crate::build::tree;

pub fn inputs(p: &Plan<'_>) -> Result<Inputs> {
    let b = &p.recipe.base;
    let mut i = Inputs::new();
    i.insert("base".into(), options(b)?);
    if let Some(t) = &b.tarball {
        i.insert("base.tarball".into(), host_path(t)?);
    }
    if let Some(t) = &b.tree {
        i.insert("base.tree".into(), host_path(t)?);
    }
    Ok(i)
}

pub fn run(cx: &Context<'_>) -> Result<()> {
    let b = &cx.recipe.base;
    if let Some(d) = &b.debian {
        tree::remove(cx.tree)?;
        let mut cmd = Command::new("mmdebstrap");
        cmd.arg(format!("--variant={}", d.variant))
            .arg(format!("--components={}", d.components.join(",")))
            .arg("--mode=root");
        if !d.include.is_empty() {
            cmd.arg(format!("--include={}", d.include.join(",")));
        }
        if d.exclude_docs {
            for p in [
                "/usr/share/doc/*",
                "/usr/share/man/*",
                "/usr/share/info/*",
                "/usr/share/locale/*",
            ] {
                cmd.arg(format!("--dpkgopt=path-exclude={p}"));
            }
            // Licences stay: they are what a distributor must ship.
            cmd.arg("--dpkgopt=path-include=/usr/share/doc/*/copyright");
        }
        cmd.arg(&d.suite).arg(cx.tree).args(&d.mirrors);
        cx.progress.step(&format!("mmdebstrap {} ({})", d.suite, d.variant));
        run_logged(&mut cmd, cx.log, cx.command_timeout).context("mmdebstrap could not make the base")?;
    } else if let Some(tarball) = &b.tarball {
        fs::create_dir_all(cx.tree)?;
        cx.progress.step(&format!("unpacking {}", tarball.display()));
        run_logged(
            Command::new("tar")
                .args(["-x", "-p", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-f"])
                .arg(tarball)
                .arg("-C")
                .arg(cx.tree),
            cx.log,
            cx.command_timeout,
        )
        .with_context(|| format!("cannot unpack base.tarball {} (not a tar archive?)", tarball.display()))?;
        looks_like_root(cx.tree, &format!("base.tarball {}", tarball.display()))?;
    } else if let Some(src) = &b.tree {
        if !src.is_dir() {
            bail!("base.tree {} is not a directory", src.display());
        }
        looks_like_root(src, &format!("base.tree {}", src.display()))?;
        cx.progress.step(&format!("copying {}", src.display()));
        tree::copy(src, cx.tree)?;
    } else {
        fs::create_dir_all(cx.tree)?;
    }
    Ok(())
}

/// A root tree has /etc and one of /usr or /bin; anything else is a mistake (a home
/// directory, an unpacked source tarball).
fn looks_like_root(tree: &Path, what: &str) -> Result<()> {
    let has = |p: &str| fs::symlink_metadata(tree.join(p)).is_ok();
    if !has("etc") || !(has("usr") || has("bin")) {
        bail!("{what} is not a root tree (it has no /etc and /usr or /bin)");
    }
    Ok(())
}

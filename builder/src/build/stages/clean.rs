//! clean: what an image must not carry: documentation (licences stay), package caches and
//! lists, logs, the build's machine-id and ssh host keys (every host makes its own), and
//! the recipe's own `clean.paths`.

use std::fs;
use std::path::Path;

use anyhow::{Context as _, Result};

use super::{Context, Plan, options};
use crate::build::cache::Inputs;
use crate::build::rootpath;

pub fn inputs(p: &Plan<'_>) -> Result<Inputs> {
    let mut i = Inputs::new();
    i.insert("clean".into(), options(&p.recipe.clean)?);
    Ok(i)
}

pub fn run(cx: &Context<'_>) -> Result<()> {
    let c = &cx.recipe.clean;
    let t = cx.tree;
    let at = |p: &str| rootpath::resolve(t, p, true);
    let mut removed = 0usize;
    if c.docs {
        for dir in ["/usr/share/man", "/usr/share/info"] {
            removed += empty_dir(&at(dir)?, &|_| true)?;
        }
        // Licences stay: they are what a distributor must ship.
        removed += empty_dir(&at("/usr/share/doc")?, &|p| {
            p.file_name().is_none_or(|n| n != "copyright")
        })?;
    }
    if c.caches {
        for dir in [
            "/var/cache/apt",
            "/var/lib/apt/lists",
            "/var/cache/debconf",
            "/var/cache/ldconfig",
        ] {
            // apt needs the lists/partial and archives/partial directories to exist.
            removed += empty_dir(&at(dir)?, &|p| {
                p.file_name().is_none_or(|n| n != "partial" && n != "lock")
            })?;
        }
        for dir in ["/tmp", "/var/tmp"] {
            removed += empty_dir(&at(dir)?, &|_| true)?;
        }
    }
    if c.logs {
        removed += empty_dir(&at("/var/log")?, &|p| p.is_file() || p.is_symlink())?;
    }
    if c.machine_id {
        let id = at("/etc/machine-id")?;
        if id.is_file() {
            fs::write(&id, "").context("cannot empty /etc/machine-id")?;
        }
        let _ = fs::remove_file(rootpath::resolve(t, "/var/lib/dbus/machine-id", false)?);
        if let Ok(rd) = fs::read_dir(at("/etc/ssh")?) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                    fs::remove_file(e.path())?;
                    removed += 1;
                }
            }
        }
    }
    for p in &c.paths {
        // The last component itself: a link named here is removed, not what it points to.
        let path = rootpath::resolve(t, p, false)?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&path)?,
            Ok(_) => fs::remove_file(&path)?,
            Err(_) => continue,
        }
        removed += 1;
    }
    cx.log.note(&format!("removed {removed} entries"));
    Ok(())
}

/// Removes what `remove` accepts under `dir` (depth first; directories left non-empty
/// stay). Never follows a symlink out of the tree.
fn empty_dir(dir: &Path, remove: &dyn Fn(&Path) -> bool) -> Result<usize> {
    if !fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Ok(0);
    }
    let mut n = 0;
    for e in walkdir::WalkDir::new(dir).min_depth(1).contents_first(true) {
        let e = e?;
        let p = e.path();
        if !remove(p) {
            continue;
        }
        if e.file_type().is_dir() {
            if fs::remove_dir(p).is_ok() {
                n += 1;
            }
        } else {
            fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display()))?;
            n += 1;
        }
    }
    Ok(n)
}

//! files: files and directory trees from the build host, and empty directories, into the
//! tree. Owners default to root (a file's owner on the build host means nothing on a
//! target); a path through a symlink in the tree is refused (it could lead out of it).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use super::{Context, Plan, host_path, options};
use crate::build::cache::Inputs;
use crate::build::rootpath;
use crate::build::tree;

pub fn inputs(p: &Plan<'_>) -> Result<Inputs> {
    let mut i = Inputs::new();
    i.insert("files".into(), options(&p.recipe.files)?);
    i.insert("directories".into(), options(&p.recipe.directories)?);
    for (n, f) in p.recipe.files.iter().enumerate() {
        i.insert(format!("files[{n}].source"), host_path(&f.source)?);
    }
    Ok(i)
}

pub fn run(cx: &Context<'_>) -> Result<()> {
    for f in &cx.recipe.files {
        let (uid, gid) = owner(f.owner.as_deref())?;
        let target = in_tree(cx.tree, &f.target)?;
        let meta = fs::metadata(&f.source).with_context(|| format!("files: cannot read {}", f.source.display()))?;
        cx.log.note(&format!("{} -> {}", f.source.display(), f.target));
        if meta.is_dir() {
            if fs::symlink_metadata(&target).is_ok_and(|m| !m.is_dir()) {
                bail!("files: {} in the tree is not a directory", f.target);
            }
            let scratch = tempfile::tempdir_in(cx.work_dir)?;
            tree::copy(&f.source, scratch.path())?;
            chown_tree(scratch.path(), uid, gid)?;
            tree::copy(scratch.path(), &target)?;
        } else {
            if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir() || m.file_type().is_symlink()) {
                bail!("files: {} in the tree is a directory or a symlink", f.target);
            }
            fs::copy(&f.source, &target)
                .with_context(|| format!("files: cannot copy {} to {}", f.source.display(), f.target))?;
            nix::unistd::chown(&target, Some(uid.into()), Some(gid.into()))?;
            if let Some(mode) = &f.mode {
                fs::set_permissions(&target, fs::Permissions::from_mode(octal(mode)?))?;
            }
        }
    }
    for d in &cx.recipe.directories {
        let (uid, gid) = owner(d.owner.as_deref())?;
        let target = rootpath::create_dirs(cx.tree, &d.path).with_context(|| format!("directories: {}", d.path))?;
        nix::unistd::chown(&target, Some(uid.into()), Some(gid.into()))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(octal(&d.mode)?))?;
    }
    Ok(())
}

/// The host path of `image_path` inside the tree: its parents created and resolved in the
/// tree, the last component itself (a symlink there is not followed).
fn in_tree(tree: &Path, image_path: &str) -> Result<PathBuf> {
    let path = Path::new(image_path);
    let Some(name) = path.file_name() else {
        return rootpath::create_dirs(tree, "/");
    };
    let parent = path
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(rootpath::create_dirs(tree, &parent)?.join(name))
}

fn owner(spec: Option<&str>) -> Result<(u32, u32)> {
    let Some(s) = spec else { return Ok((0, 0)) };
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    match (u.parse(), g.parse()) {
        (Ok(u), Ok(g)) => Ok((u, g)),
        _ => bail!("owner {s:?}: give numeric UID:GID (names mean nothing before the tree has its users)"),
    }
}

fn octal(mode: &str) -> Result<u32> {
    u32::from_str_radix(mode.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .with_context(|| format!("mode {mode:?} is not an octal mode like \"0755\""))
}

fn chown_tree(root: &Path, uid: u32, gid: u32) -> Result<()> {
    for e in walkdir::WalkDir::new(root) {
        let e = e?;
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            e.path(),
            Some(uid.into()),
            Some(gid.into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .with_context(|| format!("cannot chown {}", e.path().display()))?;
    }
    Ok(())
}

//! Isolation of a build: its own mount namespace (so nothing it mounts is seen by the
//! host or by another build, and everything is gone when it exits, even on a crash), and
//! the mounts a command inside the tree needs (/proc, /sys, /dev).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Moves this process into a private mount namespace. Call before any thread starts:
/// a namespace belongs to the thread that unshares (and to what it spawns later).
pub fn private_mount_namespace() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("cannot create a mount namespace for the build (atom-build build runs as root)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("cannot make the build's mounts private")?;
    Ok(())
}

/// /proc, /sys and /dev inside a tree, unmounted when dropped.
pub struct Mounts {
    mounted: Vec<PathBuf>,
}

impl Mounts {
    pub fn prepare(tree: &Path) -> Result<Mounts> {
        let mut m = Mounts { mounted: Vec::new() };
        for (dir, fstype) in [("proc", "proc"), ("sys", "sysfs")] {
            let target = m.dir(tree, dir)?;
            mount(Some(fstype), &target, Some(fstype), MsFlags::empty(), None::<&str>)
                .with_context(|| format!("cannot mount {fstype} on {}", target.display()))?;
            m.mounted.push(target);
        }
        let dev = m.dir(tree, "dev")?;
        mount(
            Some("/dev"),
            &dev,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("cannot bind /dev on {}", dev.display()))?;
        m.mounted.push(dev);
        Ok(m)
    }

    fn dir(&self, tree: &Path, name: &str) -> Result<PathBuf> {
        let p = tree.join(name);
        match fs::symlink_metadata(&p) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => anyhow::bail!("/{name} in the tree is not a directory"),
            Err(_) => fs::create_dir(&p).with_context(|| format!("cannot create {}", p.display()))?,
        }
        Ok(p)
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for p in self.mounted.drain(..).rev() {
            if let Err(e) = umount2(&p, MntFlags::MNT_DETACH) {
                tracing::warn!("cannot unmount {}: {e}", p.display());
            }
        }
    }
}

/// A `policy-rc.d` that forbids starting services while package scripts or hooks run in
/// the tree (they would start on the build host), removed again unless the tree had one.
pub struct NoServices(Option<PathBuf>);

impl NoServices {
    pub fn install(tree: &Path) -> Result<NoServices> {
        use std::os::unix::fs::PermissionsExt;
        let path = super::rootpath::resolve(tree, "/usr/sbin/policy-rc.d", false)?;
        if fs::symlink_metadata(&path).is_ok() || !path.parent().is_some_and(Path::is_dir) {
            return Ok(NoServices(None));
        }
        fs::write(&path, "#!/bin/sh\nexit 101\n").with_context(|| format!("cannot write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        Ok(NoServices(Some(path)))
    }
}

impl Drop for NoServices {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// The build host's /etc/resolv.conf inside the tree while apt runs there, and the
/// tree's own entry (file, link or nothing) put back afterwards.
pub struct Resolver {
    path: PathBuf,
    saved: Option<PathBuf>,
}

impl Resolver {
    pub fn borrow_host(tree: &Path) -> Result<Resolver> {
        let etc = super::rootpath::create_dirs(tree, "/etc")?;
        let path = etc.join("resolv.conf");
        let saved = etc.join(".resolv.conf.atom-build");
        let had = fs::symlink_metadata(&path).is_ok();
        if had {
            fs::rename(&path, &saved).with_context(|| format!("cannot move {} aside", path.display()))?;
        }
        let host = fs::read("/etc/resolv.conf").unwrap_or_default();
        fs::write(&path, host).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Resolver {
            path,
            saved: had.then_some(saved),
        })
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        if let Some(saved) = &self.saved {
            let _ = fs::rename(saved, &self.path);
        }
    }
}

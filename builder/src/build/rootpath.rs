//! Paths of the image, resolved inside the tree as the booted image would resolve them:
//! a symlink's absolute target starts again at the tree's root and `..` stops there, so
//! `/var/run -> /run` in a Debian tree means `TREE/run`, never the build host's `/run`.
//! Every stage that writes, changes or removes a path the recipe names goes through here.

use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{Result, bail};

const MAX_LINKS: usize = 40;

/// The host path of `image_path` in `tree`. With `follow_last` false a symlink at the
/// last component is returned itself (to remove or replace it).
pub fn resolve(tree: &Path, image_path: &str, follow_last: bool) -> Result<PathBuf> {
    let mut pending: Vec<std::ffi::OsString> = components(Path::new(image_path));
    pending.reverse();
    let mut at: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            at.pop();
            continue;
        }
        let mut candidate = tree.to_path_buf();
        candidate.extend(&at);
        candidate.push(&name);
        let is_last = pending.is_empty();
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() && (follow_last || !is_last) => {
                links += 1;
                if links > MAX_LINKS {
                    bail!("{image_path}: too many symlinks in the tree");
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    at.clear();
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
            }
            _ => at.push(name),
        }
    }
    let mut out = tree.to_path_buf();
    out.extend(&at);
    Ok(out)
}

fn components(p: &Path) -> Vec<std::ffi::OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// Creates the directories of `image_dir` inside the tree (resolved there) and returns
/// its host path.
pub fn create_dirs(tree: &Path, image_dir: &str) -> Result<PathBuf> {
    let mut so_far = String::new();
    for c in components(Path::new(image_dir)) {
        so_far.push('/');
        so_far.push_str(&c.to_string_lossy());
        let p = resolve(tree, &so_far, true)?;
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("{so_far} in the tree is not a directory"),
            // A resolved path holds no symlinks: creating its missing parents stays in the tree.
            Err(_) => fs::create_dir_all(&p).map_err(|e| anyhow::anyhow!("cannot create {so_far} in the tree: {e}"))?,
        }
    }
    resolve(tree, image_dir, true)
}

/// Refuses a tree where one of `dirs` leads out of it on the build host (an absolute
/// symlink, or `..` past the root): code that writes with plain host paths (the agent's
/// units, the slot's kernel) runs only on trees where that is safe.
pub fn check_inside(tree: &Path, dirs: &[&str]) -> Result<()> {
    let root = fs::canonicalize(tree)?;
    for d in dirs {
        let host = tree.join(d.trim_start_matches('/'));
        if let Ok(real) = fs::canonicalize(&host)
            && !real.starts_with(&root)
        {
            bail!(
                "/{} in the tree is a symlink that leads out of it on the build host ({}): make it relative",
                d.trim_start_matches('/'),
                real.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_resolve_inside_the_tree() {
        let t = tempfile::tempdir().unwrap();
        let tree = t.path();
        fs::create_dir_all(tree.join("run/lock")).unwrap();
        fs::create_dir_all(tree.join("var")).unwrap();
        symlink("/run", tree.join("var/run")).unwrap();
        symlink("../../../../etc", tree.join("var/up")).unwrap();
        symlink("/tmp/outside", tree.join("var/lock")).unwrap();
        assert_eq!(resolve(tree, "/var/run/lock", true).unwrap(), tree.join("run/lock"));
        assert_eq!(resolve(tree, "/var/up/passwd", true).unwrap(), tree.join("etc/passwd"));
        assert_eq!(resolve(tree, "/var/lock/x", true).unwrap(), tree.join("tmp/outside/x"));
        assert_eq!(resolve(tree, "/var/lock", false).unwrap(), tree.join("var/lock"));
        symlink("loop", tree.join("loop")).unwrap();
        assert!(resolve(tree, "/loop/x", true).is_err());
        assert_eq!(
            create_dirs(tree, "/var/lock/deep").unwrap(),
            tree.join("tmp/outside/deep")
        );
        assert!(tree.join("tmp/outside/deep").is_dir());
    }
}

//! First-boot copy of a slot directory (e.g. /var) onto the state partition.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown};
use std::path::Path;

/// Copies `src` to `dst` (which must not exist) keeping modes, owners and symlinks, via a
/// temporary name so an interrupted copy is redone rather than half-used.
pub fn seed_dir(src: &Path, dst: &Path) -> Result<(), String> {
    let tmp = dst.with_extension("atom-seed");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| format!("cannot remove {}: {e}", tmp.display()))?;
    }
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    copy_tree(src, &tmp).map_err(|e| format!("cannot copy {} to {}: {e}", src.display(), tmp.display()))?;
    fs::rename(&tmp, dst).map_err(|e| format!("cannot rename {}: {e}", tmp.display()))
}

fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
    } else if ft.is_dir() {
        fs::create_dir(dst)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    } else if ft.is_file() {
        fs::copy(src, dst)?;
    } else {
        // Device nodes, sockets and FIFOs do not belong in /var of an image; skip them.
        return Ok(());
    }
    lchown(dst, Some(meta.uid()), Some(meta.gid()))
}

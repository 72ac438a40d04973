//! Trust material and state that someone else could change are refused.
//!
//! A trusted key that any local user could add, or a state file that could lower the
//! rollback floor or fake a checkpoint, would undo the signature checks; so, as ssh's
//! StrictModes does, the keys directory, each key and the state directory must belong to
//! root (or to the user the agent runs as) and be writable by no one else.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use crate::error::Failure;

/// Refuses `path` unless only its owner, root or this process's user, may write it.
pub fn check_private(path: &Path, what: &str) -> Result<(), Failure> {
    let meta =
        std::fs::metadata(path).map_err(|e| Failure::error(format!("cannot read {what} {}: {e}", path.display())))?;
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(Failure::refused(format!(
            "{what} {} belongs to uid {}, not to root: refusing to trust it (chown root)",
            path.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(Failure::refused(format!(
            "{what} {} is writable by {} (mode {:04o}): refusing to trust it (chmod go-w)",
            path.display(),
            if meta.mode() & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// The state directory, made owner-only if it is new, and checked like keys.
pub fn private_state_dir(dir: &Path) -> Result<(), Failure> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Failure::error(format!("cannot create {}: {e}", dir.display())))?;
    check_private(dir, "state directory")
}

/// The keys directory and every `*.pub` in it.
pub fn check_keys_dir(dir: &Path) -> Result<(), Failure> {
    check_private(dir, "keys directory")?;
    let entries = std::fs::read_dir(dir).map_err(|e| Failure::error(format!("cannot read {}: {e}", dir.display())))?;
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "pub") {
            check_private(&p, "trusted key")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn group_or_world_writable_is_refused_and_owner_only_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        chmod(&keys, 0o755);
        std::fs::write(keys.join("a.pub"), "x").unwrap();
        chmod(&keys.join("a.pub"), 0o644);
        std::fs::write(keys.join("notes.txt"), "x").unwrap();
        chmod(&keys.join("notes.txt"), 0o666);
        check_keys_dir(&keys).unwrap();

        chmod(&keys.join("a.pub"), 0o664);
        let e = check_keys_dir(&keys).unwrap_err();
        assert!(e.message.contains("writable by its group (mode 0664)"), "{}", e.message);
        chmod(&keys.join("a.pub"), 0o644);
        chmod(&keys, 0o777);
        let e = check_keys_dir(&keys).unwrap_err();
        assert!(
            e.message.contains("keys directory") && e.message.contains("everyone"),
            "{}",
            e.message
        );
    }

    #[test]
    fn new_state_directory_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("var/lib/atom");
        private_state_dir(&state).unwrap();
        assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
        chmod(&state, 0o777);
        assert!(private_state_dir(&state).is_err());
    }
}

//! Swapping a merged layer in, safely against a cut at any moment.
//!
//! The merge writes `LAYER.merging` beside `LAYER`; one `renameat2(RENAME_EXCHANGE)` swaps
//! the two directories, so `LAYER` is always either the old layer or the complete new one.
//! What is left at `LAYER.merging` (a cut merge, or the old layer after the swap) is removed
//! by [`recover`] at the next boot, before anything reads the layer.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

pub fn staging(layer: &Path) -> PathBuf {
    let mut s = layer.as_os_str().to_owned();
    s.push(".merging");
    PathBuf::from(s)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

fn sync_tree(path: &Path) -> io::Result<()> {
    let md = fs::symlink_metadata(path)?;
    if md.is_dir() {
        for e in fs::read_dir(path)? {
            sync_tree(&e?.path())?;
        }
        sync_dir(path)
    } else if md.is_file() {
        fs::File::open(path)?.sync_all()
    } else {
        Ok(())
    }
}

/// Makes the complete tree at `staging(layer)` the layer, and removes the old one.
pub fn replace(layer: &Path) -> io::Result<()> {
    let staged = staging(layer);
    // Durable before it becomes the layer: a power cut must not leave half-written files.
    sync_tree(&staged)?;
    if fs::symlink_metadata(layer).is_ok() {
        renameat2(AT_FDCWD, &staged, AT_FDCWD, layer, RenameFlags::RENAME_EXCHANGE)
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
    } else {
        fs::rename(&staged, layer)?;
    }
    if let Some(parent) = layer.parent() {
        sync_dir(parent)?;
    }
    remove_leftover(layer)
}

fn remove_leftover(layer: &Path) -> io::Result<()> {
    match fs::remove_dir_all(staging(layer)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Before a layer is used or merged: what a cut merge or swap left is removed.
pub fn recover(layer: &Path) -> io::Result<()> {
    remove_leftover(layer)
}

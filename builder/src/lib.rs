//! `atom-build` as a library: the stages of an OS build (`build`, `recipe`), the image,
//! disk and initramfs makers, and the repository side (publish, sign, keys, refresh).
//! The `atom-build` binary is a thin command line over it; the build service and tests
//! use it directly.

pub mod audit;
pub mod build;
pub mod cli;
pub mod cmd;
pub mod disk;
pub mod ext4;
pub mod image;
pub mod initramfs;
pub mod install;
pub mod installer;
pub mod keygen;
pub mod keyring;
pub mod modules;
pub mod publish;
pub mod recipe;
pub mod refresh;
pub mod resign;
pub mod service;
pub mod sign;
pub mod signing;
pub mod slot_boot;
pub mod tree_sync;

/// The error and its causes, each said once: many errors already quote their cause.
pub fn said_once(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

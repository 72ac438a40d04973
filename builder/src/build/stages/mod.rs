//! The stages of a build, one module each. A stage is a function of its inputs: `inputs`
//! names everything its result depends on (options, files on the build host, the epoch),
//! `run` makes the result, in the tree or as files in the output directory.

mod atom;
mod bootstrap;
mod clean;
mod configure;
mod files;
mod image;
mod kernel;
mod outputs;
mod packages;
mod publish;
mod scripts;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use serde::Serialize;

use super::cache::Inputs;
use super::lock::Lock;
use super::progress::{Progress, StageLog};
use crate::recipe::Recipe;

pub use image::{BaseImage, resolve_base};
pub use publish::check_version_grows;

/// What a stage leaves behind.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// The tree after it.
    Tree,
    /// Files in the output directory.
    Artifacts,
    /// Something outside the build (the repository): never cached.
    Effect,
}

pub fn kind(stage: &str) -> Kind {
    match stage {
        "image" | "outputs" => Kind::Artifacts,
        "publish" => Kind::Effect,
        _ => Kind::Tree,
    }
}

/// Whether a stage's hooks run inside the tree by default.
pub fn hooks_in_tree_by_default(_stage: &str) -> bool {
    false
}

/// What inputs are computed from.
pub struct Plan<'a> {
    pub recipe: &'a Recipe,
    pub epoch: i64,
    pub base_image: &'a BaseImage,
    pub locked: Option<&'a Lock>,
}

pub struct Context<'a> {
    pub recipe: &'a Recipe,
    pub recipe_digest: &'a str,
    pub tree: &'a Path,
    pub out_dir: &'a Path,
    pub work_dir: &'a Path,
    pub build_dir: &'a Path,
    pub recipe_dir: &'a Path,
    pub epoch: i64,
    pub log: &'a StageLog,
    pub progress: &'a Progress,
    pub locked: Option<&'a Lock>,
    pub base_image: &'a BaseImage,
    /// Limit of a command a stage runs (apt, mmdebstrap, update-initramfs).
    pub command_timeout: Duration,
}

pub fn inputs(stage: &str, p: &Plan<'_>) -> Result<Inputs> {
    let mut i = match stage {
        "bootstrap" => bootstrap::inputs(p)?,
        "packages" => packages::inputs(p)?,
        "files" => files::inputs(p)?,
        "configure" => configure::inputs(p)?,
        "scripts" => scripts::inputs(p)?,
        "atom" => atom::inputs(p)?,
        "kernel" => kernel::inputs(p)?,
        "clean" => clean::inputs(p)?,
        "image" => image::inputs(p)?,
        "outputs" => outputs::inputs(p)?,
        "publish" => publish::inputs(p)?,
        other => bail!("no stage {other}"),
    };
    let has_hooks = p
        .recipe
        .hooks
        .get(stage)
        .is_some_and(|h| !h.before.is_empty() || !h.after.is_empty());
    if has_hooks || (stage == "scripts" && !p.recipe.scripts.is_empty()) {
        // Hooks see os.* and SOURCE_DATE_EPOCH in their environment: what they make may
        // depend on them.
        i.insert("os".into(), options(&p.recipe.os)?);
        i.insert("epoch".into(), p.epoch.to_string());
    }
    if let Some(hooks) = p.recipe.hooks.get(stage) {
        let chroot = hooks_in_tree_by_default(stage);
        for (when, list) in [("before", &hooks.before), ("after", &hooks.after)] {
            for (n, h) in list.iter().enumerate() {
                i.insert(format!("hooks.{stage}.{when}[{n}]"), super::hooks::digest(h, chroot)?);
            }
        }
    }
    Ok(i)
}

/// Runs the stage; returns the files it made in the output directory.
pub fn run(stage: &str, cx: &Context<'_>) -> Result<Vec<PathBuf>> {
    match stage {
        "bootstrap" => bootstrap::run(cx).map(|()| Vec::new()),
        "packages" => packages::run(cx).map(|()| Vec::new()),
        "files" => files::run(cx).map(|()| Vec::new()),
        "configure" => configure::run(cx).map(|()| Vec::new()),
        "scripts" => scripts::run(cx).map(|()| Vec::new()),
        "atom" => atom::run(cx).map(|()| Vec::new()),
        "kernel" => kernel::run(cx).map(|()| Vec::new()),
        "clean" => clean::run(cx).map(|()| Vec::new()),
        "image" => image::run(cx),
        "outputs" => outputs::run(cx),
        "publish" => publish::run(cx).map(|()| Vec::new()),
        other => bail!("no stage {other}"),
    }
}

/// The digest of a tarball or tree base (recorded in the lock), if the base is one.
pub fn base_source_digest(r: &Recipe) -> Result<Option<String>> {
    let b = &r.base;
    match b.tarball.as_ref().or(b.tree.as_ref()) {
        Some(path) => Ok(Some(host_path(path)?)),
        None => Ok(None),
    }
}

/// The digest of some options, for a stage's inputs.
pub fn options(value: &impl Serialize) -> Result<String> {
    Ok(blake3::hash(&serde_json::to_vec(value)?).to_hex().to_string())
}

/// The digest of a file or tree on the build host.
pub fn host_path(path: &Path) -> Result<String> {
    use anyhow::Context as _;
    super::tree::digest(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The file name stem of this build's outputs.
pub fn stem(r: &Recipe) -> String {
    format!("{}-{}", r.os.name, r.os.version)
}

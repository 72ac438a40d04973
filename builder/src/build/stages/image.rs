//! image: the tree as a reproducible ext4 slot image. Layout-stable by default: built on
//! the channel's current image from the repository (`image.base = "auto"`), so an update
//! changes only the blocks whose files changed.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use atom_dist::Digest;
use atom_dist::repo::layout;

use super::{Context, Plan, options, stem};
use crate::build::cache::Inputs;
use crate::build::lock::Lock;
use crate::cli::{ImageArgs, InitramfsKind};
use crate::recipe::Recipe;

/// The image a build is layout-stable against.
#[derive(Clone, Debug)]
pub enum BaseImage {
    None,
    File {
        path: PathBuf,
        digest: Digest,
    },
    /// A published image, by digest, in the recipe's repository.
    Repo {
        repo: PathBuf,
        digest: Digest,
    },
}

impl BaseImage {
    pub fn digest(&self) -> Option<&Digest> {
        match self {
            BaseImage::None => None,
            BaseImage::File { digest, .. } | BaseImage::Repo { digest, .. } => Some(digest),
        }
    }
}

pub fn resolve_base(r: &Recipe, locked: Option<&Lock>) -> Result<BaseImage> {
    if let Some(l) = locked {
        let Some(hex) = &l.base_image else {
            return Ok(BaseImage::None);
        };
        let digest: Digest = hex.parse().map_err(|e| anyhow::anyhow!("the lock's base_image: {e}"))?;
        let publish = r
            .publish
            .as_ref()
            .context("--locked: the lock names a base image, and the recipe no [publish] repository to find it in")?;
        let path = publish.repo.join(layout::payload(&digest));
        if !path.is_file() {
            bail!(
                "--locked: the locked base image {hex} is not in {} any more",
                publish.repo.display()
            );
        }
        return Ok(BaseImage::Repo {
            repo: publish.repo.clone(),
            digest,
        });
    }
    match r.image.base.as_str() {
        "none" => Ok(BaseImage::None),
        "auto" => {
            let (Some(p), Some(m)) = (&r.publish, super::publish::current_manifest(r)?) else {
                return Ok(BaseImage::None);
            };
            if m.board != r.os.board {
                return Ok(BaseImage::None);
            }
            Ok(BaseImage::Repo {
                repo: p.repo.clone(),
                digest: m.image.digest,
            })
        }
        path => {
            let path = PathBuf::from(path);
            let (digest, _) = Digest::of_file(&path).with_context(|| format!("image.base {}", path.display()))?;
            Ok(BaseImage::File { path, digest })
        }
    }
}

pub fn inputs(p: &Plan<'_>) -> Result<Inputs> {
    let mut i = Inputs::new();
    i.insert("image".into(), options(&p.recipe.image)?);
    i.insert("os".into(), options(&p.recipe.os)?);
    i.insert("epoch".into(), p.epoch.to_string());
    i.insert(
        "base image".into(),
        p.base_image.digest().map(|d| d.hex()).unwrap_or_else(|| "none".into()),
    );
    Ok(i)
}

pub fn run(cx: &Context<'_>) -> Result<Vec<PathBuf>> {
    let base = match cx.base_image {
        BaseImage::None => None,
        BaseImage::File { path, .. } => Some(path.clone()),
        BaseImage::Repo { repo, digest } => Some(unpack_published(cx, repo, digest)?),
    };
    let out = cx.out_dir.join(format!("{}.img", stem(cx.recipe)));
    cx.progress.step(match &base {
        Some(_) => "ext4 image, layout-stable on the previous image",
        None => "ext4 image",
    });
    let args = ImageArgs {
        rootfs: cx.tree.to_path_buf(),
        version: cx.recipe.os.version.clone(),
        board: cx.recipe.os.board.clone(),
        size: cx.recipe.image_size()?,
        out: out.clone(),
        base,
        kernel: "none".into(),
        initramfs: InitramfsKind::Bootsel,
        bootsel: None,
        modules: Vec::new(),
        initramfs_config: None,
        shell: None,
    };
    let report = crate::image::build(&args, cx.epoch)?;
    cx.log.note(&format!(
        "built {}: {} bytes, {}",
        out.display(),
        report.size,
        report.digest
    ));
    Ok(vec![out])
}

/// The published image, decompressed into the work directory and checked against its
/// digest.
fn unpack_published(cx: &Context<'_>, repo: &std::path::Path, digest: &Digest) -> Result<PathBuf> {
    let payload = repo.join(layout::payload(digest));
    let dst = cx.work_dir.join("base.img");
    cx.progress
        .step(&format!("unpacking the base image {}", &digest.hex()[..16]));
    let src = fs::File::open(&payload).with_context(|| format!("cannot read {}", payload.display()))?;
    let mut dec = zstd::Decoder::new(src)?;
    let mut out = fs::File::create(&dst)?;
    std::io::copy(&mut dec, &mut out).with_context(|| format!("cannot decompress {}", payload.display()))?;
    drop(out);
    let (got, _) = Digest::of_file(&dst)?;
    if &got != digest {
        bail!(
            "the published image {} does not match its digest (repository damaged?)",
            payload.display()
        );
    }
    Ok(dst)
}

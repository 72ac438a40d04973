//! `atom-update etc`: this host's `/etc` against its image's, and the last merge's conflicts.
//!
//! bootsel keeps each slot's `/etc` changes in a layer on the state partition
//! (`/run/atom/state/etc/slots/<slot>/upper`), shows the image's own `/etc` read-only at
//! `/run/atom/image-etc`, and records what the merge at an image's first boot did in
//! `slots/<slot>/merge.toml`. These verbs read them; `reset` writes through `/etc` itself
//! (never into the layer under a mounted overlay).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bootsel::etcmerge::entry::{self, Kind, Meta};
use bootsel::etcmerge::{IMAGE_ETC, LAYERS, MergeRecord, NEW_SUFFIX};
use bootsel::record::BootRecord;
use serde::Serialize;

use crate::config::Settings;
use crate::error::Failure;

/// Where the pieces are, from the boot record's directory (`/run/atom` on a host).
pub struct EtcPaths {
    pub slot: String,
    pub layer: PathBuf,
    pub image: PathBuf,
    pub live: PathBuf,
}

impl EtcPaths {
    pub fn of(s: &Settings) -> Result<EtcPaths, Failure> {
        let record = BootRecord::load(&s.boot_record).map_err(|e| {
            Failure::not_allowed(format!(
                "{e}: `etc` needs a host booted by bootsel with /etc as an overlay on the state partition"
            ))
        })?;
        // boot_record is <run>/atom/boot.toml
        let run = s
            .boot_record
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| Failure::error("the boot record path has no run directory"))?;
        let dir = run.join(LAYERS).join("slots").join(&record.slot);
        Ok(EtcPaths {
            layer: dir.join("upper"),
            image: run.join(IMAGE_ETC),
            live: s.etc_dir.clone(),
            slot: record.slot,
        })
    }

    fn record(&self) -> Option<MergeRecord> {
        let path = self.layer.parent()?.join("merge.toml");
        toml::from_str(&fs::read_to_string(path).ok()?).ok()
    }

    fn resolved_path(&self) -> PathBuf {
        self.layer.with_file_name(bootsel::etcmerge::RESOLVED)
    }

    /// Conflicts of the last merge an operator marked as looked at (`resolve`, `reset`).
    fn resolved(&self) -> Vec<String> {
        fs::read_to_string(self.resolved_path())
            .ok()
            .and_then(|t| toml::from_str::<Resolved>(&t).ok())
            .map(|r| r.paths)
            .unwrap_or_default()
    }

    fn mark_resolved(&self, rel: &str) -> Result<(), Failure> {
        let mut r = Resolved { paths: self.resolved() };
        if !r.paths.iter().any(|p| p == rel) {
            r.paths.push(rel.to_owned());
        }
        let path = self.resolved_path();
        let text = toml::to_string(&r).map_err(|e| Failure::error(e.to_string()))?;
        atom_dist::fsutil::write_atomic_bytes(&path, 0o644, text.as_bytes())
            .map_err(|e| Failure::error(format!("cannot write {}: {e}", path.display())))
    }
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    /// modified | added | deleted | replaced (a directory replaced whole)
    pub change: &'static str,
}

/// What this host changed against its image: the entries of its layer.
pub fn diff(p: &EtcPaths) -> Result<Vec<Change>, Failure> {
    if !p.layer.is_dir() {
        return Err(Failure::not_allowed(format!(
            "no /etc layer at {} (a stateless host, or /etc is not an overlay)",
            p.layer.display()
        )));
    }
    let mut out = Vec::new();
    walk(p, "", &mut out).map_err(|e| Failure::error(format!("cannot read {}: {e}", p.layer.display())))?;
    Ok(out)
}

fn walk(p: &EtcPaths, rel: &str, out: &mut Vec<Change>) -> std::io::Result<()> {
    let dir = if rel.is_empty() {
        p.layer.clone()
    } else {
        p.layer.join(rel)
    };
    let mut names: Vec<_> = fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let name = name.to_string_lossy().into_owned();
        let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
        let (l, i) = (p.layer.join(&child), p.image.join(&child));
        let Some(m) = Meta::of(&l)? else { continue };
        let in_image = Meta::of(&i)?.is_some();
        match m.kind {
            Kind::Whiteout => out.push(Change {
                path: child,
                change: "deleted",
            }),
            Kind::Dir if entry::is_opaque(&l) => out.push(Change {
                path: child,
                change: "replaced",
            }),
            Kind::Dir if in_image && entry::same(&l, &i)? => walk(p, &child, out)?,
            Kind::Dir if in_image => {
                out.push(Change {
                    path: child.clone(),
                    change: "modified",
                });
                walk(p, &child, out)?;
            }
            Kind::Dir => {
                out.push(Change {
                    path: child.clone(),
                    change: "added",
                });
                walk(p, &child, out)?;
            }
            _ if !in_image => out.push(Change {
                path: child,
                change: "added",
            }),
            _ if entry::same(&l, &i)? => {}
            _ => out.push(Change {
                path: child,
                change: "modified",
            }),
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct ConflictView {
    pub path: String,
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_version: Option<String>,
    /// Still to be looked at: the image's version is still beside the file.
    pub unresolved: bool,
}

/// The conflicts of the merge that made this slot's layer.
pub fn conflicts(p: &EtcPaths) -> (Option<String>, Vec<ConflictView>) {
    let Some(r) = p.record() else {
        return (None, Vec::new());
    };
    let resolved = p.resolved();
    let views = r
        .report
        .conflicts
        .into_iter()
        .map(|c| ConflictView {
            unresolved: !resolved.contains(&c.path)
                && c.image_version
                    .as_ref()
                    .is_none_or(|v| fs::symlink_metadata(p.live.join(v)).is_ok()),
            path: c.path,
            what: c.what,
            image_version: c.image_version,
        })
        .collect();
    (Some(r.from_slot), views)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Resolved {
    paths: Vec<String>,
}

/// Marks conflicts of the last merge as looked at (until the next merge starts a new list).
pub fn resolve(p: &EtcPaths, rel: &str) -> Result<String, Failure> {
    let rel = rel.trim_start_matches("/etc/").trim_start_matches('/');
    let (_, list) = conflicts(p);
    if !list.iter().any(|c| c.path == rel) {
        return Err(Failure::not_allowed(format!(
            "/etc/{rel} is not a conflict of the last merge"
        )));
    }
    p.mark_resolved(rel)?;
    Ok(format!("/etc/{rel}: marked resolved"))
}

/// How many conflicts still need a look (for `status`).
pub fn unresolved(s: &Settings) -> usize {
    EtcPaths::of(s).map_or(0, |p| conflicts(&p).1.iter().filter(|c| c.unresolved).count())
}

/// The first component of `rel` below `root` that is a symlink: following it could reach
/// anywhere outside /etc.
fn symlink_on_the_way(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut at = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        at.push(part);
        if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Some(at);
        }
    }
    None
}

/// `dir` is a mount of its own (the image's /etc bound by bootsel), not an empty
/// directory: without it, "the image has no such file" would delete the host's.
fn is_mounted(dir: &Path) -> bool {
    match (fs::metadata(dir), dir.parent().map(fs::metadata)) {
        (Ok(d), Some(Ok(parent))) => d.dev() != parent.dev(),
        _ => false,
    }
}

/// Puts the image's version of `rel` back in `/etc` (or removes a file the image does not
/// have), and drops a `.atom-new` beside it. The next merge then prunes it from the layer.
/// The new version is written beside and renamed over the old: a power cut leaves one or
/// the other, never neither (this may be `shadow` or `fstab`).
pub fn reset(p: &EtcPaths, rel: &str) -> Result<String, Failure> {
    let rel = rel.trim_start_matches("/etc/").trim_start_matches('/');
    if rel.is_empty() || rel.split('/').any(|c| c == ".." || c == "." || c.is_empty()) {
        return Err(Failure::error(format!("{rel:?} is not a path below /etc")));
    }
    if !is_mounted(&p.image) {
        return Err(Failure::not_allowed(format!(
            "the image's /etc is not at {} (bootsel binds it there at boot): nothing to reset from",
            p.image.display()
        )));
    }
    for root in [&p.live, &p.image] {
        if let Some(link) = symlink_on_the_way(root, rel) {
            return Err(Failure::error(format!(
                "{} is a symlink: not resetting through it",
                link.display()
            )));
        }
    }
    let (live, image) = (p.live.join(rel), p.image.join(rel));
    let io = |e: std::io::Error| Failure::error(format!("cannot reset /etc/{rel}: {e}"));
    let image_meta = Meta::of(&image).map_err(io)?;
    let live_meta = fs::symlink_metadata(&live).ok();
    if live_meta.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(Failure::error(format!(
            "/etc/{rel} is a directory here; reset the files in it"
        )));
    }
    let what = match image_meta.as_ref().map(|m| &m.kind) {
        Some(Kind::Dir) => {
            return Err(Failure::error(format!(
                "/etc/{rel} is a directory in the image; reset the files in it"
            )));
        }
        Some(_) => {
            if let Some(parent) = live.parent() {
                fs::create_dir_all(parent).map_err(io)?;
            }
            let tmp = live.with_file_name(format!(
                ".{}.atom-reset",
                live.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
            ));
            let _ = fs::remove_file(&tmp);
            // Type, bytes, mode, owner and xattrs, as bootsel's merge copies them.
            bootsel::etcmerge::copy::entry(&image, &tmp)
                .and_then(|()| fs::File::open(&tmp).and_then(|f| f.sync_all()).or(Ok(())))
                .and_then(|()| fs::rename(&tmp, &live))
                .map_err(|e| {
                    let _ = fs::remove_file(&tmp);
                    io(e)
                })?;
            "the image's version restored"
        }
        None => {
            if live_meta.is_some() {
                fs::remove_file(&live).map_err(io)?;
            }
            "removed (the image has no such file)"
        }
    };
    if conflicts(p).1.iter().any(|c| c.path == rel) {
        p.mark_resolved(rel)?;
    }
    let beside = p.live.join(format!("{rel}{NEW_SUFFIX}"));
    if fs::symlink_metadata(&beside).is_ok() {
        fs::remove_file(&beside).map_err(io)?;
    }
    Ok(format!("/etc/{rel}: {what}"))
}

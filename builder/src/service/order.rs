//! An order's request checked against its token and the service's rules, and turned into
//! what a build runs. The checks are the service's security boundary: a template-only
//! token can change only the keys `--overridable` names, so it cannot point a build at
//! files or hooks of the build host; whole recipes (whose hooks run on the host) and
//! publishing need scopes.

use std::path::{Path, PathBuf};

use super::App;
use super::model::{BuildSpec, Notify, OrderRequest, TokenRow};
use crate::build::Preview;

/// Disk formats an order may ask for (`outputs.disk.formats`); `tar.zst` is the tarball.
pub const DISK_FORMATS: [&str; 5] = ["raw", "raw.zst", "qcow2", "vmdk", "vhd"];

#[derive(Debug)]
pub enum Refusal {
    /// The token may not do this (403).
    Forbidden(String),
    /// The request is wrong (400).
    Bad(String),
}

pub struct Checked {
    pub spec: BuildSpec,
    pub preview: Preview,
}

impl Checked {
    pub fn recipe_name(&self) -> &str {
        &self.preview.loaded.recipe.os.name
    }
}

/// The templates orders can name: NAME of each NAME.toml in the templates directory.
pub fn template_names(templates: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(templates)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let name = name.strip_suffix(".toml")?.to_string();
            (valid_template_name(&name) && e.path().is_file()).then_some(name)
        })
        .collect();
    names.sort();
    names
}

pub(super) fn valid_template_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Where a build's recipe is: a template in `templates`, or the text an order sent,
/// kept under its own digest in `data`/recipes.
pub fn recipe_path(templates: &Path, data: &Path, spec: &BuildSpec) -> PathBuf {
    match (&spec.template, &spec.recipe) {
        (Some(t), _) => templates.join(format!("{t}.toml")),
        (None, Some(text)) => data
            .join("recipes")
            .join(format!("{}.toml", blake3::hash(text.as_bytes()).to_hex())),
        (None, None) => data.join("recipes").join("missing.toml"),
    }
}

/// A Debian package name, optionally with an architecture, a version or a release
/// (`name[:arch][=version|/release]`): nothing apt could read as an option.
fn valid_package(name: &str) -> bool {
    let (base, pin) = match name.find(['=', '/']) {
        Some(i) => (&name[..i], Some(&name[i + 1..])),
        None => (name, None),
    };
    let (pkg, arch) = match base.split_once(':') {
        Some((p, a)) => (p, Some(a)),
        None => (base, None),
    };
    let pkg_ok = pkg.len() >= 2
        && pkg
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && pkg
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    let arch_ok = arch.is_none_or(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    let pin_ok =
        pin.is_none_or(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"+.:~_-".contains(&b)));
    pkg_ok && arch_ok && pin_ok
}

/// The names a template-only token's `packages.*` override gives (a TOML array or a
/// bare word) must be package names: apt reads a word starting with '-' as an option.
fn check_package_names(key: &str, value: &str) -> Result<(), Refusal> {
    let names: Vec<String> = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(t) => match t.get("v") {
            Some(toml::Value::Array(a)) => a.iter().map(|v| v.as_str().unwrap_or("").to_string()).collect(),
            Some(toml::Value::String(one)) => vec![one.clone()],
            _ => vec![value.to_string()],
        },
        Err(_) => vec![value.trim().to_string()],
    };
    match names.iter().find(|n| !valid_package(n)) {
        Some(bad) => Err(Refusal::Forbidden(format!("{key}: {bad:?} is not a package name"))),
        None => Ok(()),
    }
}

fn allowed_override(app: &App, key: &str) -> bool {
    app.overridable
        .iter()
        .any(|k| key == k || key.strip_prefix(k.as_str()).is_some_and(|rest| rest.starts_with('.')))
}

/// Checks the request and previews the build (which loads the recipe: its errors come
/// back to the caller naming the key). Blocking: it reads the recipe and its files.
pub fn check(app: &App, token: &TokenRow, req: &OrderRequest) -> Result<Checked, Refusal> {
    let bad = |m: String| Refusal::Bad(m);
    match (&req.template, &req.recipe) {
        (Some(_), Some(_)) => return Err(bad("give either \"template\" or \"recipe\", not both".into())),
        (None, None) => {
            return Err(bad(
                "give \"template\" (a template of this service) or \"recipe\"".into()
            ));
        }
        (Some(t), None) if !valid_template_name(t) => {
            return Err(bad(format!(
                "template {t:?}: a name is letters, digits, '.', '_' and '-'"
            )));
        }
        (None, Some(_)) if !token.may("recipe") => {
            return Err(Refusal::Forbidden(
                "this token may order only templates (a whole recipe needs the \"recipe\" scope)".into(),
            ));
        }
        _ => {}
    }
    if req.publish && !token.may("publish") {
        return Err(Refusal::Forbidden(
            "this token may not publish (needs the \"publish\" scope)".into(),
        ));
    }
    if let Some(n) = &req.notify {
        // The service's relay would otherwise mail anyone any token holder names.
        if !n.email.is_empty() && !token.may("email") {
            return Err(Refusal::Forbidden(
                "this token may not send e-mail notices (needs the \"email\" scope)".into(),
            ));
        }
        check_notify(app, n)?;
    }
    let mut set = Vec::new();
    for s in &req.set {
        let Some((key, _)) = s.split_once('=') else {
            return Err(bad(format!("set {s:?}: give KEY=VALUE")));
        };
        if !token.may("recipe") && !allowed_override(app, key.trim()) {
            return Err(Refusal::Forbidden(format!(
                "set {key}: this service lets orders change only {}",
                app.overridable.join(", ")
            )));
        }
        if !token.may("recipe") && key.trim().starts_with("packages.") {
            check_package_names(key.trim(), &s[key.len() + 1..])?;
        }
        set.push(s.clone());
    }
    let mut disk = Vec::new();
    let format_key = |key: &str| {
        if token.may("recipe") || allowed_override(app, key) {
            Ok(())
        } else {
            Err(Refusal::Forbidden(format!(
                "formats: this service does not let orders set {key}"
            )))
        }
    };
    for f in &req.formats {
        match f.as_str() {
            "tar.zst" => {
                format_key("outputs.tarball")?;
                set.push("outputs.tarball=true".into());
            }
            f if DISK_FORMATS.contains(&f) => {
                format_key("outputs.disk.formats")?;
                disk.push(format!("{f:?}"));
            }
            f => {
                return Err(bad(format!(
                    "format {f:?}: formats are {} and tar.zst",
                    DISK_FORMATS.join(", ")
                )));
            }
        }
    }
    if !disk.is_empty() {
        set.push(format!("outputs.disk.formats=[{}]", disk.join(", ")));
    }
    let spec = BuildSpec {
        template: req.template.clone(),
        recipe: req.recipe.clone(),
        set,
        skip: if req.publish {
            Vec::new()
        } else {
            vec!["publish".into()]
        },
    };
    let path =
        keep_recipe(&app.templates, &app.data, &spec).map_err(|e| bad(format!("cannot keep the recipe: {e}")))?;
    if !path.is_file() {
        return Err(bad(format!(
            "no template {:?} on this service",
            spec.template.as_deref().unwrap_or_default()
        )));
    }
    let preview = crate::build::preview(&path, &spec.set, &spec.skip, &app.cache)
        .map_err(|e| bad(format!("the recipe does not build: {}", crate::said_once(&e))))?;
    let r = &preview.loaded.recipe;
    if !token.may("recipe") {
        let size =
            parse_size::parse_size(&r.image.size).map_err(|e| bad(format!("image.size {:?}: {e}", r.image.size)))?;
        if size > app.max_image_size {
            return Err(Refusal::Forbidden(format!(
                "image.size {}: this service builds images of at most {} bytes",
                r.image.size, app.max_image_size
            )));
        }
    }
    if req.publish && preview.loaded.recipe.publish.is_none() {
        return Err(bad("publish: the recipe has no [publish] section".into()));
    }
    Ok(Checked { spec, preview })
}

/// Writes an order's own recipe where `recipe_path` says (a worker of another instance
/// than the one that took the order, or a remote worker, has no copy yet).
pub fn keep_recipe(templates: &Path, data: &Path, spec: &BuildSpec) -> std::io::Result<PathBuf> {
    let path = recipe_path(templates, data, spec);
    if let Some(text) = &spec.recipe
        && !path.is_file()
    {
        std::fs::create_dir_all(path.parent().expect("under the data directory"))?;
        atom_dist::fsutil::write_atomic_bytes(&path, 0o600, text.as_bytes())?;
    }
    Ok(path)
}

/// The most addresses one order's notice goes to.
const MAX_EMAIL: usize = 10;

fn check_notify(app: &App, n: &Notify) -> Result<(), Refusal> {
    match (&n.webhook, &n.secret) {
        (None, None) if n.email.is_empty() => {
            return Err(Refusal::Bad(
                "notify: give a webhook (with its secret), an email, or both".into(),
            ));
        }
        (None, None) => {}
        (Some(url), Some(secret)) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2000 {
                return Err(Refusal::Bad(format!(
                    "notify.webhook {url:?}: give an http:// or https:// URL"
                )));
            }
            if secret.len() < 16 {
                return Err(Refusal::Bad(
                    "notify.secret: give at least 16 characters (the HMAC key)".into(),
                ));
            }
        }
        (Some(_), None) => {
            return Err(Refusal::Bad(
                "notify.webhook: give its secret too (notify.secret)".into(),
            ));
        }
        (None, Some(_)) => return Err(Refusal::Bad("notify.secret: there is no webhook to sign for".into())),
    }
    if n.email.is_empty() {
        return Ok(());
    }
    if app.mailer.is_none() {
        return Err(Refusal::Bad(
            "notify.email: this service sends no e-mail (it was started without --smtp)".into(),
        ));
    }
    if n.email.len() > MAX_EMAIL {
        return Err(Refusal::Bad(format!("notify.email: at most {MAX_EMAIL} addresses")));
    }
    for a in &n.email {
        if let Err(e) = a.parse::<lettre::Address>() {
            return Err(Refusal::Bad(format!("notify.email {a:?}: not an e-mail address ({e})")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::valid_package;

    #[test]
    fn package_names_never_look_like_options() {
        for ok in [
            "curl",
            "libc6:amd64",
            "vim-tiny=2:9.0.1378-2",
            "g++",
            "linux-image-amd64/bookworm-backports",
        ] {
            assert!(valid_package(ok), "{ok}");
        }
        for bad in [
            "-oDPkg::Pre-Invoke::=sh",
            "--reinstall",
            "Curl",
            "a",
            "x y",
            "curl=",
            "curl:",
            "pkg;rm",
            "",
        ] {
            assert!(!valid_package(bad), "{bad}");
        }
    }
}

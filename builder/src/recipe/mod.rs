//! The recipe: what `atom-build build` makes, as TOML. Every key is documented in
//! `docs/RECIPES.md`; an unknown key is an error naming it. `load` assembles a recipe from
//! its includes, the file itself, its `recipe.d/*.toml` drop-ins and `--set` overrides.

mod load;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cli::{DiskFormat, Firmware};
use anyhow::{Result, bail};
use semver::Version;
use serde::{Deserialize, Serialize};

pub use load::{Loaded, load};

/// The stages of a build, in order. Hooks and `--skip/--only/--from` name these.
pub const STAGES: [&str; 11] = [
    "bootstrap",
    "packages",
    "files",
    "configure",
    "scripts",
    "atom",
    "kernel",
    "clean",
    "image",
    "outputs",
    "publish",
];

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Consumed by `load` (files merged before this one); kept for the record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    pub os: Os,
    pub base: Base,
    #[serde(default)]
    pub packages: Packages,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub directories: Vec<DirEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Group>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    #[serde(default)]
    pub units: Units,
    #[serde(default)]
    pub configure: Configure,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scripts: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atom: Option<Atom>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<Kernel>,
    #[serde(default)]
    pub clean: Clean,
    pub image: ImageSpec,
    #[serde(default)]
    pub outputs: Outputs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Publish>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hooks: BTreeMap<String, StageHooks>,
    #[serde(default)]
    pub build: BuildOptions,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Os {
    /// Names the outputs (NAME-VERSION.img) and the build's cache entries.
    #[serde(default = "default_name")]
    pub name: String,
    pub version: Version,
    #[serde(default = "default_board")]
    pub board: String,
    #[serde(default = "default_channel")]
    pub channel: String,
}

fn default_name() -> String {
    "atom-os".into()
}
fn default_board() -> String {
    "x86_64-generic".into()
}
fn default_channel() -> String {
    "stable".into()
}

/// Where the tree starts: exactly one of these.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Base {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debian: Option<Debian>,
    /// A root tree as a tar archive (any compression tar detects): other distributions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tarball: Option<PathBuf>,
    /// An existing root tree, copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<PathBuf>,
    /// An empty tree (everything comes from files, scripts and the kernel stage).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Debian {
    pub suite: String,
    /// Mirror URLs (or full sources lines); empty: this machine's apt sources for the suite.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
    #[serde(default = "default_variant")]
    pub variant: String,
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// Packages mmdebstrap installs with the base (the packages stage installs the rest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Leave documentation, man pages and locales out of the base (dpkg path excludes).
    #[serde(default = "yes")]
    pub exclude_docs: bool,
}

fn default_variant() -> String {
    "minbase".into()
}
fn default_components() -> Vec<String> {
    vec!["main".into()]
}
fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Packages {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub install: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    #[serde(default = "yes")]
    pub no_recommends: bool,
}

impl Default for Packages {
    fn default() -> Self {
        Packages {
            install: Vec::new(),
            remove: Vec::new(),
            no_recommends: true,
        }
    }
}

/// A file or a directory tree copied from the build host into the image.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub source: PathBuf,
    /// Absolute path in the image; a source directory's contents land under it.
    pub target: String,
    /// Octal mode for a single file (e.g. "0755"); directory trees keep their modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// "UID:GID" (numbers); default 0:0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirEntry {
    pub path: String,
    #[serde(default = "default_dir_mode")]
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

fn default_dir_mode() -> String {
    "0755".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default)]
    pub system: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Primary group (created with the user's name when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default)]
    pub system: bool,
    /// Lines of `~/.ssh/authorized_keys`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorized_keys: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Units {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enable: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disable: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mask: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Configure {
    /// `/etc/hostname` of the image; absent: the image ships none (each host sets its own,
    /// kept across updates by the /etc merge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// LANG for `/etc/default/locale` and `/etc/locale.conf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// A zone name under /usr/share/zoneinfo, linked as /etc/localtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// An executable run by the build: a path on the build host (relative to the recipe that
/// names it), run on the host or inside the tree. A plain string in a recipe is `run`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub run: PathBuf,
    /// Run inside the tree (chroot, `/` is the image); default: on the build host for
    /// stage hooks, inside the tree for `scripts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chroot: Option<bool>,
    /// Overrides `build.hook_timeout` for this one, e.g. "30min".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

impl Hook {
    pub fn path(&self) -> &Path {
        &self.run
    }
    pub fn chroot(&self, default: bool) -> bool {
        self.chroot.unwrap_or(default)
    }
    pub fn timeout(&self) -> Option<&str> {
        self.timeout.as_deref()
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageHooks {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub before: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<Hook>,
}

/// What `install-units` puts in: the agent, units, keys and `update.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Atom {
    /// The (static) atom-update executable.
    pub agent: PathBuf,
    /// The static bootsel, for the distribution initramfs's Atom hook (initramfs-tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootsel: Option<PathBuf>,
    /// Public keys hosts trust (`*.pub`), copied to /etc/atom/keys/.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<PathBuf>,
    /// Root keys (key roles), copied to /etc/atom/keys/root/.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_keys: Vec<PathBuf>,
    /// The mirrors hosts update from (`repositories` of update.toml).
    pub repositories: Vec<String>,
    /// Enable atom-update.timer (updates in the background); atom-health.service and
    /// atom-mark-good.service are always enabled in a tree with systemd.
    #[serde(default = "yes")]
    pub timer: bool,
    /// Further keys of update.toml, verbatim (tries, routes, …).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub update: toml::Table,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// A kernel package installed in the tree with apt (Debian bases); "" for none (to
    /// override an included recipe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// An unpacked kernel on the build host: boot/vmlinuz-RELEASE and lib/modules/RELEASE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<PathBuf>,
    /// With `from`: only these modules (and what they depend on) go into the tree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
    /// `auto` (the one kernel in the tree) or a release.
    #[serde(default = "default_auto")]
    pub release: String,
    /// `bootsel` (bootsel as /init, built by Atom) or `tree` (the distribution's
    /// initramfs, made by update-initramfs with the Atom hook).
    #[serde(default = "default_initramfs")]
    pub initramfs: String,
    /// Modules the bootsel initramfs loads, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub initramfs_modules: Vec<String>,
    /// bootsel configuration for the slot's initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs_config: Option<PathBuf>,
    /// The static bootsel for the slot's initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootsel: Option<PathBuf>,
    /// A static busybox for the initramfs's emergency shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<PathBuf>,
}

fn default_auto() -> String {
    "auto".into()
}
fn default_initramfs() -> String {
    "bootsel".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clean {
    #[serde(default = "yes")]
    pub docs: bool,
    #[serde(default = "yes")]
    pub caches: bool,
    #[serde(default = "yes")]
    pub logs: bool,
    /// Empty /etc/machine-id (each host makes its own at first boot).
    #[serde(default = "yes")]
    pub machine_id: bool,
    /// Further paths (absolute, in the image) to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

impl Default for Clean {
    fn default() -> Self {
        Clean {
            docs: true,
            caches: true,
            logs: true,
            machine_id: true,
            paths: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Slot image size, e.g. "1G" (binary units).
    pub size: String,
    /// The image to build on for a layout-stable image: `auto` (the channel's current
    /// image in `publish.repo`, none on a first publish), `none`, or an image file.
    #[serde(default = "default_auto")]
    pub base: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outputs {
    /// A bootable GPT disk (`atom-build disk`) with this image in slot A.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskOutput>,
    /// The root tree as `NAME-VERSION.tar.zst`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tarball: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskOutput {
    /// The first stage's kernel and initramfs (on the ESP).
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootloader: Option<PathBuf>,
    /// uefi, bios or hybrid (both).
    #[serde(default = "default_firmware")]
    pub firmware: Firmware,
    /// raw, raw.zst, qcow2, vmdk, vhd.
    #[serde(default = "default_formats")]
    pub formats: Vec<DiskFormat>,
}

fn default_firmware() -> Firmware {
    Firmware::Hybrid
}

fn default_formats() -> Vec<DiskFormat> {
    vec![DiskFormat::Raw]
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    pub repo: PathBuf,
    /// A .key file or a pkcs11: URI; absent: `--sign-later`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_key: Option<String>,
    #[serde(default = "default_deltas")]
    pub deltas: usize,
    #[serde(default = "default_level")]
    pub zstd_level: i32,
    /// `publish --payload-level`; absent: its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_level: Option<i32>,
    /// `publish --delta-format`; absent: base-extents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_format: Option<crate::cli::DeltaEncoding>,
    #[serde(default = "default_expires")]
    pub expires_in: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_agent: Option<Version>,
}

fn default_deltas() -> usize {
    2
}
fn default_level() -> i32 {
    18
}
fn default_expires() -> String {
    "30days".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildOptions {
    /// How long one hook may run before it is killed, e.g. "10min".
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout: String,
    /// SOURCE_DATE_EPOCH of every time stamp in the image; default: the environment's,
    /// else 2020-01-01.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_date_epoch: Option<i64>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            hook_timeout: default_hook_timeout(),
            source_date_epoch: None,
        }
    }
}

fn default_hook_timeout() -> String {
    "10min".into()
}

impl Recipe {
    /// Empty strings that mean "not set" (so a drop-in or --set can unset a value).
    pub fn normalize(&mut self) {
        if let Some(k) = &mut self.kernel
            && k.package.as_deref() == Some("")
        {
            k.package = None;
        }
    }

    /// Checks what serde cannot: one base, known stage names, sane paths.
    pub fn check(&self) -> Result<()> {
        atom_dist::manifest::check_name("board", &self.os.board)?;
        atom_dist::manifest::check_name("channel", &self.os.channel)?;
        atom_dist::manifest::check_name("os.name", &self.os.name)?;
        let b = &self.base;
        let kinds = [b.debian.is_some(), b.tarball.is_some(), b.tree.is_some(), b.empty];
        match kinds.iter().filter(|k| **k).count() {
            1 => {}
            0 => bail!("base: give one of base.debian, base.tarball, base.tree or base.empty = true"),
            _ => bail!("base: give only one of base.debian, base.tarball, base.tree and base.empty"),
        }
        for stage in self.hooks.keys() {
            if !STAGES.contains(&stage.as_str()) {
                bail!("hooks.{stage}: no such stage (stages: {})", STAGES.join(", "));
            }
        }
        for f in &self.files {
            absolute_in_image("files.target", &f.target)?;
        }
        for d in &self.directories {
            absolute_in_image("directories.path", &d.path)?;
        }
        for p in &self.clean.paths {
            absolute_in_image("clean.paths", p)?;
        }
        if let Some(k) = &self.kernel {
            match (k.package.is_some(), k.from.is_some()) {
                (true, true) => bail!("kernel: give kernel.package or kernel.from, not both"),
                (false, false) => bail!("kernel: give kernel.package (apt) or kernel.from (an unpacked kernel)"),
                _ => {}
            }
            if k.package.is_some() && self.base.debian.is_none() {
                bail!("kernel.package needs a Debian base (base.debian); use kernel.from otherwise");
            }
            if !matches!(k.initramfs.as_str(), "bootsel" | "tree") {
                bail!("kernel.initramfs = {:?}: give \"bootsel\" or \"tree\"", k.initramfs);
            }
            if k.initramfs == "bootsel" && k.bootsel.is_none() {
                bail!("kernel.initramfs = \"bootsel\" needs kernel.bootsel (the static bootsel)");
            }
        }
        if !(self.packages.install.is_empty() && self.packages.remove.is_empty()) && self.base.debian.is_none() {
            bail!(
                "packages.install and packages.remove need a Debian base (base.debian); other trees bring their packages"
            );
        }
        self.image_size()?;
        humantime::parse_duration(&self.build.hook_timeout)
            .map_err(|e| anyhow::anyhow!("build.hook_timeout = {:?}: {e}", self.build.hook_timeout))?;
        Ok(())
    }

    pub fn image_size(&self) -> Result<u64> {
        crate::cli::parse_size(&self.image.size).map_err(|e| anyhow::anyhow!("image.size = {:?}: {e}", self.image.size))
    }
}

/// A path inside the image: absolute, without `..`.
pub fn absolute_in_image(what: &str, p: &str) -> Result<()> {
    let path = Path::new(p);
    if !path.is_absolute() || path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        bail!("{what} = {p:?}: give an absolute path inside the image, without \"..\"");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing table must mean the same as an empty one: `#[serde(default)]` on a
    /// table uses the Rust `Default`, an empty table the per-field defaults.
    #[test]
    fn rust_defaults_are_the_recipe_defaults() {
        fn same<T: Default + Serialize + serde::de::DeserializeOwned>(name: &str) {
            let from_empty: T = toml::from_str("").unwrap();
            assert_eq!(
                serde_json::to_value(&from_empty).unwrap(),
                serde_json::to_value(T::default()).unwrap(),
                "{name}"
            );
        }
        same::<Packages>("packages");
        same::<Units>("units");
        same::<Configure>("configure");
        same::<Clean>("clean");
        same::<Outputs>("outputs");
        same::<BuildOptions>("build");
        same::<Base>("base");
    }
}

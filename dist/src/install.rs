//! An installer medium: the files `atom-build installer` puts under `/atom` of the ISO and
//! `atom-install` reads there, and the signed description (`install.toml`) that ties the
//! whole disk image to a published release.
//!
//! The release's own manifest covers only the slot image (root-a); the description covers
//! every byte of the disk (the boot loaders and first stage on the ESP, the state
//! filesystem, the partition table) and names the slot image by the same digest as the
//! manifest. Both are verified before the installer writes anything, and the disk it
//! writes is checked against both before it gets a partition table.
//!
//! Neither expiry nor the clock apply here: a medium is used months after it was made,
//! and expiry guards hosts against replayed *updates*, not an operator's choice of what
//! to install. A signature that does not verify, a key not trusted, or a description
//! that does not match the manifest stop the install.

use jiff::Timestamp;
use semver::Version;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::evolve::{self, EvolveError};
use crate::keys::{KeyId, TrustedKeys};
use crate::manifest::{self, Manifest};
use crate::roles::{self, Role};
use crate::signature::{self, Domain};
use crate::verify::{AUDIT_HISTORY, Policy, VerifyError, verify_manifest};

pub const FORMAT: u32 = 1;
pub const MAX_DESCRIPTION_BYTES: usize = 16 * 1024;

/// The medium's directory and the files in it.
pub const DIR: &str = "atom";
pub const DESCRIPTION: &str = "install.toml";
pub const DESCRIPTION_SIG: &str = "install.toml.sig";
pub const MANIFEST: &str = "manifest.toml";
pub const MANIFEST_SIG: &str = "manifest.toml.sig";
/// Present when the repository uses key roles: the root-signed list of release keys.
pub const KEYS: &str = "keys.toml";
pub const KEYS_SIG: &str = "keys.toml.sig";
pub const DISK: &str = "disk.img.zst";

pub const KNOWN_FIELDS: &[&str] = &[
    "format",
    "version",
    "board",
    "channel",
    "created",
    "disk",
    "disk.file",
    "disk.size",
    "disk.digest",
    "disk.compressed_size",
    "disk.head_digest",
    "image",
    "image.offset",
    "image.size",
    "image.digest",
    "critical",
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    pub format: u32,
    pub version: Version,
    pub board: String,
    pub channel: String,
    pub created: Timestamp,
    pub disk: Disk,
    pub image: SlotImage,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub critical: Vec<String>,
}

/// The raw disk (as `atom-build disk` made it), zstd-compressed on the medium.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub file: String,
    pub compressed_size: u64,
    /// Bytes of the raw disk, and their BLAKE3 digest.
    pub size: u64,
    pub digest: Digest,
    /// BLAKE3 of the disk's first MiB (its partition table), checked before the installer
    /// parses that table.
    pub head_digest: Digest,
}

/// Bytes of the disk covered by `head_digest`.
pub const HEAD_BYTES: u64 = 1 << 20;

/// Where on the disk the slot image lies (root-a), and its digest as the manifest has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotImage {
    pub offset: u64,
    pub size: u64,
    pub digest: Digest,
}

/// Hashes a disk as it streams past: the whole disk, its first MiB and the slot image at
/// `image_offset`: what `atom-build installer` records and `atom-install` checks.
pub struct DiskHasher {
    whole: blake3::Hasher,
    head: blake3::Hasher,
    image: blake3::Hasher,
    pos: u64,
    image_offset: u64,
    image_end: u64,
}

/// The digests of [`DiskHasher`].
pub struct DiskDigests {
    pub size: u64,
    pub disk: Digest,
    pub head: Digest,
    pub image: Digest,
}

impl DiskHasher {
    pub fn new(image_offset: u64, image_len: u64) -> Self {
        DiskHasher {
            whole: blake3::Hasher::new(),
            head: blake3::Hasher::new(),
            image: blake3::Hasher::new(),
            pos: 0,
            image_offset,
            image_end: image_offset.saturating_add(image_len),
        }
    }

    /// The next bytes of the disk.
    pub fn update(&mut self, chunk: &[u8]) {
        let (start, end) = (self.pos, self.pos + chunk.len() as u64);
        self.whole.update(chunk);
        if start < HEAD_BYTES {
            self.head.update(&chunk[..(HEAD_BYTES.min(end) - start) as usize]);
        }
        let (lo, hi) = (start.max(self.image_offset), end.min(self.image_end));
        if lo < hi {
            self.image.update(&chunk[(lo - start) as usize..(hi - start) as usize]);
        }
        self.pos = end;
    }

    pub fn finish(self) -> DiskDigests {
        let digest = |h: blake3::Hasher| Digest::from_bytes(*h.finalize().as_bytes());
        DiskDigests {
            size: self.pos,
            disk: digest(self.whole),
            head: digest(self.head),
            image: digest(self.image),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("install.toml is malformed: {0}")]
    Malformed(String),
    #[error(
        "install.toml marks field(s) {0:?} as critical and this installer does not know them: use a newer installer"
    )]
    UnknownCritical(Vec<String>),
    #[error("install.toml: {0}")]
    Signature(#[from] signature::SignatureError),
    #[error("keys.toml: {0}")]
    Roles(#[from] roles::RolesError),
    #[error("the release manifest: {0}")]
    Manifest(Box<VerifyError>),
    #[error(
        "the medium's repository uses key roles (its keys are root keys) but carries no keys.toml: \
         the release keys cannot be known"
    )]
    NoKeys,
    #[error("install.toml does not match the signed release manifest: {0}")]
    Mismatch(String),
}

impl From<VerifyError> for InstallError {
    fn from(e: VerifyError) -> Self {
        InstallError::Manifest(Box::new(e))
    }
}

impl From<EvolveError> for InstallError {
    fn from(e: EvolveError) -> Self {
        match e {
            EvolveError::Syntax(m) | EvolveError::Invalid(m) => InstallError::Malformed(m),
            EvolveError::UnknownCritical(f) => InstallError::UnknownCritical(f),
        }
    }
}

impl Description {
    pub fn parse(bytes: &[u8]) -> Result<Self, InstallError> {
        if bytes.len() > MAX_DESCRIPTION_BYTES {
            return Err(InstallError::Malformed(format!(
                "{} bytes; the limit is {MAX_DESCRIPTION_BYTES}",
                bytes.len()
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| InstallError::Malformed("not UTF-8 text".into()))?;
        let (doc, ignored): (Description, _) = evolve::parse_tolerant(text)?;
        evolve::check_critical(&doc.critical, KNOWN_FIELDS)?;
        evolve::log_ignored("install.toml", &ignored);
        if doc.format != FORMAT {
            return Err(InstallError::Malformed(format!(
                "format {} is not supported (this installer reads format {FORMAT})",
                doc.format
            )));
        }
        let bad = |e: manifest::ManifestError| InstallError::Malformed(e.to_string());
        manifest::check_name("channel", &doc.channel).map_err(bad)?;
        manifest::check_name("board", &doc.board).map_err(bad)?;
        if doc.disk.file != DISK {
            return Err(InstallError::Malformed(format!(
                "disk.file is {:?}, not {DISK:?}",
                doc.disk.file
            )));
        }
        let end = doc.image.offset.checked_add(doc.image.size);
        if doc.disk.size <= 2 * HEAD_BYTES || doc.image.offset < HEAD_BYTES {
            return Err(InstallError::Malformed(format!(
                "a {}-byte disk with its slot image at {} has no room for its partition table",
                doc.disk.size, doc.image.offset
            )));
        }
        if doc.image.size == 0 || end.is_none_or(|end| end > doc.disk.size) || doc.image.offset % 512 != 0 {
            return Err(InstallError::Malformed(format!(
                "image at {} ({} bytes) is not inside the {}-byte disk on a sector boundary",
                doc.image.offset, doc.image.size, doc.disk.size
            )));
        }
        Ok(doc)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("install.toml serializes")
    }
}

/// The installer's own settings, embedded by `atom-build installer` at [`CONFIG_PATH`] of
/// its initramfs; each can be overridden on the kernel command line (`atom.install.KEY=`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallerConfig {
    /// The disk to install onto: `/dev/NAME`, `serial:SERIAL`, `wwid:WWID`, or `empty` (the
    /// only disk whose first MiB is all zeros). None: ask on the console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// GPT partition names (globs with `*` and `?`) on the target to keep, with their data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_partlabel: Vec<String>,
    /// What follows a finished install.
    #[serde(default)]
    pub after: After,
    /// What follows a failed one (the message stays on the console with `halt`).
    #[serde(default = "After::halt")]
    pub on_failure: After,
    /// The medium's ISO 9660 volume id.
    #[serde(default = "default_label")]
    pub medium_label: String,
    /// Seconds to wait for the medium and the target to appear.
    #[serde(default = "default_wait")]
    pub wait_secs: u64,
    /// Kernel modules to load first, in order (paths in the initramfs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
    /// The BLAKE3 digest of the medium's install.toml this initramfs was built with: another
    /// medium with the same volume id (an older stick left plugged in) is passed over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description_digest: Option<Digest>,
}

impl Default for InstallerConfig {
    /// The defaults of an empty config file.
    fn default() -> Self {
        InstallerConfig::parse("").expect("an empty config parses")
    }
}

pub const CONFIG_PATH: &str = "etc/atom/install.toml";
pub const DEFAULT_LABEL: &str = "ATOM_INSTALL";

fn default_label() -> String {
    DEFAULT_LABEL.into()
}

fn default_wait() -> u64 {
    30
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum After {
    #[default]
    Reboot,
    Poweroff,
    Halt,
}

impl After {
    fn halt() -> After {
        After::Halt
    }

    pub fn parse(s: &str) -> Option<After> {
        match s {
            "reboot" => Some(After::Reboot),
            "poweroff" => Some(After::Poweroff),
            "halt" => Some(After::Halt),
            _ => None,
        }
    }
}

impl InstallerConfig {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut c: InstallerConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if c.wait_secs == 0 {
            c.wait_secs = default_wait();
        }
        Ok(c)
    }

    /// Applies `atom.install.*` words of a kernel command line; returns warnings.
    pub fn apply_cmdline(&mut self, cmdline: &str) -> Vec<String> {
        let mut warnings = Vec::new();
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.strip_prefix("atom.install.").and_then(|w| w.split_once('=')) else {
                continue;
            };
            match key {
                "target" => self.target = Some(value.to_string()).filter(|v| !v.is_empty()),
                "keep_partlabel" => {
                    self.keep_partlabel = value.split(',').filter(|v| !v.is_empty()).map(String::from).collect()
                }
                "after" | "on_failure" => match After::parse(value) {
                    Some(a) if key == "after" => self.after = a,
                    Some(a) => self.on_failure = a,
                    None => warnings.push(format!("atom.install.{key}={value}: not reboot, poweroff or halt")),
                },
                "medium_label" => self.medium_label = value.to_string(),
                "wait_secs" => match value.parse() {
                    Ok(n) if n > 0 => self.wait_secs = n,
                    _ => warnings.push(format!("atom.install.wait_secs={value}: not a positive number")),
                },
                _ => warnings.push(format!(
                    "atom.install.{key}: not a setting of the command line (target, keep_partlabel, after, \
                     on_failure, medium_label, wait_secs)"
                )),
            }
        }
        warnings
    }
}

/// What the installer trusts: the publisher's keys as an agent of that repository would
/// hold them.
#[derive(Clone, Debug)]
pub enum Anchor {
    /// Keys that sign releases directly.
    Single(TrustedKeys),
    /// Root keys; the release keys come from the medium's root-signed keys.toml.
    Roles(TrustedKeys),
}

/// The documents of a medium, as read.
#[derive(Clone, Copy, Debug)]
pub struct Documents<'a> {
    pub description: &'a [u8],
    pub description_sig: &'a [u8],
    pub manifest: &'a [u8],
    pub manifest_sig: &'a [u8],
    pub keys: Option<(&'a [u8], &'a [u8])>,
}

#[derive(Clone, Debug)]
pub struct Verified {
    pub description: Description,
    pub manifest: Manifest,
    pub signed_by: KeyId,
}

/// Signatures first (keys.toml under roles, then install.toml and the manifest by release
/// keys), then the contents, then that both describe the same slot image.
pub fn verify(docs: &Documents<'_>, anchor: &Anchor) -> Result<Verified, InstallError> {
    let release = match anchor {
        Anchor::Single(keys) => keys.clone(),
        Anchor::Roles(root) => {
            let (keys, sig) = docs.keys.ok_or(InstallError::NoKeys)?;
            let verified = roles::verify_keys(keys, sig, root, AUDIT_HISTORY, None)?;
            TrustedKeys::new(
                verified
                    .doc
                    .keys(Role::Release)
                    .iter()
                    .filter_map(|k| k.public_key().ok()),
            )
        }
    };
    let signed_by = signature::verify_doc(Domain::Install, docs.description, docs.description_sig, &release)?;
    let description = Description::parse(docs.description)?;
    let policy = Policy {
        trusted: &release,
        now: AUDIT_HISTORY,
        board: Some(&description.board),
        channel: Some(&description.channel),
        agent: None,
    };
    let manifest = verify_manifest(docs.manifest, docs.manifest_sig, &policy)?.manifest;
    if manifest.version != description.version {
        return Err(InstallError::Mismatch(format!(
            "version {} against the manifest's {}",
            description.version, manifest.version
        )));
    }
    if manifest.image.digest != description.image.digest || manifest.image.size != description.image.size {
        return Err(InstallError::Mismatch(format!(
            "slot image {} ({} bytes) against the manifest's {} ({} bytes)",
            description.image.digest, description.image.size, manifest.image.digest, manifest.image.size
        )));
    }
    Ok(Verified {
        description,
        manifest,
        signed_by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use crate::manifest::tests::sample;

    fn description(m: &Manifest) -> Description {
        Description {
            format: FORMAT,
            version: m.version.clone(),
            board: m.board.clone(),
            channel: m.channel.clone(),
            created: m.created,
            disk: Disk {
                file: DISK.into(),
                compressed_size: 10,
                size: m.image.size + (4 << 20),
                digest: Digest::of(b"disk"),
                head_digest: Digest::of(b"head"),
            },
            image: SlotImage {
                offset: 2 << 20,
                size: m.image.size,
                digest: m.image.digest,
            },
            critical: Vec::new(),
        }
    }

    struct Medium {
        key: SecretKey,
        description: Vec<u8>,
        description_sig: String,
        manifest: Vec<u8>,
        manifest_sig: String,
    }

    impl Medium {
        fn new(edit: impl FnOnce(&mut Description)) -> Self {
            let key = SecretKey::generate();
            let m = sample();
            let mut d = description(&m);
            edit(&mut d);
            let description = d.to_toml().into_bytes();
            let manifest = m.to_toml().into_bytes();
            Medium {
                description_sig: signature::sign_with(Domain::Install, &description, &[&key]).unwrap(),
                manifest_sig: signature::sign(&manifest, &[&key]),
                key,
                description,
                manifest,
            }
        }

        fn docs(&self) -> Documents<'_> {
            Documents {
                description: &self.description,
                description_sig: self.description_sig.as_bytes(),
                manifest: &self.manifest,
                manifest_sig: self.manifest_sig.as_bytes(),
                keys: None,
            }
        }

        fn anchor(&self) -> Anchor {
            Anchor::Single(TrustedKeys::new([self.key.public()]))
        }
    }

    #[test]
    fn a_signed_description_of_the_manifest_image_verifies_even_after_expiry() {
        let m = Medium::new(|_| {});
        let v = verify(&m.docs(), &m.anchor()).unwrap();
        assert_eq!(&v.signed_by, m.key.id());
        assert_eq!(v.description.image.digest, v.manifest.image.digest);
        // The sample manifest expires in 2026; the installer does not look at the clock.
        assert!(v.manifest.expires < Timestamp::now());
    }

    #[test]
    fn tampering_untrusted_keys_and_mismatches_are_refused() {
        let m = Medium::new(|_| {});
        let mut edited = m.description.clone();
        let at = edited.len() - 3;
        edited[at] ^= 1;
        let docs = Documents {
            description: &edited,
            ..m.docs()
        };
        assert!(matches!(verify(&docs, &m.anchor()), Err(InstallError::Signature(_))));

        let other = Anchor::Single(TrustedKeys::new([SecretKey::generate().public()]));
        assert!(matches!(verify(&m.docs(), &other), Err(InstallError::Signature(_))));

        // A manifest signature over the description (another domain) is not accepted.
        let docs = Documents {
            description_sig: m.manifest_sig.as_bytes(),
            description: &m.manifest,
            ..m.docs()
        };
        assert!(verify(&docs, &m.anchor()).is_err());

        let wrong = Medium::new(|d| d.image.digest = Digest::of(b"another image"));
        let e = verify(&wrong.docs(), &wrong.anchor()).unwrap_err();
        assert!(matches!(e, InstallError::Mismatch(_)), "{e}");

        let roles = Anchor::Roles(TrustedKeys::new([m.key.public()]));
        assert!(matches!(verify(&m.docs(), &roles), Err(InstallError::NoKeys)));
    }

    #[test]
    fn disk_digests_do_not_depend_on_how_the_disk_is_cut() {
        let disk: Vec<u8> = (0..3 * HEAD_BYTES as usize).map(|i| (i * 7 % 251) as u8).collect();
        let whole = {
            let mut h = DiskHasher::new(HEAD_BYTES + 5, 1000);
            h.update(&disk);
            h.finish()
        };
        let mut h = DiskHasher::new(HEAD_BYTES + 5, 1000);
        for piece in disk.chunks(333_333) {
            h.update(piece);
        }
        let cut = h.finish();
        assert_eq!(
            (cut.size, cut.disk, cut.head, cut.image),
            (whole.size, whole.disk, whole.head, whole.image)
        );
        assert_eq!(whole.head, Digest::of(&disk[..HEAD_BYTES as usize]));
        let at = HEAD_BYTES as usize + 5;
        assert_eq!(whole.image, Digest::of(&disk[at..at + 1000]));
    }

    #[test]
    fn installer_config_defaults_and_cmdline() {
        assert_eq!(InstallerConfig::default().medium_label, DEFAULT_LABEL);
        assert_eq!(InstallerConfig::default().wait_secs, 30);
        let mut c = InstallerConfig::parse("target = \"empty\"\n").unwrap();
        assert_eq!(c.after, After::Reboot);
        assert_eq!(c.on_failure, After::Halt);
        assert_eq!(c.medium_label, DEFAULT_LABEL);
        let w = c.apply_cmdline("ro atom.install.target=serial:abc atom.install.keep_partlabel=data,log* atom.install.on_failure=poweroff atom.install.bogus=1");
        assert_eq!(c.target.as_deref(), Some("serial:abc"));
        assert_eq!(c.keep_partlabel, ["data", "log*"]);
        assert_eq!(c.on_failure, After::Poweroff);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(InstallerConfig::parse("tagret = \"x\"").is_err());
        let round = InstallerConfig::parse(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(round, c);
    }

    #[test]
    fn descriptions_outside_the_disk_or_with_unknown_critical_fields_are_refused() {
        let m = sample();
        let mut d = description(&m);
        d.image.offset = d.disk.size;
        assert!(Description::parse(d.to_toml().as_bytes()).is_err());
        let mut d = description(&m);
        d.critical = vec!["disk.encryption".into()];
        assert!(matches!(
            Description::parse(d.to_toml().as_bytes()),
            Err(InstallError::UnknownCritical(_))
        ));
        let text = format!("{}\nfuture = 1\n", description(&m).to_toml());
        assert!(
            Description::parse(text.as_bytes()).is_ok(),
            "an optional unknown field is ignored"
        );
    }
}

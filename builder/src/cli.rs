//! Command line of `atom-build`, defined once with clap derive.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use semver::Version;

const EXIT_CODES: &str = "\
EXIT STATUS:
    0  success
    1  error (the message says what and where; nothing was half-written)
    2  bad command line
    3  verify: the repository has problems (each one is listed)";

/// Build, sign and publish Atom OS images.
///
/// atom-build builds an OS from a recipe (`build`), turns a root filesystem into a
/// reproducible ext4 slot image, publishes it
/// into a signed repository that any static web server can host, and audits such a
/// repository. Run each subcommand with --help for details.
#[derive(Debug, Parser)]
#[command(name = "atom-build", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Build(BuildArgs),
    Cache(CacheArgs),
    Keygen(KeygenArgs),
    Image(ImageArgs),
    Publish(PublishArgs),
    Sign(SignArgs),
    Resign(ResignArgs),
    Keys(KeysArgs),
    Refresh(RefreshArgs),
    Verify(VerifyArgs),
    History(HistoryArgs),
    InstallUnits(InstallArgs),
    Initramfs(InitramfsArgs),
    Disk(DiskArgs),
    Installer(InstallerArgs),
    Serve(ServeArgs),
    Token(TokenArgs),
    Worker(WorkerArgs),
}

/// Build an OS image from a recipe, stage by stage, with a stage cache.
///
/// Stages, in order: bootstrap, packages, files, configure, scripts, atom, kernel, clean,
/// image, outputs, publish (docs/RECIPES.md says what each does and every recipe key).
/// Hooks run before and after any stage (`[hooks.STAGE] before/after`). Each stage's
/// result is cached under a hash of its inputs and the previous stage's key: a rerun
/// restarts at the first stage whose inputs changed and says which did. Every build
/// writes out/build.lock.toml (package versions, mirrors, digests); `--locked` rebuilds
/// exactly that. Runs as root, in its own mount namespace.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipe (TOML). Its drop-ins, NAME.d/*.toml beside NAME.toml, are merged after it.
    pub recipe: PathBuf,
    /// Override a recipe key: KEY=VALUE with a dotted key and a TOML value (a bare word is
    /// a string), e.g. --set os.version=1.2.0 --set 'packages.install=["curl"]'. Repeatable;
    /// replaces (arrays too).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Build directory: tree/, logs/NN-STAGE.log, out/ (image, outputs, lock). One build
    /// at a time per directory.
    #[arg(long, value_name = "DIR", default_value = "atom-build.d")]
    pub build_dir: PathBuf,
    /// The stage cache, shared by any number of builds.
    #[arg(long, value_name = "DIR", default_value = "/var/cache/atom-build")]
    pub cache: PathBuf,
    /// Run every stage (their results still replace what the cache holds).
    #[arg(long)]
    pub no_cache: bool,
    /// Leave a stage out (its hooks too); repeatable. Later stages get other cache keys.
    #[arg(long = "skip", value_name = "STAGE")]
    pub skip: Vec<String>,
    /// Run only this stage, on the cached result of the stages before it.
    #[arg(long, value_name = "STAGE", conflicts_with = "from")]
    pub only: Option<String>,
    /// Run this stage and all after it even when cached.
    #[arg(long, value_name = "STAGE")]
    pub from: Option<String>,
    /// Rebuild exactly what this lock file records (the recipe, hooks, base, package
    /// versions, SOURCE_DATE_EPOCH), or refuse saying what differs.
    #[arg(long, value_name = "LOCK")]
    pub locked: Option<PathBuf>,
    /// Keep the tree of a failed stage in the build directory for inspection.
    #[arg(long)]
    pub keep_failed: bool,
    /// No stage lines (errors still go to stderr).
    #[arg(long, short)]
    pub quiet: bool,
    /// Append each stage's start and end to FILE as JSON lines ({"stage", "index", "total",
    /// "event": start|built|cached|skipped|failed, "seconds"}), for programs that follow
    /// the build (the build service does).
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
}

/// List or prune the stage cache of `atom-build build`.
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// The stage cache.
    #[arg(long, value_name = "DIR", default_value = "/var/cache/atom-build", global = true)]
    pub cache: PathBuf,
    #[command(subcommand)]
    pub action: CacheAction,
}

#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Each entry: key, stage, recipe name, size, when last used (newest first).
    List,
    /// Remove entries not used for a while (and leftovers of crashed builds).
    Prune {
        /// Remove what was not used within this long, e.g. 30days.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// Remove every entry.
        #[arg(long, conflicts_with = "older_than")]
        all: bool,
    },
}

/// Build the initramfs: the static bootsel as /init, kernel modules, bootsel's config.
///
/// Modules are named with --module (e.g. virtio_blk, ext4) and resolved against the
/// kernel's modules.dep: each is preceded by what it depends on, and bootsel loads them in
/// that order with finit_module. Soft dependencies (such as crc32c for ext4) are not in
/// modules.dep; name them too. The result is a zstd-compressed newc cpio, reproducible
/// (SOURCE_DATE_EPOCH for every time stamp).
#[derive(Debug, Args)]
pub struct InitramfsArgs {
    /// The static bootsel executable (bootsel/build-static.sh prints its path).
    #[arg(long)]
    pub bootsel: PathBuf,
    /// The kernel's module directory, e.g. /lib/modules/6.1.0-56-amd64 (with modules.dep;
    /// for an unpacked kernel package run `depmod -b ROOT VERSION` first).
    #[arg(long, value_name = "DIR")]
    pub kernel_modules: Option<PathBuf>,
    /// A module to load at boot, by name; repeat in the order wanted.
    #[arg(long = "module", value_name = "NAME", requires = "kernel_modules")]
    pub modules: Vec<String>,
    /// bootsel configuration (TOML; see `bootsel --help`), installed as /etc/bootsel.toml.
    /// Its `modules` key is filled in from --module.
    #[arg(long, value_name = "TOML")]
    pub config: Option<PathBuf>,
    /// A static busybox, installed as /bin/sh and offered as the emergency shell when
    /// nothing can boot (without it bootsel explains and reboots).
    #[arg(long, value_name = "BUSYBOX")]
    pub shell: Option<PathBuf>,
    /// Output file; written atomically.
    #[arg(long)]
    pub out: PathBuf,
}

/// Build an installer ISO that puts a disk made by `atom-build disk` onto a machine.
///
/// The ISO is hybrid: it boots from a CD/DVD or, written raw (dd) to a USB stick, as a
/// disk, under legacy BIOS (isolinux) and UEFI (systemd-boot in an El Torito EFI image).
/// It starts KERNEL with a small initramfs whose /init is `atom-install` (INSTALLER, a
/// static executable). On the ISO, under /atom: the disk (zstd), the release's signed
/// manifest from REPO's history (and keys.toml under key roles), and install.toml, which
/// describes every byte of the disk and is signed by --key (a release key). The
/// publisher's public keys (--trust) go into the initramfs.
///
/// Booted, the installer finds its medium by volume id, verifies the signatures, picks the
/// target (--target, or the kernel command line's atom.install.target=, or asks on the
/// console), clears its partition table, writes the disk while hashing it, writes the
/// partition table only when the digests match, grows the state partition to the end of
/// the disk (or the first kept partition), and reboots (--after).
#[derive(Debug, Args)]
pub struct InstallerArgs {
    /// The raw disk, as `atom-build disk` wrote it (with STEM.toml beside it).
    #[arg(long, value_name = "DISK")]
    pub disk: PathBuf,
    /// The repository the disk's version was published to (its signed manifest is taken
    /// from the channel's history).
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[arg(long, default_value = "stable")]
    pub channel: String,
    /// Release signing key for install.toml: a key file or a pkcs11: URI.
    #[arg(long, value_name = "FILE|URI")]
    pub key: String,
    /// File whose first line is the passphrase of an encrypted key file.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// The publisher's public keys the installer trusts (repeatable): the signing key's
    /// .pub for a single-key repository (the default: --key's own public key), the root
    /// keys' for one with key roles.
    #[arg(long, value_name = "PUB")]
    pub trust: Vec<PathBuf>,
    /// Write only the medium's files (what goes under /atom on the ISO) into DIR, for
    /// `atom-install --medium DIR` from a running system; no ISO, kernel or initramfs.
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    pub medium_dir: Option<PathBuf>,
    /// The kernel the installer runs on.
    #[arg(long, value_name = "VMLINUZ", required_unless_present = "medium_dir")]
    pub kernel: Option<PathBuf>,
    /// That kernel's modules directory (lib/modules/RELEASE).
    #[arg(long, value_name = "DIR")]
    pub kernel_modules: Option<PathBuf>,
    /// Modules to load, dependencies first (repeatable; default: storage, CD, USB and
    /// virtio drivers, isofs and ext4, those of them this kernel has).
    #[arg(long = "module", value_name = "NAME")]
    pub modules: Vec<String>,
    /// The static atom-install executable.
    #[arg(long, value_name = "FILE", required_unless_present = "medium_dir")]
    pub installer: Option<PathBuf>,
    /// The disk to install onto: /dev/NAME, serial:SERIAL, wwid:WWID or empty (the only
    /// disk whose first MiB is zeros). Without it the installer asks on the console.
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    /// Partitions of the target to keep, by GPT name (globs; repeatable).
    #[arg(long = "keep-partlabel", value_name = "GLOB")]
    pub keep_partlabel: Vec<String>,
    /// After a finished install: reboot, poweroff or halt.
    #[arg(long, default_value = "reboot")]
    pub after: String,
    /// After a failed one (halt keeps the message on the console).
    #[arg(long, default_value = "halt")]
    pub on_failure: String,
    /// Kernel command line of the installer.
    #[arg(long, default_value = "console=tty0 console=ttyS0,115200 panic=10")]
    pub cmdline: String,
    /// ISO 9660 volume id, by which the installer finds its medium.
    #[arg(long, default_value = atom_dist::install::DEFAULT_LABEL)]
    pub label: String,
    /// systemd-boot's EFI executable.
    #[arg(
        long,
        value_name = "EFI",
        default_value = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi"
    )]
    pub bootloader: PathBuf,
    /// isolinux.bin and isohdpfx.bin (Debian package isolinux).
    #[arg(long, value_name = "DIR", default_value = "/usr/lib/ISOLINUX")]
    pub isolinux_dir: PathBuf,
    /// syslinux's BIOS modules (ldlinux.c32; Debian package syslinux-common).
    #[arg(long, value_name = "DIR", default_value = "/usr/lib/syslinux/modules/bios")]
    pub syslinux_modules: PathBuf,
    /// The ISO to write (a SHA256SUMS line is added beside it).
    #[arg(long, required_unless_present = "medium_dir")]
    pub out: Option<PathBuf>,
}

/// Build a bootable disk image for a new host: GPT with ESP, root-a, root-b, state.
///
/// root-a gets IMAGE and is marked good (priority 1, successful); root-b is empty with
/// priority 0, ready for the first update; state is an empty ext4 that bootsel fills on
/// the first boot. The ESP holds KERNEL and INITRAMFS (the first stage, which picks the
/// slot) and the boot loaders --firmware asks for: systemd-boot as EFI/BOOT/BOOTX64.EFI
/// (found by any UEFI firmware without boot variables) and, for legacy BIOS, syslinux
/// (gptmbr.bin in the MBR boot code, the ESP marked legacy-BIOS-bootable, ldlinux.sys and
/// syslinux/syslinux.cfg on the ESP). Both start the same kernel with the same command
/// line, so BIOS hosts get the same tries and fallback.
///
/// Each --format is written beside OUT (raw: OUT itself; raw.zst: OUT.zst; qcow2, vmdk
/// (streamOptimized), vhd (fixed): OUT with that extension instead of .img), with
/// STEM.toml (what the disk holds, the digest of the slot image written, which a signed
/// manifest carries) and a SHA256SUMS line for each file in the same directory.
#[derive(Debug, Args)]
pub struct DiskArgs {
    /// Slot image for root-a (from `atom-build image`).
    #[arg(long)]
    pub image: PathBuf,
    /// Kernel (a vmlinuz with the EFI stub, as Debian's).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initramfs (from `atom-build initramfs`).
    #[arg(long)]
    pub initramfs: PathBuf,
    /// Kernel command line of the loader entry. Keep `ro`: systemd remounts a root that is
    /// not in /etc/fstab read-write unless the command line says ro, and a slot written to
    /// by its own mount no longer matches its signed image (its deltas cannot be used).
    #[arg(long, default_value = "ro console=tty0 console=ttyS0 panic=10")]
    pub cmdline: String,
    /// systemd-boot's EFI binary (Debian package systemd-boot-efi).
    #[arg(long, default_value = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi")]
    pub bootloader: PathBuf,
    /// Size of each root slot (default: the image's size); room for later, larger images.
    #[arg(long, value_parser = parse_size)]
    pub slot_size: Option<u64>,
    /// Size of the EFI system partition.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub esp_size: u64,
    /// Size of the state partition (/etc overlay, /var).
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    pub state_size: u64,
    /// Output disk image; written atomically, sparse.
    #[arg(long)]
    pub out: PathBuf,
    /// Firmware the disk boots under.
    #[arg(long, value_enum, default_value_t = Firmware::Hybrid)]
    pub firmware: Firmware,
    /// Where syslinux's BIOS files are (Debian packages syslinux and syslinux-common):
    /// mbr/gptmbr.bin; the `syslinux` installer itself is taken from PATH.
    #[arg(long, default_value = "/usr/lib/syslinux")]
    pub syslinux_dir: PathBuf,
    /// Formats to write; repeat or separate with commas (e.g. --format raw.zst,qcow2).
    #[arg(long = "format", value_enum, value_delimiter = ',', default_value = "raw")]
    pub formats: Vec<DiskFormat>,
}

/// What a disk boots under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// UEFI only: systemd-boot.
    Uefi,
    /// Legacy BIOS only: syslinux.
    Bios,
    /// Both, from the same ESP (the default).
    Hybrid,
}

impl Firmware {
    pub fn uefi(self) -> bool {
        self != Firmware::Bios
    }

    pub fn bios(self) -> bool {
        self != Firmware::Uefi
    }
}

/// A disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
pub enum DiskFormat {
    /// The raw disk, sparse: for dd and qemu.
    #[value(name = "raw")]
    #[serde(rename = "raw")]
    Raw,
    /// The raw disk, zstd-compressed: for download (zstd -d | dd).
    #[value(name = "raw.zst")]
    #[serde(rename = "raw.zst")]
    RawZst,
    /// qcow2: qemu, libvirt, OpenStack.
    #[value(name = "qcow2")]
    #[serde(rename = "qcow2")]
    Qcow2,
    /// VMDK, streamOptimized: VMware, OVA bundles.
    #[value(name = "vmdk")]
    #[serde(rename = "vmdk")]
    Vmdk,
    /// VHD, fixed size: Azure, Hyper-V.
    #[value(name = "vhd")]
    #[serde(rename = "vhd")]
    Vhd,
}

/// Install the update agent, its systemd units and presets into a root filesystem.
///
/// Writes atom-update to ROOT/usr/bin, the units (timer, health checks, mark-good/bad,
/// optional daemon) to ROOT/usr/lib/systemd/system, a preset enabling the timer and the
/// boot assessment, /etc/atom/{keys,health.d} and an example configuration.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The root filesystem tree to install into.
    #[arg(long)]
    pub root: PathBuf,
    /// Where the atom-update binary is (default: next to atom-build).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Also install this static bootsel as /usr/lib/atom/bootsel with the initramfs-tools
    /// hook, so the distribution's initramfs (update-initramfs) is an Atom second stage:
    /// it mounts the slot from the hand-over's root=PARTUUID= and `bootsel attach` adds
    /// the state partition, /etc overlay and boot record.
    #[arg(long, value_name = "FILE")]
    pub bootsel: Option<PathBuf>,
}

/// Create an ed25519 signing key pair.
///
/// Writes OUT.key (the secret, mode 0600) and OUT.pub and prints the key id. Refuses to
/// overwrite. With --encrypt the secret is protected by a passphrase (argon2id); with
/// --in-token the pair is generated inside a PKCS#11 token and only OUT.pub is written.
///
/// Which key goes where: a single-key repository's key (OUT.pub into /etc/atom/keys/ on
/// hosts); with key roles, the root key's OUT.pub into /etc/atom/keys/root/ on hosts, and
/// the release and freshness keys' OUT.pub files to `atom-build keys` only.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Path prefix of the key pair: writes PREFIX.key and PREFIX.pub.
    #[arg(long, value_name = "PREFIX")]
    pub out: PathBuf,
    /// Encrypt the secret with a passphrase (asked twice on the terminal, or --passphrase-file).
    #[arg(long, conflicts_with = "in_token")]
    pub encrypt: bool,
    /// File whose first line is the passphrase (mode 0600).
    #[arg(long, value_name = "FILE", requires = "encrypt")]
    pub passphrase_file: Option<PathBuf>,
    /// Generate the pair inside a PKCS#11 token, e.g.
    /// pkcs11:token=atom;object=release?module-path=/usr/lib/softhsm/libsofthsm2.so
    #[arg(long, value_name = "URI")]
    pub in_token: Option<String>,
}

/// Build a reproducible ext4 slot image from a root filesystem.
///
/// The same inputs give the same bytes: the filesystem UUID and directory hash seed are
/// derived from the version, every timestamp is clamped to SOURCE_DATE_EPOCH (0 when
/// unset), and mke2fs runs with a pinned configuration. The image records its version
/// and board in /usr/lib/atom/release.
///
/// With --base, the image starts as a copy of the previous image and the new tree is
/// synced into it, so unchanged files keep their blocks: deltas stay small and hosts
/// rewrite only the blocks that changed. This mounts the image (needs root).
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Root filesystem: a directory, or a tar archive (compression detected).
    #[arg(long, value_name = "DIR|TARBALL")]
    pub rootfs: PathBuf,
    /// Version of this image (semver, e.g. 1.4.0); must grow with every release.
    #[arg(long)]
    pub version: Version,
    /// Board string; hosts install only images for their own board.
    #[arg(long, default_value = "x86_64-generic")]
    pub board: String,
    /// Image (slot) size, e.g. 1G or 512M (binary units), a multiple of 4 KiB.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Output image file; written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Previous image to build on, for a layout-stable image.
    #[arg(long, value_name = "PREVIOUS.img")]
    pub base: Option<PathBuf>,
    /// The slot's kernel: `auto` takes the one kernel in the tree (/boot/vmlinuz-RELEASE
    /// or /usr/lib/modules/RELEASE/vmlinuz), a RELEASE picks one of several, `none`
    /// builds a slot without a kernel, booted by the first stage's kernel. The kernel and
    /// its initramfs go to /boot/atom/ (vmlinuz, initrd.img, kernel-release), where the
    /// first stage finds them.
    #[arg(long, value_name = "auto|RELEASE|none", default_value = "auto")]
    pub kernel: String,
    /// The slot's initramfs (the second stage): `bootsel` builds one with bootsel as /init
    /// and the --module list from the tree's modules; `tree` takes the distribution's
    /// /boot/initrd.img-RELEASE (initramfs-tools with the Atom hook).
    #[arg(long, value_enum, default_value = "bootsel")]
    pub initramfs: InitramfsKind,
    /// The static bootsel for the slot's initramfs (bootsel/build-static.sh prints it).
    #[arg(long, value_name = "FILE")]
    pub bootsel: Option<PathBuf>,
    /// A kernel module for the slot's initramfs, by name, from the tree's modules.dep;
    /// repeat in load order (e.g. virtio_blk, ext4, overlay).
    #[arg(long = "module", value_name = "NAME")]
    pub modules: Vec<String>,
    /// bootsel configuration for the slot's initramfs (see `bootsel --help`).
    #[arg(long, value_name = "TOML")]
    pub initramfs_config: Option<PathBuf>,
    /// A static busybox for the slot initramfs's emergency shell.
    #[arg(long, value_name = "BUSYBOX")]
    pub shell: Option<PathBuf>,
}

/// Where a slot's initramfs comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitramfsKind {
    Bootsel,
    Tree,
}

/// `publish --payload-level`'s default.
pub const DEFAULT_PAYLOAD_LEVEL: i32 = 12;

/// `publish --delta-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeltaEncoding {
    BaseExtents,
    BasePrefix,
    Plain,
}

impl DeltaEncoding {
    pub fn encoding(self) -> atom_dist::delta::Encoding {
        match self {
            DeltaEncoding::BaseExtents => atom_dist::delta::Encoding::BaseExtents,
            DeltaEncoding::BasePrefix => atom_dist::delta::Encoding::BasePrefix,
            DeltaEncoding::Plain => atom_dist::delta::Encoding::Plain,
        }
    }
}

/// Publish an image into a channel of a repository.
///
/// Reads the version and board from the image, writes the zstd payload, precomputed
/// deltas from the last --deltas versions of the channel, and the signed manifest. A
/// reader sees the old channel or the new one, never a mix. Creates the repository when
/// --repo is missing or empty. The version must be newer than the channel's.
#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub signing: Signing,
    /// How many earlier versions of the channel get a precomputed delta.
    #[arg(long, default_value_t = 2)]
    pub deltas: usize,
    /// How long the manifest stays valid; hosts refuse it afterwards (publish or resign).
    /// Once every host uses key roles (timestamps bound freshness), a year (365days) keeps
    /// the release key offline between releases; hosts that trust the key directly are
    /// bound by this expiry alone.
    #[arg(long, default_value = "30days", value_parser = humantime::parse_duration)]
    pub expires_in: std::time::Duration,
    /// zstd level for deltas (1-22): what most hosts download. On 1 GiB Debian images
    /// 18 gives deltas within 1% of 19's size for 80% of its CPU time; 16 is 7% larger.
    #[arg(long, default_value_t = 18, value_parser = clap::value_parser!(i32).range(1..=22))]
    pub zstd_level: i32,
    /// zstd level for the full payload (1-22), the route of new installs and of hosts
    /// without a usable delta. On a 1 GiB Debian image level 19 costs about 180 CPU
    /// seconds, level 12 about 19, for a payload 10% smaller (README: "Publishing uses
    /// the cores").
    #[arg(long, default_value_t = DEFAULT_PAYLOAD_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
    pub payload_level: i32,
    /// How precomputed deltas are encoded. base-extents (default): the base's blocks the
    /// delta does not copy serve as zstd's prefix: small and fast to make, read by agents
    /// of this release on (older agents skip such a delta and take the rsync route or the
    /// full payload). base-prefix: the whole base as prefix, for fleets with older agents;
    /// slow for large images. plain: zstd alone, read by every agent.
    #[arg(long, value_enum, default_value_t = DeltaEncoding::BaseExtents)]
    pub delta_format: DeltaEncoding,
    /// Phased rollout: hosts take this version at moments spread evenly over DURATION
    /// (e.g. 48h), each at a random place it keeps, instead of all at once. Pause it with
    /// `resign --rollout-start LATER`, stop it by publishing a fixed version;
    /// `atom-update now --skip-rollout` takes it at once on a host.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub rollout: Option<std::time::Duration>,
    /// When the rollout begins (RFC 3339, e.g. 2026-11-24T08:00:00Z); default: now.
    #[arg(long, value_name = "TIME", requires = "rollout")]
    pub rollout_start: Option<jiff::Timestamp>,
    /// The oldest agent that may install this image; older agents refuse it with "update
    /// the agent first" (publish an image with a newer agent before, as a stepping stone).
    #[arg(long, value_name = "VERSION")]
    pub min_agent: Option<Version>,
    /// A manifest field hosts must understand to install this (repeat); agents that do not
    /// know it refuse the manifest. Fields not named are optional to older agents.
    #[arg(long = "critical", value_name = "FIELD")]
    pub critical: Vec<String>,
    /// Write the whole publication but leave it unsigned, in pending/CHANNEL/manifest.toml:
    /// `atom-build sign` signs it there or on another machine. Hosts see nothing until then.
    #[arg(long)]
    pub sign_later: bool,
    /// The image to publish.
    pub image: PathBuf,
}

/// Sign a publication made with `publish --sign-later`, here or on another machine.
///
/// In place: `sign --repo R --channel C --key K` signs the pending manifest, checks every
/// file it names and makes it the channel's current one. Air-gapped: copy
/// pending/C/manifest.toml to the signing machine, run `sign --manifest manifest.toml --key K
/// --output manifest.sig` there (it prints what it signs), bring manifest.sig back and run
/// `sign --repo R --channel C --signature manifest.sig`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// Repository with a pending publication (in place, or to attach --signature files).
    #[arg(long, requires = "channel", conflicts_with = "manifest")]
    pub repo: Option<PathBuf>,
    #[arg(long)]
    pub channel: Option<String>,
    /// A manifest file to sign detached (with --output), without the repository.
    #[arg(long, value_name = "FILE", requires_all = ["output", "keys"])]
    pub manifest: Option<PathBuf>,
    /// Where the detached signature goes.
    #[arg(long, value_name = "SIG", requires = "manifest")]
    pub output: Option<PathBuf>,
    /// Signing key: a key file or a pkcs11: URI (repeat to sign with several).
    #[arg(long = "key", value_name = "FILE|URI")]
    pub keys: Vec<String>,
    /// A detached signature made elsewhere, to attach (repeat for several).
    #[arg(long = "signature", value_name = "SIG", requires = "repo")]
    pub signatures: Vec<PathBuf>,
    /// Further public keys the channel's current manifest and attached signatures may be by.
    #[arg(long, value_name = "PUB")]
    pub trust: Vec<PathBuf>,
    /// File whose first line is the passphrase of an encrypted key file.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Key roles: also vouch for the new manifest with this freshness key (as `refresh`).
    #[arg(long, value_name = "FILE|URI", requires = "repo")]
    pub timestamp_key: Option<String>,
    /// Lifetime of that timestamp.
    #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
    pub timestamp_expires_in: std::time::Duration,
}

/// Key roles: write keys.toml, signed by the root key(s), naming release and freshness keys.
///
/// Hosts that trust a root key (in /etc/atom/keys/root/) require three signatures: the
/// root's over keys.toml, a release key's over the manifest, and a freshness key's over the
/// channel's timestamp. Run this on the offline root machine, against the repository or an
/// empty directory whose keys/ you then copy into the repository. A new keys.toml (higher
/// version) rotates release and freshness keys without touching the hosts.
///
/// Migrating a single-key repository: name the existing key as the release key, run
/// `refresh`, then ship the root's .pub in /etc/atom/keys/root/ with the next image. Hosts
/// that still trust the old key directly keep working.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Repository (or an empty directory) to write keys/keys.toml into.
    #[arg(long)]
    pub repo: PathBuf,
    /// Root signing key: a key file or a pkcs11: URI (repeat for several).
    #[arg(long = "root-key", value_name = "FILE|URI", required = true)]
    pub root_keys: Vec<String>,
    /// A release key's public file (repeat; 1 to 8).
    #[arg(long = "release", value_name = "PUB", required = true)]
    pub release: Vec<PathBuf>,
    /// A freshness key's public file (repeat; 1 to 8).
    #[arg(long = "freshness", value_name = "PUB", required = true)]
    pub freshness: Vec<PathBuf>,
    /// How long this keys.toml is valid: the root must sign a new one before then.
    #[arg(long, default_value = "2years", value_parser = humantime::parse_duration)]
    pub expires_in: std::time::Duration,
    /// How long the release and freshness keys named here are valid.
    #[arg(long, default_value = "1year", value_parser = humantime::parse_duration)]
    pub keys_expire_in: std::time::Duration,
    /// The version of the new keys.toml: default the directory's keys.toml plus one; needed
    /// on a directory without one (1 for the first list). Hosts refuse a lower version, and
    /// another list under a version they accepted.
    #[arg(long)]
    pub version: Option<u64>,
    /// File whose first line is the passphrase of an encrypted root key file.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// Key roles: sign a fresh timestamp for each channel's current manifest.
///
/// Needs only the freshness key, which may therefore live on the repository server; run it
/// from a timer (atom-refresh.timer) well within --expires-in. Hosts refuse a channel whose
/// timestamp expired: a frozen or stale mirror is noticed within days.
#[derive(Debug, Args)]
pub struct RefreshArgs {
    #[arg(long)]
    pub repo: PathBuf,
    /// Only these channels (default: all).
    #[arg(long = "channel")]
    pub channels: Vec<String>,
    /// Freshness key: a key file or a pkcs11: URI.
    #[arg(long, value_name = "FILE|URI")]
    pub key: String,
    /// How long the timestamps stay valid.
    #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
    pub expires_in: std::time::Duration,
    /// File whose first line is the passphrase of an encrypted key file.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// The channel a publisher signs, and with which keys.
#[derive(Debug, Args)]
pub struct Signing {
    /// Repository directory.
    #[arg(long)]
    pub repo: PathBuf,
    /// Channel name, e.g. stable.
    #[arg(long)]
    pub channel: String,
    /// Signing key: a .key file from keygen (plain or --encrypt), or a pkcs11: URI. With
    /// key roles, a release key. Not needed with --sign-later.
    #[arg(long, value_name = "FILE|URI")]
    pub key: Option<String>,
    /// File whose first line is the passphrase of an encrypted key file (else asked on the
    /// terminal).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Key roles: also vouch for the new manifest with this freshness key (as `refresh`).
    /// Without it, hosts with root keys take the new manifest at the next `refresh`.
    #[arg(long, value_name = "FILE|URI")]
    pub timestamp_key: Option<String>,
    /// Lifetime of that timestamp.
    #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
    pub timestamp_expires_in: std::time::Duration,
    /// Further public keys accepted on the channel's current manifest (key rotation).
    #[arg(long, value_name = "PUB")]
    pub trust: Vec<PathBuf>,
    /// Sign even though the channel's current manifest is dated after this machine's
    /// clock. Only when this clock is right: then that manifest came from a publisher
    /// with a clock in the future, and hosts refused it. (If this clock is behind, fix it
    /// instead: hosts would refuse the new manifest as a replay.)
    #[arg(long)]
    pub replace_future_manifest: bool,
}

/// Re-sign the channel's current manifest: same version and files, a new expiry.
///
/// Run it before the manifest expires when no new version is due (hosts refuse an expired
/// manifest: that bound is what stops a frozen mirror from hiding updates forever). It can
/// also sign with a new key (with --trust OLD.pub, as publish does) and change a phased
/// rollout: --rollout-start moves it (a later start pauses it for the hosts whose turn has
/// not come), --rollout sets a new spread, --end-rollout lets every host take it now.
#[derive(Debug, Args)]
pub struct ResignArgs {
    #[command(flatten)]
    pub signing: Signing,
    /// How long the re-signed manifest stays valid, from now (see publish --expires-in).
    #[arg(long, default_value = "30days", value_parser = humantime::parse_duration)]
    pub expires_in: std::time::Duration,
    /// A new rollout spread, starting at --rollout-start or now.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub rollout: Option<std::time::Duration>,
    /// A new rollout start (RFC 3339), keeping the spread unless --rollout is given.
    #[arg(long, value_name = "TIME")]
    pub rollout_start: Option<jiff::Timestamp>,
    /// End the phased rollout: every host may take the version now.
    #[arg(long, conflicts_with_all = ["rollout", "rollout_start"])]
    pub end_rollout: bool,
}

/// Check a repository: signatures, expiry, and the digest of every file.
///
/// Prints one line per problem and exits 3 if there is any. Warns (WARN lines, exit
/// unchanged) when a manifest, timestamp, keys.toml or a key named in it expires within
/// --warn-within or within a third of its lifetime, whichever comes first.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[arg(long)]
    pub repo: PathBuf,
    /// Trusted public key(s) that sign manifests: .pub files or directories of them.
    #[arg(long = "key", value_name = "PUB", required_unless_present = "roots")]
    pub keys: Vec<PathBuf>,
    /// Key roles: trusted root key(s), as hosts hold them; checks keys.toml, every
    /// channel's timestamp and the manifests against them.
    #[arg(long = "root", value_name = "PUB")]
    pub roots: Vec<PathBuf>,
    /// Warn about expiries this close.
    #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
    pub warn_within: std::time::Duration,
    /// Only this channel (default: all).
    #[arg(long)]
    pub channel: Option<String>,
    /// Skip decompressing payloads (checks only the digests of the files themselves).
    #[arg(long)]
    pub quick: bool,
}

/// List every version ever published on a channel.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[arg(long)]
    pub repo: PathBuf,
    #[arg(long)]
    pub channel: String,
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| format!("{e} (examples: 1G, 512M, 1073741824)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_are_binary() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert!(parse_size("lots").is_err());
    }
}

/// Run the build service: an HTTP API that takes orders for builds, a queue in a database
/// and local workers that build them (`atom-build build`, one directory and mount
/// namespace each).
///
/// Orders name a template (DIR/NAME.toml under --templates, with its drop-ins) plus
/// overrides of the keys --overridable lists, or carry a whole recipe (tokens with the
/// "recipe" scope: its hooks run on this host). Orders whose build would be the same (the
/// same key of the last stage, which covers every input) share one build. The queue
/// survives restarts: a build that was running when the service stopped runs again, or
/// fails with the reason after --max-attempts. Runs as root (builds need chroot and mount
/// namespaces). Tokens: `atom-build token add NAME`. The README lists the API with curl
/// examples.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8470")]
    pub listen: std::net::SocketAddr,
    /// Where builds, their logs and artifacts, and the default SQLite database live.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/atom-build")]
    pub data: PathBuf,
    /// The queue: sqlite:PATH (default DATA/service.db) or postgres://USER@HOST/DB, which
    /// several instances can share.
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// Recipes orders can name: NAME.toml (and NAME.d/) in this directory.
    #[arg(long, value_name = "DIR", default_value = "/etc/atom/templates")]
    pub templates: PathBuf,
    /// The stage cache the builds share.
    #[arg(long, value_name = "DIR", default_value = "/var/cache/atom-build")]
    pub cache: PathBuf,
    /// Builds at once on this host (default: one per core, at most one per 2 GiB).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// A worker renews its lease on a build this often (a quarter of it); a build whose
    /// lease ran out (its worker or instance vanished) is queued again.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub lease: std::time::Duration,
    /// Runs of a build whose worker vanished before it is failed.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub max_attempts: u32,
    /// Recipe keys (and the keys under them) a template-only token may set. Repeatable;
    /// replaces the default list.
    #[arg(long, value_name = "KEY", default_values = ["os.version", "packages.install", "image.size", "outputs.disk.formats", "outputs.tarball"])]
    pub overridable: Vec<String>,
    /// The address other instances send clients to for this instance's builds' files
    /// (default: http://LISTEN).
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    /// The largest image.size an order of a template-only token may ask for.
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = parse_size)]
    pub max_image_size: u64,
    /// Files of a finished build are removed this long after it ended, unless one of its
    /// orders is pinned (POST /v1/orders/ID/pin).
    #[arg(long, value_name = "DURATION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub expire_after: std::time::Duration,
    /// Workers start no build while the data directory has less free space than this.
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_size)]
    pub min_free: u64,
    /// The SMTP relay for orders' e-mail notices: smtp://[USER:PASSWORD@]HOST[:PORT]
    /// (STARTTLS when offered, required with a password; `?tls=required` insists) or smtps://HOST[:PORT]. Without
    /// it orders asking for e-mail are refused. Give a password through the variable, not
    /// the command line.
    #[arg(long, value_name = "URL", env = "ATOM_BUILD_SMTP", hide_env_values = true)]
    pub smtp: Option<String>,
    /// The sender of e-mail notices (default: atom-build@HOSTNAME).
    #[arg(long, value_name = "ADDRESS", requires = "smtp")]
    pub mail_from: Option<String>,
}

/// Build for a build service on another machine (`atom-build serve`): lease its queued
/// builds, run them here (`atom-build build`), send their logs and progress with every
/// heartbeat, upload their artifacts.
///
/// The token needs the "worker" scope (`atom-build token add NAME --scope worker` on the
/// service). Templates come from this host's --templates: the same files as the
/// service's, checked before each build (this host's recipe must come to the build's
/// digest, or the build fails saying so). Builds that publish stay on the service's own
/// workers, which hold its signing key. A worker that vanishes stops renewing its lease
/// and the build runs again elsewhere; on SIGTERM running builds go back to the queue.
/// Runs as root (builds need chroot and mount namespaces).
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The service's URL (http://HOST:PORT or https://…): one instance, which receives
    /// this worker's artifacts and serves them.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// A file holding the worker's token (default: the ATOM_BUILD_TOKEN variable).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// This worker's name in the queue (default: the host name); its job slots are
    /// NAME-1, NAME-2, …
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Where builds run (each removed once the service has its artifacts).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/atom-build-worker")]
    pub data: PathBuf,
    /// The templates orders name: the same as the service's.
    #[arg(long, value_name = "DIR", default_value = "/etc/atom/templates")]
    pub templates: PathBuf,
    /// This worker's stage cache.
    #[arg(long, value_name = "DIR", default_value = "/var/cache/atom-build")]
    pub cache: PathBuf,
    /// Builds at once (default: one per core, at most one per 2 GiB).
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// No build starts while the data directory has less free space than this.
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_size)]
    pub min_free: u64,
}

/// Manage the build service's API tokens (on its database).
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The service's data directory (for its default database).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/atom-build", global = true)]
    pub data: PathBuf,
    /// The service's database, as `atom-build serve --database` takes it.
    #[arg(long, value_name = "URL", global = true)]
    pub database: Option<String>,
    #[command(subcommand)]
    pub action: TokenAction,
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Create a token; its secret is printed once, alone on stdout.
    Add {
        /// A name for the token's owner (unique).
        name: String,
        /// Also allow: "recipe" (orders carry whole recipes, whose hooks run on the build
        /// host), "publish" (orders publish with the service's key), "worker" (a remote
        /// worker, `atom-build worker`) or "email" (orders may ask for e-mail notices
        /// through the service's relay). Repeatable.
        #[arg(long, value_name = "SCOPE")]
        scope: Vec<String>,
        /// Orders of this token queued or building at once.
        #[arg(long, value_name = "N", default_value_t = 10)]
        max_queued: u32,
    },
    /// Every token: name, id, scopes, limit, state.
    List,
    /// Refuse a token's requests from now on.
    Revoke { name: String },
}

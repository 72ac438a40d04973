//! `atom-install` as `/init` of the installer's initramfs: the early mounts and modules,
//! the medium found by its volume id, the install, then reboot (or what the config says).

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atom_dist::install::{After, CONFIG_PATH, DIR, InstallerConfig};
use nix::mount::MsFlags;

use super::say;

const MEDIUM: &str = "/run/medium";

pub fn run() -> ! {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/run", "tmpfs"),
    ] {
        let _ = fs::create_dir_all(target);
        if let Err(e) = nix::mount::mount(Some(source), target, Some(fstype), MsFlags::MS_NOSUID, None::<&str>) {
            say(&format!("warning: cannot mount {target}: {e}"));
        }
    }
    super::console::mirror_all();
    // A panic must not become a kernel panic and a reboot loop: say it, then halt.
    std::panic::set_hook(Box::new(|info| {
        say(&format!("INSTALL FAILED: internal error: {info}"));
        finish(After::Halt);
    }));
    let mut cfg = match fs::read_to_string(Path::new("/").join(CONFIG_PATH)) {
        Ok(text) => match InstallerConfig::parse(&text) {
            Ok(c) => c,
            Err(e) => {
                say(&format!(
                    "INSTALL FAILED: /{CONFIG_PATH} is not valid ({e}): this initramfs and its installer do not match"
                ));
                finish(After::Halt);
            }
        },
        Err(_) => InstallerConfig::default(),
    };
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for w in cfg.apply_cmdline(&cmdline) {
        say(&format!("warning: {w}"));
    }
    load_modules(&cfg.modules);
    let mut medium_device = PathBuf::new();
    let result = find_medium(&cfg).and_then(|device| {
        medium_device = device.clone();
        if let Some(on) = already_installed(&cfg, &device) {
            say(&format!(
                "{} already holds this medium's install (the same disk GUID): remove the installer medium \
                 (or boot the disk first) to start it; to install again, clear its table first (wipefs -a)",
                on.display()
            ));
            finish(cfg.on_failure);
        }
        let opts = super::Options {
            medium: Path::new(MEDIUM).join(DIR),
            keys: PathBuf::from("/etc/atom/keys"),
            target: cfg.target.clone(),
            keep_partlabel: cfg.keep_partlabel.clone(),
            medium_device: Some(device),
            confirm: false,
            wait: Duration::from_secs(cfg.wait_secs),
        };
        super::run(&opts)
    });
    let _ = nix::mount::umount(MEDIUM);
    nix::unistd::sync();
    match result {
        Ok(done) => {
            for w in &done.warnings {
                say(&format!("warning: {w}"));
            }
            say(&done.summary());
            say("INSTALL COMPLETE");
            // A CD left in would boot the installer again; a stick must be pulled by hand.
            eject(&medium_device);
            finish(cfg.after)
        }
        Err(e) => {
            say(&format!("INSTALL FAILED: {e:#}"));
            finish(cfg.on_failure)
        }
    }
}

fn finish(after: After) -> ! {
    use nix::sys::reboot::{RebootMode, reboot};
    let mode = match after {
        After::Reboot => {
            say("rebooting into the installed system");
            RebootMode::RB_AUTOBOOT
        }
        After::Poweroff => {
            say("powering off");
            RebootMode::RB_POWER_OFF
        }
        After::Halt => {
            say("halted: the message above stays on the console; power the machine off to leave");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    };
    let e = reboot(mode);
    say(&format!("cannot {after:?}: {e:?}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn load_modules(modules: &[String]) {
    for m in modules {
        let result = fs::File::open(m).map_err(|e| e.to_string()).and_then(|f| {
            nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty()).map_err(|e| e.to_string())
        });
        match result {
            Ok(()) => {}
            Err(e) if e.contains("EEXIST") => {}
            Err(e) => say(&format!("warning: cannot load module {m}: {e}")),
        }
    }
}

/// A disk that already holds this medium's disk (its GPT has the image's disk GUID), as after
/// the reboot that follows an install with the medium still first in the boot order: the
/// configured target, or with `empty`, any disk once none is empty.
fn already_installed(cfg: &InstallerConfig, medium: &Path) -> Option<PathBuf> {
    let spec = cfg.target.as_deref()?;
    let disks = super::target::list(Path::new("/sys/block"));
    let candidates: Vec<PathBuf> = if spec == "empty" {
        if super::target::select(spec, &disks, Some(medium)).is_ok() {
            return None;
        }
        disks.iter().map(|d| d.path.clone()).filter(|p| p != medium).collect()
    } else {
        vec![super::target::select(spec, &disks, Some(medium)).ok()?]
    };
    let image = image_guid()?;
    candidates
        .into_iter()
        .find(|d| super::table::installed_guid(d) == Some(image))
}

/// The disk GUID in the medium's signed image head (install.toml's head digest is checked
/// when the install runs; here only a match is looked for).
fn image_guid() -> Option<[u8; 16]> {
    use std::io::Read;
    let file = fs::File::open(Path::new(MEDIUM).join(DIR).join(atom_dist::install::DISK)).ok()?;
    let mut dec = zstd::stream::read::Decoder::new(file).ok()?;
    dec.window_log_max(24).ok()?;
    let mut head = vec![0u8; 1024];
    dec.read_exact(&mut head).ok()?;
    (&head[512..520] == b"EFI PART").then(|| head[512 + 56..512 + 72].try_into().expect("16 bytes"))
}

/// Opens the tray of a CD medium (CDROMEJECT); nothing for other devices.
fn eject(device: &Path) {
    use std::os::fd::AsRawFd;
    if !device
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("sr"))
    {
        return;
    }
    nix::ioctl_none_bad!(cdrom_eject, 0x5309);
    if let Ok(f) = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(device)
    {
        // SAFETY: CDROMEJECT takes no argument; the descriptor is the CD device.
        if unsafe { cdrom_eject(f.as_raw_fd()) }.is_ok() {
            say(&format!("ejected {}", device.display()));
        }
    }
}

/// The ISO 9660 volume id of `device`, if it has one.
fn volume_id(device: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(device).ok()?;
    f.seek(SeekFrom::Start(16 * 2048)).ok()?;
    let mut pvd = [0u8; 72];
    f.read_exact(&mut pvd).ok()?;
    (pvd[0] == 1 && &pvd[1..6] == b"CD001").then(|| String::from_utf8_lossy(&pvd[40..72]).trim_end().to_string())
}

/// Waits for the block device with the medium's volume id, mounts it on [`MEDIUM`].
fn find_medium(cfg: &InstallerConfig) -> Result<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(cfg.wait_secs);
    loop {
        let mut names: Vec<String> = fs::read_dir("/sys/class/block")
            .map(|rd| rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        names.sort();
        for name in names {
            let device = Path::new("/dev").join(&name);
            if volume_id(&device).as_deref() == Some(cfg.medium_label.as_str()) {
                fs::create_dir_all(MEDIUM)?;
                nix::mount::mount(Some(&device), MEDIUM, Some("iso9660"), MsFlags::MS_RDONLY, None::<&str>)
                    .with_context(|| format!("cannot mount the medium {}", device.display()))?;
                if let Some(want) = &cfg.description_digest {
                    let found = fs::read(Path::new(MEDIUM).join(DIR).join(atom_dist::install::DESCRIPTION))
                        .map(|b| atom_dist::digest::Digest::of(&b));
                    if found.as_ref().ok() != Some(want) {
                        say(&format!(
                            "passing over {}: labelled {} but another medium than this installer's",
                            device.display(),
                            cfg.medium_label
                        ));
                        let _ = nix::mount::umount(MEDIUM);
                        continue;
                    }
                }
                say(&format!("medium {} on {}", cfg.medium_label, device.display()));
                // The whole disk the medium is on (a USB stick's partitions are it too).
                let disk = bootsel::sysfs::partition_of_device(&device)
                    .map(|p| p.disk)
                    .unwrap_or(device);
                return Ok(disk);
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "no medium with volume id {} appeared in {} s (is the installer's storage driver in its initramfs?)",
                cfg.medium_label,
                cfg.wait_secs
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

//! The initramfs `/init`: mount the basics, choose the slot, mount it with its state and
//! overlays, record what happened, switch root. Never panics and never hangs silently: any
//! failure ends in [`emergency`], which explains on the console and offers a shell or
//! reboots.

mod disk;
mod mount;
mod seed;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bootsel::record::BootRecord;
use bootsel::select::{Reason, why_not_bootable};
use bootsel::{BootTable, SlotLabels};
use nix::mount::MsFlags;

use crate::cli::Failure;
use bootsel::initconfig::{Config, EtcMode};

const CONFIG_PATH: &str = "/etc/bootsel.toml";

/// Where things go: the real `/sysroot` and `/run` at boot, or a scratch directory in tests.
pub struct Paths {
    pub newroot: PathBuf,
    pub run: PathBuf,
}

impl Paths {
    fn at(root: &Path) -> Self {
        Paths {
            newroot: root.join("sysroot"),
            run: root.join("run"),
        }
    }

    fn record(&self) -> PathBuf {
        self.run.join("atom/boot.toml")
    }

    fn state(&self) -> PathBuf {
        self.run.join("atom/state")
    }
}

macro_rules! say {
    ($($arg:tt)*) => { eprintln!("bootsel: {}", format!($($arg)*)) };
}

pub fn run_as_pid1() -> ! {
    run(None)
}

/// The whole boot. Only meaningful as PID 1.
pub fn run(config_path: Option<&Path>) -> ! {
    if std::process::id() != 1 {
        say!("`bootsel init` runs only as PID 1 in the initramfs; use `bootsel prepare-root` to test");
        std::process::exit(2);
    }
    let early = [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/run", "tmpfs"),
    ];
    for (source, target, fstype) in early {
        let data = (fstype == "tmpfs").then_some("mode=0755");
        if let Err(e) = mount::mount_fs(source, Path::new(target), fstype, MsFlags::MS_NOSUID, data) {
            say!("warning: {e}");
        }
    }
    let mut cfg = match fs::read_to_string(config_path.unwrap_or(Path::new(CONFIG_PATH))) {
        Ok(text) => Config::parse(&text).unwrap_or_else(|e| {
            say!("error in {CONFIG_PATH}: {e}; booting with built-in defaults");
            Config::default()
        }),
        Err(e) => {
            say!("no {CONFIG_PATH} ({e}); using built-in defaults");
            Config::default()
        }
    };
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for w in cfg.apply_cmdline(&cmdline) {
        say!("warning: {w}");
    }
    load_modules(&cfg.modules);
    let paths = Paths {
        newroot: PathBuf::from("/sysroot"),
        run: PathBuf::from("/run"),
    };
    match prepare_root(&cfg, &paths).and_then(|()| switch_root(&cfg, &paths)) {
        Ok(never) => match never {},
        Err(e) => emergency(&e, &cfg),
    }
}

/// `bootsel prepare-root`: the boot up to (not including) switch_root, under `root`.
pub fn prepare_root_cli(config_path: Option<&Path>, root: Option<&Path>) -> Result<(), Failure> {
    let cfg = match config_path {
        Some(p) => {
            let text = fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            Config::parse(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => Config::default(),
    };
    let root = root.ok_or_else(|| Failure::Usage("--root DIR is required".into()))?;
    load_modules(&cfg.modules);
    prepare_root(&cfg, &Paths::at(root)).map_err(Failure::Error)
}

fn load_modules(modules: &[String]) {
    for m in modules {
        let result = fs::File::open(m).map_err(|e| e.to_string()).and_then(|f| {
            nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty()).map_err(|e| e.to_string())
        });
        match result {
            Ok(()) => say!("loaded {m}"),
            Err(e) if e.contains("EEXIST") => {}
            Err(e) => say!("warning: cannot load module {m}: {e}"),
        }
    }
}

fn describe_slots(table: &BootTable) -> String {
    table
        .slots()
        .iter()
        .map(|s| {
            format!(
                "  slot {} ({}, partition {}): priority {}, tries {}, successful {} -> {}",
                s.name,
                s.label,
                s.partition,
                s.flags.priority,
                s.flags.tries,
                u8::from(s.flags.successful),
                why_not_bootable(s.flags).unwrap_or("bootable")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Chooses, spends the try (on disk, before mounting), mounts slot, state and overlays,
/// and writes the boot record.
pub fn prepare_root(cfg: &Config, paths: &Paths) -> Result<(), String> {
    let labels = SlotLabels {
        a: cfg.labels[0].clone(),
        b: cfg.labels[1].clone(),
    };
    let wait = Duration::from_secs(u64::from(cfg.wait_seconds));
    let mut found = disk::find(cfg.disk.as_deref(), &labels, wait)?;
    let table = &mut found.table;
    let Some((name, decision)) = table.decide() else {
        return Err(format!(
            "no bootable slot on {}:\n{}",
            found.path.display(),
            describe_slots(table)
        ));
    };
    let chosen = table.slot(name).clone();
    table.set_flags(name, decision.new_flags);
    // The try must be on disk before anything of the slot runs: a slot that crashes the
    // machine must still run out of tries.
    if let Err(e) = table.commit(&mut found.file) {
        say!("WARNING: cannot write the partition table ({e}); this boot's try is not recorded");
    }
    let fell_back_from = table.fallback_slot(&decision).map(|n| n.to_string());
    if let Some(from) = &fell_back_from {
        say!("slot {from} is out of tries and was never marked successful: falling back");
    }
    say!(
        "booting slot {name} ({}, partition {}): {}",
        chosen.label,
        chosen.partition,
        decision.reason
    );

    let node = disk::partition_node(&found.path, chosen.partition, wait)?;
    let node_str = node.to_string_lossy().into_owned();
    mount::mount_fs(&node_str, &paths.newroot, &cfg.root_fstype, MsFlags::MS_RDONLY, None)?;

    let state = mount_state(cfg, paths, table, &found.path, wait);
    let state_ok = state == "mounted";
    if !state_ok {
        say!("state: {state}");
    }
    setup_etc(cfg, paths, state_ok)?;
    setup_binds(cfg, paths, state_ok)?;

    let (trial, tries_left) = match decision.reason {
        Reason::Trial { tries_left } => (true, tries_left),
        Reason::Successful => (false, 0),
    };
    let record = BootRecord {
        slot: name.to_string(),
        label: chosen.label.clone(),
        partition: chosen.partition,
        partuuid: chosen.part_uuid.clone(),
        disk: found.path.to_string_lossy().into_owned(),
        reason: decision.reason.to_string(),
        trial,
        tries_left,
        fell_back_from,
        state,
    };
    let record_path = paths.record();
    fs::create_dir_all(record_path.parent().expect("record has a parent"))
        .and_then(|()| fs::write(&record_path, record.to_toml()))
        .map_err(|e| format!("cannot write {}: {e}", record_path.display()))?;
    Ok(())
}

/// Mounts the state partition; on failure the boot goes on without it and says why.
fn mount_state(cfg: &Config, paths: &Paths, table: &BootTable, disk_path: &Path, wait: Duration) -> String {
    if cfg.state.is_empty() {
        return "none".into();
    }
    let Some(number) = table.find_partition(&cfg.state) else {
        return format!("unavailable: no partition labelled {:?}", cfg.state);
    };
    let result = disk::partition_node(disk_path, number, wait).and_then(|node| {
        mount::mount_fs(
            &node.to_string_lossy(),
            &paths.state(),
            &cfg.state_fstype,
            MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
            None,
        )
    });
    match result {
        Ok(()) => "mounted".into(),
        Err(e) => format!("unavailable: {e}; booting without persistent state"),
    }
}

/// Mounts an overlay on `target` (lower: what the slot has there) with its upper layer
/// under `upper_base`; with `upper_base` None the upper layer lives in RAM.
fn overlay(paths: &Paths, target: &Path, upper_base: Option<PathBuf>, ram_name: &str) -> Result<(), String> {
    let upper_base = match upper_base {
        Some(b) => b,
        None => {
            let t = paths.run.join("atom/ram").join(ram_name);
            mount::mount_fs(
                "tmpfs",
                &t,
                "tmpfs",
                MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
                Some("mode=0755"),
            )?;
            t
        }
    };
    let (upper, work) = (upper_base.join("upper"), upper_base.join("work"));
    for d in [&upper, &work] {
        fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        target.display(),
        upper.display(),
        work.display()
    );
    mount::mount_fs("overlay", target, "overlay", MsFlags::empty(), Some(&data))
}

/// /etc as an overlay: the slot's /etc below, a writable upper on state (or in RAM).
fn setup_etc(cfg: &Config, paths: &Paths, state_ok: bool) -> Result<(), String> {
    let etc = paths.newroot.join("etc");
    match cfg.etc {
        EtcMode::None => Ok(()),
        EtcMode::Overlay if state_ok => overlay(paths, &etc, Some(paths.state().join("etc")), "etc"),
        EtcMode::Overlay | EtcMode::Tmpfs => overlay(paths, &etc, None, "etc"),
    }
}

/// Persistent directories bound from state. Without state they become overlays with the
/// upper layer in RAM: writable, with the slot's content, forgotten at reboot.
fn setup_binds(cfg: &Config, paths: &Paths, state_ok: bool) -> Result<(), String> {
    for b in &cfg.binds {
        let rel = b.trim_start_matches('/');
        let target = paths.newroot.join(rel);
        if !target.is_dir() {
            say!("warning: {b} does not exist in the slot; not binding it");
            continue;
        }
        if state_ok {
            let source = paths.state().join(rel);
            if !source.is_dir() {
                // First boot with this state: start from what the image ships, so the
                // system finds the directories it expects.
                seed::seed_dir(&target, &source)?;
                say!("seeded {} on the state partition from the slot", b);
            }
            mount::bind(&source, &target)?;
        } else {
            overlay(paths, &target, None, &rel.replace('/', "-"))?;
        }
    }
    Ok(())
}

/// Moves the API filesystems into the new root, makes it `/` and executes its init.
fn switch_root(cfg: &Config, paths: &Paths) -> Result<std::convert::Infallible, String> {
    let root = &paths.newroot;
    let init_in_root = root.join(cfg.init.trim_start_matches('/'));
    if fs::symlink_metadata(&init_in_root).is_err() {
        return Err(format!(
            "the slot has no {} (kernel option bootsel.init= chooses another)",
            cfg.init
        ));
    }
    for d in ["/dev", "/proc", "/sys", "/run"] {
        mount::move_mount(Path::new(d), &root.join(&d[1..]))?;
    }
    std::env::set_current_dir(root).map_err(|e| format!("cannot enter {}: {e}", root.display()))?;
    mount::move_mount(Path::new("."), Path::new("/"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    let err = std::process::Command::new(&cfg.init).arg0("init").exec();
    Err(format!("cannot execute {}: {err}", cfg.init))
}

/// Nothing can boot: say why, offer the shell, else reboot after a delay. Never returns.
fn emergency(why: &str, cfg: &Config) -> ! {
    eprintln!("\n*** bootsel: CANNOT BOOT ***\n{why}\n");
    let shell = Path::new(&cfg.emergency_shell);
    if !cfg.emergency_shell.is_empty() && shell.exists() {
        say!("starting emergency shell {}; exit it to reboot", shell.display());
        if let Err(e) = std::process::Command::new(shell).status() {
            say!("cannot start {}: {e}", shell.display());
        }
    } else {
        say!("no emergency shell; rebooting in {} s", cfg.reboot_delay_seconds);
        std::thread::sleep(Duration::from_secs(u64::from(cfg.reboot_delay_seconds)));
    }
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // reboot(2) returned: keep PID 1 alive (its exit would panic the kernel) and say so.
    loop {
        say!("reboot failed; halted");
        std::thread::sleep(Duration::from_secs(3600));
    }
}

//! The initramfs `/init`: mount the basics, choose the slot, mount it with its state and
//! overlays, record what happened, switch root. Never panics and never hangs silently: any
//! failure ends in [`emergency`], which explains on the console and offers a shell or
//! reboots.

mod disk;
mod kexec;
mod mount;
mod seed;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bootsel::handover::{Handover, SLOT_KERNEL};
use bootsel::record::BootRecord;
use bootsel::select::{Reason, why_not_bootable};
use bootsel::table::Slot;
use bootsel::{BootTable, SlotLabels, SlotName};
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

mod etc;

pub fn run_as_pid1() -> ! {
    run(None)
}

/// What ends a successful boot path, done by PID 1 at boot and only described in tests.
pub enum Finish {
    /// The slot carries its own kernel: load it and hand over.
    Kexec { slot: kexec::SlotKernel, cmdline: String },
    /// The slot is mounted with its state: switch root to it.
    SwitchRoot,
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
    say!("kernel {}", kernel_release());
    load_modules(&cfg.modules);
    let paths = Paths {
        newroot: PathBuf::from("/sysroot"),
        run: PathBuf::from("/run"),
    };
    let result = match Handover::parse(&cmdline) {
        None => first_stage(&cfg, &paths, &cmdline, &mut finish_at_boot),
        Some(handover) => match second_stage(&cfg, &paths, handover, &mut finish_at_boot) {
            Err(Stage2Failure::SlotMarkedFailed(e)) => reboot_to_first_stage(&e, &cfg),
            Err(Stage2Failure::Other(e)) => Err(e),
            Ok(()) => Err("the boot path ended without switching root".into()),
        },
    };
    match result {
        Ok(()) => emergency("the boot path ended without switching root", &cfg),
        Err(e) => emergency(&e, &cfg),
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn finish_at_boot(cfg: &Config, paths: &Paths, finish: Finish) -> Result<(), String> {
    match finish {
        Finish::Kexec { slot, cmdline } => {
            kexec::load(&slot, &cmdline)?;
            say!("starting the slot's kernel {}", slot.release);
            drop(slot);
            mount::detach(&paths.newroot);
            Err(kexec::execute())
        }
        Finish::SwitchRoot => switch_root(cfg, paths).map(|never| match never {}),
    }
}

/// `bootsel prepare-root`: the boot up to (not including) switch_root or kexec, under
/// `root`; `cmdline` stands in for /proc/cmdline (a hand-over makes it the second stage).
pub fn prepare_root_cli(config_path: Option<&Path>, root: Option<&Path>, cmdline: &str) -> Result<(), Failure> {
    let mut cfg = match config_path {
        Some(p) => {
            let text = fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            Config::parse(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => Config::default(),
    };
    for w in cfg.apply_cmdline(cmdline) {
        say!("warning: {w}");
    }
    let root = root.ok_or_else(|| Failure::Usage("--root DIR is required".into()))?;
    load_modules(&cfg.modules);
    let paths = Paths::at(root);
    let mut describe = |_: &Config, _: &Paths, finish: Finish| {
        match finish {
            Finish::Kexec { slot, cmdline } => {
                println!("kexec {} (kernel {})", slot.kernel_path.display(), slot.release);
                println!("cmdline {cmdline}");
            }
            Finish::SwitchRoot => println!("switch_root {}", paths.newroot.display()),
        }
        Ok(())
    };
    match Handover::parse(cmdline) {
        None => first_stage(&cfg, &paths, cmdline, &mut describe).map_err(Failure::Error),
        Some(h) => second_stage(&cfg, &paths, h, &mut describe).map_err(|e| match e {
            Stage2Failure::SlotMarkedFailed(e) => Failure::Error(format!("{e}; the slot was marked failed")),
            Stage2Failure::Other(e) => Failure::Error(e),
        }),
    }
}

type FinishFn<'a> = dyn FnMut(&Config, &Paths, Finish) -> Result<(), String> + 'a;

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

fn labels(cfg: &Config) -> SlotLabels {
    SlotLabels {
        a: cfg.labels[0].clone(),
        b: cfg.labels[1].clone(),
    }
}

/// The slot this boot runs and why.
struct Chosen {
    name: SlotName,
    slot: Slot,
    reason: Reason,
    fell_back_from: Option<SlotName>,
}

/// The first stage: choose, spend the try (on disk, before anything of the slot runs),
/// mount the slot, then hand over to its kernel or boot it directly. A slot that fails
/// on the way is marked failed and the other slot is tried in the same boot; only when no
/// slot is left does this return an error.
pub fn first_stage(cfg: &Config, paths: &Paths, cmdline: &str, finish: &mut FinishFn) -> Result<(), String> {
    let wait = Duration::from_secs(u64::from(cfg.wait_seconds));
    let mut found = disk::find(cfg.disk.as_deref(), None, &labels(cfg), disk::Access::ReadWrite, wait)?;
    let mut failures = Vec::new();
    loop {
        let chosen = spend_try(&mut found).map_err(|e| {
            if failures.is_empty() {
                e
            } else {
                format!("{e}\nthis boot:\n{}", failures.join("\n"))
            }
        })?;
        // A slot marked failed earlier in this boot shows up as `fell_back_from`, like one
        // that ran out of tries.
        match boot_chosen(cfg, paths, cmdline, &found, &chosen, finish) {
            Ok(()) => return Ok(()),
            Err(e) => {
                say!("slot {} cannot boot: {e}", chosen.name);
                unmount_all(paths);
                failures.push(format!("  slot {}: {e}", chosen.name));
                mark_failed(&mut found, chosen.name);
            }
        }
    }
}

/// Decides and writes the spent try before returning.
fn spend_try(found: &mut disk::FoundDisk) -> Result<Chosen, String> {
    let Some((name, decision)) = found.table.decide() else {
        return Err(format!(
            "no bootable slot on {}:\n{}",
            found.path.display(),
            describe_slots(&found.table)
        ));
    };
    let slot = found.table.slot(name).clone();
    found.table.set_flags(name, decision.new_flags);
    // The try must be on disk before anything of the slot runs: a slot that crashes the
    // machine must still run out of tries.
    if let Err(e) = found.commit() {
        say!("WARNING: cannot write the partition table ({e}); this boot's try is not recorded");
    }
    let fell_back_from = found.table.fallback_slot(&decision);
    if let Some(from) = fell_back_from {
        say!("slot {from} is out of tries and was never marked successful: falling back");
    }
    say!(
        "booting slot {name} ({}, partition {}): {}",
        slot.label,
        slot.partition,
        decision.reason
    );
    Ok(Chosen {
        name,
        slot,
        reason: decision.reason,
        fell_back_from,
    })
}

/// A slot that failed after the choice is taken out (see [`SlotFlags::failed`]).
fn mark_failed(found: &mut disk::FoundDisk, name: SlotName) {
    let flags = found.table.slot(name).flags;
    found.table.set_flags(name, flags.failed());
    match found.commit() {
        Ok(()) => say!("slot {name} marked failed (tries 0, not successful)"),
        Err(e) => say!("WARNING: cannot mark slot {name} failed ({e})"),
    }
}

fn boot_chosen(
    cfg: &Config,
    paths: &Paths,
    cmdline: &str,
    found: &disk::FoundDisk,
    chosen: &Chosen,
    finish: &mut FinishFn,
) -> Result<(), String> {
    mount_slot(cfg, paths, found, &chosen.slot)?;
    if kexec::slot_has_kernel(&paths.newroot) {
        let slot = kexec::open(&paths.newroot)?;
        let (trial, tries_left) = trial_and_tries(chosen.reason);
        let handover = Handover {
            slot: chosen.name,
            partuuid: chosen.slot.part_uuid.to_ascii_lowercase(),
            disk_guid: found.table.disk_guid(),
            trial,
            tries_left,
            fell_back_from: chosen.fell_back_from,
        };
        let cmdline = handover.cmdline(cmdline)?;
        return finish(cfg, paths, Finish::Kexec { slot, cmdline });
    }
    say!("the slot has no /{SLOT_KERNEL}: booting it with this kernel");
    finish_slot(cfg, paths, found, chosen)?;
    finish(cfg, paths, Finish::SwitchRoot)
}

fn trial_and_tries(reason: Reason) -> (bool, u8) {
    match reason {
        Reason::Trial { tries_left } => (true, tries_left),
        Reason::Successful => (false, 0),
    }
}

fn mount_slot(cfg: &Config, paths: &Paths, found: &disk::FoundDisk, slot: &Slot) -> Result<(), String> {
    let wait = Duration::from_secs(u64::from(cfg.wait_seconds));
    let node = disk::partition_node(&found.path, slot.partition, wait)?;
    let node_str = node.to_string_lossy().into_owned();
    mount::mount_fs(
        &node_str,
        &paths.newroot,
        &cfg.root_fstype,
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None,
    )
}

/// State, overlays and the boot record for the mounted slot.
fn finish_slot(cfg: &Config, paths: &Paths, found: &disk::FoundDisk, chosen: &Chosen) -> Result<(), String> {
    let wait = Duration::from_secs(u64::from(cfg.wait_seconds));
    let state = mount_state(cfg, paths, &found.table, &found.path, wait);
    let state_ok = state == "mounted";
    if !state_ok {
        say!("state: {state}");
    }
    setup_etc(cfg, paths, state_ok, found, chosen.name)?;
    setup_binds(cfg, paths, state_ok)?;
    let (trial, tries_left) = trial_and_tries(chosen.reason);
    let record = BootRecord {
        slot: chosen.name.to_string(),
        label: chosen.slot.label.clone(),
        partition: chosen.slot.partition,
        partuuid: chosen.slot.part_uuid.clone(),
        disk: found.path.to_string_lossy().into_owned(),
        reason: chosen.reason.to_string(),
        trial,
        tries_left,
        fell_back_from: chosen.fell_back_from.map(|n| n.to_string()),
        state,
        kernel: Some(kernel_release()),
    };
    let record_path = paths.record();
    fs::create_dir_all(record_path.parent().expect("record has a parent"))
        .and_then(|()| fs::write(&record_path, record.to_toml()))
        .map_err(|e| format!("cannot write {}: {e}", record_path.display()))
}

/// Undoes what a failed attempt mounted, so the next slot starts clean.
fn unmount_all(paths: &Paths) {
    mount::detach(&paths.run.join(bootsel::etcmerge::IMAGE_ETC));
    mount::detach(&paths.newroot);
    if let Ok(rd) = fs::read_dir(paths.run.join("atom/ram")) {
        for e in rd.flatten() {
            mount::detach(&e.path());
        }
    }
    mount::detach(&paths.state());
}

/// Why a second stage did not switch root.
pub enum Stage2Failure {
    /// The chosen slot failed and is marked so: a reboot lets the first stage fall back.
    SlotMarkedFailed(String),
    /// Anything else (no hand-over we can use, no disk).
    Other(String),
}

/// The second stage, in the slot's own initramfs: the first stage chose and spent the
/// try; this mounts exactly that slot (found by disk GUID and partition UUID, never by
/// choosing again) with its state, records the boot and switches root. A failure marks
/// the slot failed, so the reboot that follows falls back.
pub fn second_stage(
    cfg: &Config,
    paths: &Paths,
    handover: Result<Handover, String>,
    finish: &mut FinishFn,
) -> Result<(), Stage2Failure> {
    second_stage_in(cfg, paths, handover, RootMount::Mount, finish)
}

/// Whether the second stage mounts the slot itself or finds it mounted (by a
/// distribution initramfs that read `root=PARTUUID=` from the hand-over).
#[derive(Clone, Copy, PartialEq, Eq)]
enum RootMount {
    Mount,
    AlreadyMounted,
}

fn second_stage_in(
    cfg: &Config,
    paths: &Paths,
    handover: Result<Handover, String>,
    root: RootMount,
    finish: &mut FinishFn,
) -> Result<(), Stage2Failure> {
    let h = handover.map_err(|e| Stage2Failure::Other(format!("unusable hand-over from the first stage: {e}")))?;
    say!("second stage: slot {} chosen by the first stage", h.slot);
    let wait = Duration::from_secs(u64::from(cfg.wait_seconds));
    let mut found = disk::find(
        cfg.disk.as_deref(),
        Some(&h.disk_guid),
        &labels(cfg),
        disk::Access::ReadOnly,
        wait,
    )
    .map_err(Stage2Failure::Other)?;
    let slot = found.table.slot(h.slot).clone();
    if !slot.part_uuid.eq_ignore_ascii_case(&h.partuuid) {
        return Err(Stage2Failure::Other(format!(
            "slot {} on {} is partition {}, not the {} the first stage chose",
            h.slot,
            found.path.display(),
            slot.part_uuid,
            h.partuuid
        )));
    }
    let chosen = Chosen {
        name: h.slot,
        slot,
        reason: if h.trial {
            Reason::Trial {
                tries_left: h.tries_left,
            }
        } else {
            Reason::Successful
        },
        fell_back_from: h.fell_back_from,
    };
    let mounted = match root {
        RootMount::Mount => mount_slot(cfg, paths, &found, &chosen.slot),
        RootMount::AlreadyMounted => check_root_is(cfg, paths, &found, &chosen.slot),
    };
    let attempt = mounted
        .and_then(|()| finish_slot(cfg, paths, &found, &chosen))
        .and_then(|()| finish(cfg, paths, Finish::SwitchRoot));
    attempt.map_err(|e| {
        say!("slot {} cannot boot: {e}", h.slot);
        match root {
            RootMount::Mount => unmount_all(paths),
            // The root is the distribution initramfs's mount: only undo what we added.
            RootMount::AlreadyMounted => {
                for d in [
                    paths.newroot.join("etc"),
                    paths.newroot.join("var"),
                    paths.run.join(bootsel::etcmerge::IMAGE_ETC),
                ] {
                    mount::detach(&d);
                }
                mount::detach(&paths.state());
            }
        }
        mark_failed(&mut found, h.slot);
        Stage2Failure::SlotMarkedFailed(e)
    })
}

/// The mounted root must be the chosen slot's partition, not whatever the distribution
/// initramfs found (a `root=` typo, another disk with the same labels).
fn check_root_is(cfg: &Config, paths: &Paths, found: &disk::FoundDisk, slot: &Slot) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let wait = Duration::from_secs(u64::from(cfg.wait_seconds));
    let node = disk::partition_node(&found.path, slot.partition, wait)?;
    let want = fs::metadata(&node)
        .map_err(|e| format!("cannot stat {}: {e}", node.display()))?
        .rdev();
    let have = fs::metadata(&paths.newroot)
        .map_err(|e| format!("cannot stat {}: {e}", paths.newroot.display()))?
        .dev();
    if want != have {
        return Err(format!(
            "{} is not slot {}'s partition {} (the initramfs mounted another root)",
            paths.newroot.display(),
            slot.name,
            node.display()
        ));
    }
    Ok(())
}

/// `bootsel attach --root DIR`: the second stage inside a distribution's initramfs
/// (initramfs-tools' local-bottom hook, dracut's pre-pivot): the initramfs mounted the
/// slot named by the hand-over at DIR; this checks it is that slot and adds the state
/// partition, the /etc overlay, the binds and the boot record (under `run`). A slot that
/// fails here is marked failed and the host reboots into the first stage, which then
/// boots the other slot. Without a hand-over on the command line it does nothing.
pub fn attach_cli(config_path: Option<&Path>, root: &Path, run: &Path, cmdline: Option<&str>) -> Result<(), Failure> {
    let cfg = match config_path {
        Some(p) => {
            let text = fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            Config::parse(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => Config::default(),
    };
    let proc_cmdline;
    let cmdline = match cmdline {
        Some(c) => c,
        None => {
            proc_cmdline =
                fs::read_to_string("/proc/cmdline").map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
            &proc_cmdline
        }
    };
    let mut cfg = cfg;
    for w in cfg.apply_cmdline(cmdline) {
        say!("warning: {w}");
    }
    let Some(handover) = Handover::parse(cmdline) else {
        say!("no Atom hand-over on the command line (atom.handover=): nothing to attach");
        return Ok(());
    };
    let paths = Paths {
        newroot: root.to_path_buf(),
        run: run.to_path_buf(),
    };
    let mut done = |_: &Config, _: &Paths, _: Finish| Ok(());
    match second_stage_in(&cfg, &paths, handover, RootMount::AlreadyMounted, &mut done) {
        Ok(()) => Ok(()),
        Err(Stage2Failure::Other(e)) => Err(Failure::Error(e)),
        Err(Stage2Failure::SlotMarkedFailed(e)) if std::env::var_os("BOOTSEL_NO_REBOOT").is_some() => {
            Err(Failure::Error(format!("{e}; the slot was marked failed")))
        }
        Err(Stage2Failure::SlotMarkedFailed(e)) => reboot_to_first_stage(&e, &cfg).map_err(Failure::Error),
    }
}

/// The second stage failed and marked its slot: reboot, so the first stage (which reads
/// the marked table) boots the other slot. Never returns.
fn reboot_to_first_stage(why: &str, cfg: &Config) -> Result<(), String> {
    eprintln!("\n*** bootsel: THIS SLOT CANNOT BOOT ***\n{why}\n");
    say!(
        "rebooting in {} s; the first stage will boot the other slot if it can",
        cfg.fallback_delay_seconds
    );
    std::thread::sleep(Duration::from_secs(u64::from(cfg.fallback_delay_seconds)));
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT).unwrap_err();
    Err(format!("reboot failed: {e}"))
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
    // nosuid,nodev: the upper layer lives on the state partition, where nothing may plant
    // a setuid binary or a device node that the overlay would then honour.
    // redirect_dir and metacopy off: the /etc merge copies layers file by file and needs
    // every upper entry complete in itself (kernels before 4.19 lack the options).
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount::mount_fs(
        "overlay",
        target,
        "overlay",
        flags,
        Some(&format!("{data},redirect_dir=off,metacopy=off")),
    )
    .or_else(|_| mount::mount_fs("overlay", target, "overlay", flags, Some(&data)))
}

/// /etc as an overlay: the slot's /etc below, a writable upper on state (the slot's own
/// layer, merged at the first boot of a new image: see `etc`), or in RAM.
fn setup_etc(
    cfg: &Config,
    paths: &Paths,
    state_ok: bool,
    found: &disk::FoundDisk,
    slot: SlotName,
) -> Result<(), String> {
    let etc = paths.newroot.join("etc");
    match cfg.etc {
        EtcMode::None => Ok(()),
        EtcMode::Overlay if state_ok => {
            let wait = Duration::from_secs(u64::from(cfg.wait_seconds));
            let layers = etc::slot_nodes(found, slot, wait).and_then(|(mine, other)| {
                let s = etc::SlotEtc {
                    paths,
                    slot,
                    mine,
                    other,
                };
                let dir = s.prepare()?;
                // The image's own /etc stays visible (read-only) for `atom-update etc diff`.
                let image_etc = paths.run.join(bootsel::etcmerge::IMAGE_ETC);
                if let Err(e) = fs::create_dir_all(&image_etc)
                    .map_err(|e| e.to_string())
                    .and_then(|()| mount::bind_readonly(&etc, &image_etc))
                {
                    say!("/etc: cannot show the image's /etc at {} ({e})", image_etc.display());
                }
                overlay(paths, &etc, Some(dir.clone()), "etc")?;
                s.record_last(&dir);
                Ok(())
            });
            layers.or_else(|e| {
                // A full or damaged state partition must not stop the boot: the same RAM
                // fallback as a state partition that does not mount.
                say!("state: /etc overlay on the state partition failed ({e}); /etc changes stay in RAM this boot");
                overlay(paths, &etc, None, "etc")
            })
        }
        EtcMode::Overlay | EtcMode::Tmpfs => overlay(paths, &etc, None, "etc"),
    }
}

/// Persistent directories bound from state. Without state they become overlays with the
/// upper layer in RAM: writable, with the slot's content, forgotten at reboot.
/// The first component of `rel` under `root` that is a symlink, if any.
fn symlink_in(root: &Path, rel: &str) -> Option<String> {
    let mut at = root.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty() && *p != ".") {
        at.push(part);
        if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Some(at.strip_prefix(root).unwrap_or(&at).display().to_string());
        }
    }
    None
}

fn setup_binds(cfg: &Config, paths: &Paths, state_ok: bool) -> Result<(), String> {
    for b in &cfg.binds {
        let rel = b.trim_start_matches('/');
        let target = paths.newroot.join(rel);
        // A mount follows symlinks: on a merged-/usr slot /sbin is usr/sbin, and /var/run
        // points into /run; a bind there would hide the OS or leave the slot.
        if let Some(link) = symlink_in(&paths.newroot, rel) {
            say!("warning: {b} is a symlink in the slot ({link}); not binding it");
            continue;
        }
        if !target.is_dir() {
            say!("warning: {b} does not exist in the slot; not binding it");
            continue;
        }
        let ram = || overlay(paths, &target, None, &rel.replace('/', "-"));
        if !state_ok {
            ram()?;
            continue;
        }
        match bind_from_state(paths, b, rel, &target) {
            Ok(()) => {}
            Err(e) => {
                say!("state: {b} from the state partition failed ({e}); its changes stay in RAM this boot");
                ram()?;
            }
        }
    }
    Ok(())
}

/// Binds `rel` from the state partition on `target`, seeding it first. A symlink on the
/// state partition where the directory should be is refused: following it would bind
/// whatever it points to (anywhere in the initramfs or the slot) into the system.
fn bind_from_state(paths: &Paths, b: &str, rel: &str, target: &Path) -> Result<(), String> {
    let source = paths.state().join(rel);
    let mut at = paths.state();
    for component in Path::new(rel).components() {
        at.push(component);
        if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!("{} on the state partition is a symlink", at.display()));
        }
    }
    if !source.is_dir() {
        // First boot with this state: start from what the image ships, so the system
        // finds the directories it expects.
        seed::seed_dir(target, &source)?;
        say!("seeded {b} on the state partition from the slot");
    }
    mount::bind_restricted(&source, target)
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

/// Runs `shell` on the console until it exits or `limit` passes (then it is killed).
fn run_bounded(shell: &Path, limit: Duration) {
    let mut child = match std::process::Command::new(shell).spawn() {
        Ok(c) => c,
        Err(e) => {
            say!("cannot start {}: {e}", shell.display());
            return;
        }
    };
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if std::time::Instant::now() >= deadline => {
                say!("emergency shell timed out after {} s; rebooting", limit.as_secs());
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Nothing can boot: say why, offer the shell, else reboot after a delay. Never returns.
fn emergency(why: &str, cfg: &Config) -> ! {
    eprintln!("\n*** bootsel: CANNOT BOOT ***\n{why}\n");
    let shell = Path::new(&cfg.emergency_shell);
    if !cfg.emergency_shell.is_empty() && shell.exists() {
        // The shell is root without a password on the console: only built in when the
        // initramfs was made with one (`atom-build initramfs --shell`), and never left
        // open forever on an unattended host.
        say!(
            "starting emergency shell {}; exit it to reboot (the host reboots by itself after {} s)",
            shell.display(),
            cfg.emergency_shell_timeout_seconds
        );
        run_bounded(
            shell,
            Duration::from_secs(u64::from(cfg.emergency_shell_timeout_seconds)),
        );
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

#[cfg(test)]
mod tests {
    use super::symlink_in;

    #[test]
    fn binds_through_symlinks_are_found() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("usr/sbin")).unwrap();
        std::fs::create_dir_all(d.path().join("var/lib")).unwrap();
        std::os::unix::fs::symlink("usr/sbin", d.path().join("sbin")).unwrap();
        std::os::unix::fs::symlink("/run", d.path().join("var/run")).unwrap();
        assert_eq!(symlink_in(d.path(), "sbin").as_deref(), Some("sbin"));
        assert_eq!(symlink_in(d.path(), "var/run/x").as_deref(), Some("var/run"));
        assert_eq!(symlink_in(d.path(), "var/lib"), None);
        assert_eq!(symlink_in(d.path(), "var"), None);
    }
}

//! The command line when bootsel is not PID 1.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::process::ExitCode;

use bootsel::select::{Reason, why_not_bootable};
use bootsel::{BootTable, SlotFlags, SlotLabels, SlotName};

use crate::init;

const HELP: &str = "\
bootsel: the Atom boot slot chooser

Reads the ChromeOS-style GPT attributes (priority, tries, successful) of the partitions
labelled root-a and root-b and decides which slot boots. Run as PID 1 in the initramfs it
also mounts the chosen slot and switches to it (see `bootsel init`).

USAGE:
    bootsel status --disk DEV [--json] [--record FILE]
                                           show both slots and which boots next; the
                                           booted slot's kernel from the boot record
                                           (default /run/atom/boot.toml)
    bootsel choose --disk DEV [--dry-run]  apply the selection rule as a boot would
                                           (spends a try on a slot on trial)
    bootsel set --disk DEV --slot A|B [--priority N] [--tries N] [--successful 0|1]
    bootsel init [--config FILE]           the initramfs /init (runs automatically as PID 1)
    bootsel attach --root DIR [--config FILE] [--run DIR]
                                           the second stage in a distribution initramfs
                                           (initramfs-tools local-bottom): DIR is the
                                           slot it mounted; adds state, /etc overlay,
                                           binds and the boot record; a failure marks
                                           the slot failed and reboots
    bootsel prepare-root [--config FILE] [--root DIR] [--cmdline TEXT]
                                           init's steps up to switch_root or kexec,
                                           without them: choose, mount the slot and
                                           state (for tests); --cmdline stands in for
                                           /proc/cmdline (atom.handover=... makes it
                                           the second stage)

OPTIONS:
    --labels A,B   partition labels of the slots (default root-a,root-b)
    -h, --help     this text

EXIT STATUS:
    0 success, 1 error, 2 bad command line, 4 no bootable slot";

const EXIT_NO_BOOTABLE: u8 = 4;

#[derive(Default)]
struct Args {
    command: Option<String>,
    disk: Option<PathBuf>,
    labels: SlotLabels,
    json: bool,
    dry_run: bool,
    slot: Option<SlotName>,
    priority: Option<u8>,
    tries: Option<u8>,
    successful: Option<bool>,
    config: Option<PathBuf>,
    root: Option<PathBuf>,
    cmdline: Option<String>,
    run: Option<PathBuf>,
    record: Option<PathBuf>,
}

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Args, lexopt::Error> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let mut a = Args::default();
    while let Some(arg) = p.next()? {
        match arg {
            Short('h') | Long("help") => {
                println!("{HELP}");
                std::process::exit(0);
            }
            Long("disk") => a.disk = Some(p.value()?.into()),
            Long("json") => a.json = true,
            Long("dry-run") => a.dry_run = true,
            Long("labels") => {
                let v: String = p.value()?.parse()?;
                let (x, y) = v.split_once(',').ok_or("--labels takes A,B")?;
                a.labels = SlotLabels {
                    a: x.into(),
                    b: y.into(),
                };
            }
            Long("slot") => a.slot = Some(p.value()?.parse()?),
            Long("priority") => a.priority = Some(p.value()?.parse()?),
            Long("tries") => a.tries = Some(p.value()?.parse()?),
            Long("successful") => {
                let v: u8 = p.value()?.parse()?;
                a.successful = Some(match v {
                    0 => false,
                    1 => true,
                    _ => return Err("--successful takes 0 or 1".into()),
                });
            }
            Long("config") => a.config = Some(p.value()?.into()),
            Long("root") => a.root = Some(p.value()?.into()),
            Long("cmdline") => a.cmdline = Some(p.value()?.string()?),
            Long("run") => a.run = Some(p.value()?.into()),
            Long("record") => a.record = Some(p.value()?.into()),
            Value(v) if a.command.is_none() => a.command = Some(v.string()?),
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(a)
}

pub fn main() -> ExitCode {
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bootsel: {e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    let result = match args.command.as_deref() {
        Some("status") => status(&args),
        Some("choose") => choose(&args),
        Some("set") => set(&args),
        Some("init") => {
            init::run(args.config.as_deref());
        }
        Some("prepare-root") => init::prepare_root_cli(
            args.config.as_deref(),
            args.root.as_deref(),
            args.cmdline.as_deref().unwrap_or(""),
        ),
        Some("attach") => match &args.root {
            Some(root) => init::attach_cli(
                args.config.as_deref(),
                root,
                args.run.as_deref().unwrap_or(std::path::Path::new("/run")),
                args.cmdline.as_deref(),
            ),
            None => Err(Failure::Usage("attach needs --root DIR".into())),
        },
        Some(other) => Err(Failure::Usage(format!("unknown command {other:?}"))),
        None => Err(Failure::Usage("a command is required".into())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("bootsel: {m}\n\n{HELP}");
            ExitCode::from(2)
        }
        Err(Failure::NoBootable(m)) => {
            eprintln!("bootsel: {m}");
            ExitCode::from(EXIT_NO_BOOTABLE)
        }
        Err(Failure::Error(m)) => {
            eprintln!("bootsel: error: {m}");
            ExitCode::FAILURE
        }
    }
}

pub enum Failure {
    Usage(String),
    NoBootable(String),
    Error(String),
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Error(e.to_string())
    }
}

fn open_disk(args: &Args, write: bool) -> Result<(File, PathBuf), Failure> {
    let disk = args
        .disk
        .clone()
        .ok_or_else(|| Failure::Usage("--disk DEV is required".into()))?;
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .open(&disk)
        .map_err(|e| Failure::Error(format!("cannot open {}: {e}", disk.display())))?;
    Ok((f, disk))
}

fn load(args: &Args, write: bool) -> Result<(File, PathBuf, BootTable), Failure> {
    let (mut f, disk) = open_disk(args, write)?;
    let table =
        BootTable::load(&mut f, &args.labels).map_err(|e| Failure::Error(format!("{}: {e}", disk.display())))?;
    Ok((f, disk, table))
}

fn copy_state(s: &bootsel::table::CopyState) -> String {
    match s {
        bootsel::table::CopyState::Valid => "valid".into(),
        bootsel::table::CopyState::Stale => "stale (interrupted write; repaired on next write)".into(),
        bootsel::table::CopyState::Corrupt(e) => format!("corrupt ({e}; repaired on next write)"),
    }
}

/// The booted slot's partition UUID and kernel, when the boot record is about this disk.
/// Other slots' kernels are in their file systems, which status does not mount.
fn booted_kernel(args: &Args, table: &BootTable) -> Option<(String, Option<String>)> {
    let path = args
        .record
        .clone()
        .unwrap_or_else(|| PathBuf::from(bootsel::record::RECORD_PATH));
    let record = bootsel::record::BootRecord::load(&path).ok()?;
    table
        .slots()
        .iter()
        .find(|s| s.part_uuid.eq_ignore_ascii_case(&record.partuuid))
        .map(|s| (s.part_uuid.clone(), record.kernel))
}

fn status(args: &Args) -> Result<(), Failure> {
    let (_, disk, table) = load(args, false)?;
    let booted = booted_kernel(args, &table);
    let kernel_of = |s: &bootsel::table::Slot| match &booted {
        Some((uuid, kernel)) if *uuid == s.part_uuid => (true, kernel.clone()),
        _ => (false, None),
    };
    let next = table.decide();
    let (primary, backup) = table.copy_states();
    if args.json {
        let slots: Vec<_> = table
            .slots()
            .iter()
            .map(|s| {
                let (is_booted, kernel) = kernel_of(s);
                serde_json::json!({
                    "slot": s.name.as_str(), "label": s.label, "partition": s.partition,
                    "partuuid": s.part_uuid, "priority": s.flags.priority, "tries": s.flags.tries,
                    "successful": s.flags.successful, "bootable": s.flags.is_bootable(),
                    "booted": is_booted, "kernel": kernel,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "disk": disk, "gpt_primary": copy_state(primary), "gpt_backup": copy_state(backup),
            "slots": slots,
            "next_boot": next.as_ref().map(|(n, _)| n.as_str()),
            "next_boot_reason": next.as_ref().map(|(_, d)| d.reason.to_string()),
        });
        println!("{doc:#}");
        return Ok(());
    }
    println!("disk {} (sector size {})", disk.display(), table.sector_size());
    println!("GPT primary: {}; backup: {}", copy_state(primary), copy_state(backup));
    println!(
        "{:<5} {:<12} {:>4} {:>8} {:>5} {:>10}  {:<18} BOOTABLE",
        "SLOT", "LABEL", "PART", "PRIORITY", "TRIES", "SUCCESSFUL", "KERNEL"
    );
    for s in table.slots() {
        let kernel = match kernel_of(s) {
            (true, Some(k)) => format!("{k} (booted)"),
            (true, None) => "booted".into(),
            (false, _) => "-".into(),
        };
        println!(
            "{:<5} {:<12} {:>4} {:>8} {:>5} {:>10}  {:<18} {}",
            s.name.as_str(),
            s.label,
            s.partition,
            s.flags.priority,
            s.flags.tries,
            if s.flags.successful { "yes" } else { "no" },
            kernel,
            why_not_bootable(s.flags).map_or("yes".to_string(), |w| format!("no: {w}"))
        );
    }
    match next {
        Some((name, d)) => println!("next boot: {name} ({})", d.reason),
        None => println!("next boot: NONE: no slot is bootable"),
    }
    Ok(())
}

fn choose(args: &Args) -> Result<(), Failure> {
    let (mut f, _, mut table) = load(args, !args.dry_run)?;
    let Some((name, d)) = table.decide() else {
        return Err(Failure::NoBootable("no bootable slot".into()));
    };
    println!("boot {name} (partition {}): {}", table.slot(name).partition, d.reason);
    if let Some(from) = table.fallback_slot(&d) {
        println!("fell back from {from}: out of tries and never marked successful");
    }
    if args.dry_run {
        if let Reason::Trial { .. } = d.reason {
            println!("(dry run: the try was not spent)");
        }
        return Ok(());
    }
    table.set_flags(name, d.new_flags);
    table.commit(&mut f)?;
    Ok(())
}

fn set(args: &Args) -> Result<(), Failure> {
    let slot = args
        .slot
        .ok_or_else(|| Failure::Usage("--slot A|B is required".into()))?;
    let (mut f, _, mut table) = load(args, true)?;
    let old = table.slot(slot).flags;
    let new = SlotFlags::new(
        args.priority.unwrap_or(old.priority),
        args.tries.unwrap_or(old.tries),
        args.successful.unwrap_or(old.successful),
    )?;
    table.set_flags(slot, new);
    table.commit(&mut f)?;
    println!(
        "slot {slot}: priority {} tries {} successful {}",
        new.priority,
        new.tries,
        u8::from(new.successful)
    );
    Ok(())
}

//! `atom-update`: set up logging, parse arguments, run the verb, map the result to an exit
//! code.

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use atom_update::cli::{Cli, Command};
use atom_update::config::{RebootPolicy, Settings};
use atom_update::error::{EXIT_NO_UPDATE, Failure};
use atom_update::update::{self, Options, Outcome};
use atom_update::{daemon, reboot, verbs};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            tracing::error!(error = %f, "failed");
            eprintln!("atom-update: error: {f}");
            ExitCode::from(f.exit_code())
        }
    }
}

fn run(cli: &Cli) -> Result<u8, Failure> {
    match &cli.command {
        Command::Daemon => return daemon::run(&cli.config).map(|()| 0),
        // Health checks need no update configuration.
        Command::HealthCheck { timeout, dirs } => {
            let dirs: Vec<std::path::PathBuf> = if dirs.is_empty() {
                atom_update::health::DEFAULT_DIRS.iter().map(Into::into).collect()
            } else {
                dirs.clone()
            };
            return atom_update::health::run(&dirs, *timeout).map(|()| 0);
        }
        _ => {}
    }
    let mut s = Settings::load(&cli.config).map_err(Failure::error)?;
    if let Command::Now { repositories, .. } | Command::Check { repositories, .. } = &cli.command
        && !repositories.is_empty()
    {
        s.repositories = repositories.clone();
    }
    match &cli.command {
        Command::Now {
            allow_downgrade,
            no_reboot,
            skip_rollout,
            allow_rejected,
            force,
            ..
        } => {
            // SIGTERM/SIGINT stop the run cleanly: a write at the next chunk (the slot stays
            // unbootable), a download or a manifest fetch at the next read.
            let cancel = std::sync::Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, cancel.clone()).map_err(|e| Failure::error(e.to_string()))?;
            }
            let opts = Options {
                allow_downgrade: *allow_downgrade,
                allow_rejected: *allow_rejected,
                force: *force,
                skip_rollout: *skip_rollout,
                cancel: &cancel,
                progress: true,
            };
            let outcome = update::now(&s, &opts)?;
            match &outcome {
                Outcome::UpToDate { version } => println!("up to date: {version}"),
                Outcome::AlreadyStaged { version } => println!("{version} is already staged; reboot to use it"),
                Outcome::Rejected { version, why } => println!(
                    "not installing {version}: it was rejected on this host: {why} \
                     (--allow-rejected installs it anyway; `atom-update forget-rejected {version}` for good)"
                ),
                Outcome::Waiting { version, turn, end } => println!(
                    "{version} is being rolled out until {end}; this host's turn comes at {turn} \
                     (--skip-rollout takes it now)"
                ),
                Outcome::Staged {
                    version,
                    slot,
                    route,
                    stats,
                    downloaded,
                    read_locally,
                    uploaded,
                } => {
                    let mut moved = Vec::new();
                    if *downloaded > 0 || *read_locally == 0 {
                        moved.push(format!("downloaded {downloaded} bytes"));
                    }
                    if *read_locally > 0 {
                        moved.push(format!("read {read_locally} bytes from a local repository"));
                    }
                    if *uploaded > 0 {
                        moved.push(format!("uploaded {uploaded}"));
                    }
                    if stats.resumed > 0 {
                        moved.push(format!("{} bytes already done by an interrupted run", stats.resumed));
                    }
                    println!(
                        "staged {version} in slot {slot} via {}: {}, wrote {} bytes, reused {} bytes; reboot to use it",
                        route.name(),
                        moved.join(", "),
                        stats.written,
                        stats.skipped
                    );
                    if !no_reboot && s.reboot != RebootPolicy::Never {
                        reboot::when_allowed(&s, &|| cancel.load(std::sync::atomic::Ordering::Relaxed));
                    }
                }
            }
            Ok(0)
        }
        Command::Check { json, .. } => {
            let offer = update::check(&s)?;
            if *json {
                let routes: Vec<_> = offer
                    .routes
                    .iter()
                    .map(|(r, size)| serde_json::json!({"route": r.name(), "bytes": size}))
                    .collect();
                let rollout = offer.rollout.map(
                    |(end, turn)| serde_json::json!({"end": end.to_string(), "turn": turn.map(|t| t.to_string())}),
                );
                println!(
                    "{:#}",
                    serde_json::json!({"running": offer.running, "offered": offer.offered, "update_available": offer.newer, "rejected": offer.rejected, "routes": routes, "rollout": rollout})
                );
            } else if offer.newer {
                println!("update available: {} -> {}", offer.running, offer.offered);
                if let Some((end, turn)) = offer.rollout {
                    match turn {
                        Some(t) => println!("  phased rollout until {end}; this host's turn: {t}"),
                        None => println!("  phased rollout until {end}; this host's turn is drawn at its first `now`"),
                    }
                }
                for (r, size) in &offer.routes {
                    match size {
                        Some(b) => println!("  {:<18} {b} bytes", r.name()),
                        None => println!("  {:<18} size known after the server computes it", r.name()),
                    }
                }
            } else if let Some(why) = &offer.rejected {
                println!(
                    "no update: channel offers {}, rejected on this host: {why} (now --allow-rejected, or forget-rejected)",
                    offer.offered
                );
            } else {
                println!("no update: running {}, channel offers {}", offer.running, offer.offered);
            }
            Ok(if offer.newer { 0 } else { EXIT_NO_UPDATE })
        }
        Command::Status { json } => verbs::status(&s, *json).map(|()| 0),
        Command::MarkGood => verbs::mark_good(&s).map(|()| 0),
        Command::MarkBad { force } => verbs::mark_bad(&s, *force).map(|()| 0),
        Command::Rollback => verbs::rollback(&s).map(|()| 0),
        Command::ForgetRejected { version } => verbs::forget_rejected(&s, version).map(|()| 0),
        Command::ForgetWatermark => verbs::forget_watermark(&s).map(|()| 0),
        Command::Etc(verb) => etc_verb(&s, verb),
        Command::Daemon | Command::HealthCheck { .. } => unreachable!("handled above"),
    }
}

fn init_logging(verbose: u8) {
    let default = ["info", "debug", "trace"][usize::from(verbose.min(2))];
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    // Under systemd, log straight to the journal with structured fields (ATOM_VERSION=,
    // ATOM_SLOT=, ATOM_ROUTE=, … usable with `journalctl -o json`); the prefix keeps them
    // apart from journald's own fields.
    if journald && let Ok(layer) = tracing_journald::layer() {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::registry()
            .with(filter)
            .with(
                layer
                    .with_syslog_identifier("atom-update".into())
                    .with_field_prefix(Some("ATOM".into())),
            )
            .init();
        return;
    }
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(!journald && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if journald {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
}

fn etc_verb(s: &atom_update::config::Settings, verb: &atom_update::cli::EtcVerb) -> Result<u8, Failure> {
    use atom_update::cli::EtcVerb;
    use atom_update::etc;
    let p = etc::EtcPaths::of(s)?;
    match verb {
        EtcVerb::Diff { json } => {
            let changes = etc::diff(&p)?;
            if *json {
                println!("{:#}", serde_json::json!({"slot": p.slot, "changes": changes}));
            } else if changes.is_empty() {
                println!("/etc is the image's (slot {})", p.slot);
            } else {
                for c in &changes {
                    println!("{:<9} /etc/{}", c.change, c.path);
                }
            }
        }
        EtcVerb::Conflicts { json } => {
            let (from, list) = etc::conflicts(&p);
            if *json {
                println!(
                    "{:#}",
                    serde_json::json!({"slot": p.slot, "merged_from": from, "conflicts": list})
                );
            } else if list.is_empty() {
                println!("no conflicts from the last /etc merge");
            } else {
                for c in &list {
                    println!(
                        "{} /etc/{}: {}{}",
                        if c.unresolved { "UNRESOLVED" } else { "resolved  " },
                        c.path,
                        c.what,
                        c.image_version
                            .as_ref()
                            .map(|v| format!("; the image's version: /etc/{v}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        EtcVerb::Resolve { paths } => {
            for path in paths {
                println!("{}", etc::resolve(&p, path)?);
            }
        }
        EtcVerb::Reset { json, paths } => {
            let mut done = Vec::new();
            for path in paths {
                let result = etc::reset(&p, path)?;
                if !*json {
                    println!("{result}");
                }
                done.push(result);
            }
            if *json {
                println!("{:#}", serde_json::json!({"slot": p.slot, "reset": done}));
            }
        }
    }
    Ok(0)
}

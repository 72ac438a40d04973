//! `atom-build`: keys, OS images and repositories.

use std::process::ExitCode;

use atom_build::cli::{Cli, Command};
use atom_build::{
    audit, build, disk, image, initramfs, install, installer, keygen, keyring, publish, refresh, resign, said_once,
    sign,
};
use clap::Parser;

const EXIT_PROBLEMS: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match &cli.command {
        Command::Build(a) => build::run(a),
        Command::Cache(a) => build::cache::run(a),
        Command::Keygen(a) => keygen::run(a),
        Command::Image(a) => image::run_image(a),
        Command::Publish(a) => publish::run(a),
        Command::Sign(a) => sign::run(a),
        Command::Resign(a) => resign::run(a),
        Command::Keys(a) => keyring::run(a),
        Command::Refresh(a) => refresh::run(a),
        Command::History(a) => audit::run_history(a),
        Command::InstallUnits(a) => install::run(a),
        Command::Initramfs(a) => image::source_date_epoch().and_then(|t| initramfs::run(a, t)),
        Command::Disk(a) => image::source_date_epoch().and_then(|t| disk::run(a, t)).map(drop),
        Command::Installer(a) => image::source_date_epoch().and_then(|t| installer::run(a, t)).map(drop),
        Command::Serve(a) => atom_build::service::run(a),
        Command::Token(a) => atom_build::service::tokens::run(a),
        Command::Worker(a) => atom_build::service::remote::run(a),
        Command::Verify(a) => match audit::run_verify(a) {
            Ok(0) => Ok(()),
            Ok(_) => return ExitCode::from(EXIT_PROBLEMS),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atom-build: error: {}", said_once(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colours only for a person: not in log files (the build service's build logs).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

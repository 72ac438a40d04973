//! `atom-install`: writes an Atom installer medium's disk image onto a disk, verified
//! against the publisher's signatures before the disk gets a partition table.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "atom-install",
    version = atom_update::trust::AGENT_VERSION,
    about = "Install an Atom disk image from an installer medium onto a disk",
    long_about = "Install an Atom disk image from an installer medium (made by `atom-build installer`) \
onto a disk. The medium's signed description and the release manifest are verified against the \
publisher's keys first; the target's partition table is cleared before anything is written, the \
image is hashed while it is written, and the partition table is written only when both digests \
match, so a failed or interrupted install leaves no bootable half-disk. The state partition then \
grows to fill the disk. As /init of the installer ISO it reads /etc/atom/install.toml and \
atom.install.* on the kernel command line, finds its medium by volume id, and reboots when done.",
    after_help = "Targets: /dev/NAME, serial:SERIAL, wwid:WWID, or `empty` (the only disk whose first MiB is all zeros).\n\
Exit status: 0 installed, 1 failed (the message says whether the target was left untouched or holds no bootable table), 2 usage."
)]
struct Cli {
    /// The medium's `atom` directory (install.toml, manifest, disk.img.zst).
    #[arg(long, value_name = "DIR")]
    medium: PathBuf,
    /// The publisher's public keys: DIR/*.pub, or DIR/root/*.pub for a repository with key roles.
    #[arg(long, value_name = "DIR", default_value = "/etc/atom/keys")]
    keys: PathBuf,
    /// The disk to erase and install onto; without it, the disks are listed and one is asked for.
    #[arg(long, value_name = "TARGET")]
    target: Option<String>,
    /// Keep the target's partitions with this GPT name (globs: * and ?), data and all. Repeatable.
    #[arg(long = "keep-partlabel", value_name = "GLOB")]
    keep_partlabel: Vec<String>,
    /// Ask on the console before erasing the target, even when it is given.
    #[arg(long)]
    confirm: bool,
    /// Only verify the medium's signatures and print what it holds.
    #[arg(long)]
    verify_only: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    if std::process::id() == 1 {
        atom_update::install::pid1::run();
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    if cli.verify_only {
        return match atom_update::install::read_medium(&cli.medium, &cli.keys) {
            Ok(v) => {
                let d = &v.description;
                println!(
                    "{} {} for {} (channel {}), signed by {}: disk {} bytes ({}), slot image {}",
                    cli.medium.display(),
                    d.version,
                    d.board,
                    d.channel,
                    v.signed_by,
                    d.disk.size,
                    d.disk.digest,
                    d.image.digest
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("atom-install: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let opts = atom_update::install::Options {
        medium: cli.medium,
        keys: cli.keys,
        target: cli.target,
        keep_partlabel: cli.keep_partlabel,
        medium_device: None,
        confirm: cli.confirm,
        wait: Duration::from_secs(10),
    };
    match atom_update::install::run(&opts) {
        Ok(done) => {
            for w in &done.warnings {
                eprintln!("atom-install: warning: {w}");
            }
            if cli.json {
                println!("{}", serde_json::to_string(&done).expect("serializes"));
            } else {
                println!("{}", done.summary());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("atom-install: {e:#}");
            ExitCode::FAILURE
        }
    }
}

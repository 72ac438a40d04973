//! `/etc/atom/update.toml`: parsed strictly (unknown keys are errors naming the file and
//! key), then checked into settings the rest of the agent can trust.
//!
//! ```toml
//! repositories = ["https://updates.example.com/atom", "file:///mnt/atom-repo"]  # tried in order
//! channel = "stable"
//! keys_dir = "/etc/atom/keys"          # trusted *.pub files (several for rotation)
//! board = "x86_64-generic"             # must match the manifest
//! tries = 3                            # boots a new slot gets to be marked good
//! reboot = "never"                     # never | immediate | window
//! maintenance_window = "02:00-04:00"   # with reboot = "window" (UTC)
//! disk = "/dev/vda"                    # default: from the boot record or the root mount
//! labels = ["root-a", "root-b"]
//! slot_devices = ["/dev/sda2", "/dev/sda3"]  # instead of disk + labels: the slot partitions
//! tls_ca = "/etc/atom/ca.pem"          # HTTPS: trust only these CAs (default: system store)
//! http_timeout_secs = 30
//! http_retries = 3
//! state_dir = "/var/lib/atom"          # downloads, checkpoints, last result
//! boot_record = "/run/atom/boot.toml"  # written by bootsel
//! release_file = "/usr/lib/atom/release"
//! etc_dir = "/etc"                     # the live /etc (`atom-update etc`)
//! check_interval = "6h"                # daemon mode; a random jitter of up to 10% is added
//! routes = ["precomputed", "rsync", "full"]  # allowed routes, tried in this order
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/etc/atom/update.toml";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RebootPolicy {
    Never,
    Immediate,
    Window,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    repositories: Vec<String>,
    channel: String,
    #[serde(default = "default_keys_dir")]
    keys_dir: PathBuf,
    board: String,
    #[serde(default = "default_tries")]
    tries: u8,
    #[serde(default = "default_reboot")]
    reboot: RebootPolicy,
    maintenance_window: Option<String>,
    disk: Option<PathBuf>,
    labels: Option<[String; 2]>,
    slot_devices: Option<[PathBuf; 2]>,
    tls_ca: Option<PathBuf>,
    #[serde(default = "default_timeout")]
    http_timeout_secs: u64,
    #[serde(default = "default_retries")]
    http_retries: u32,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_record")]
    boot_record: PathBuf,
    #[serde(default = "default_release")]
    release_file: PathBuf,
    #[serde(default = "default_etc_dir")]
    etc_dir: PathBuf,
    #[serde(default = "default_interval")]
    check_interval: String,
    #[serde(default = "default_routes")]
    routes: Vec<RouteName>,
}

/// The ways to bring the inactive slot to the target image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteName {
    /// A delta the publisher computed from the running version.
    Precomputed,
    /// A delta atom-dist computes from this host's signature.
    Rsync,
    /// The whole compressed image.
    Full,
}

fn default_routes() -> Vec<RouteName> {
    vec![RouteName::Precomputed, RouteName::Rsync, RouteName::Full]
}

fn default_keys_dir() -> PathBuf {
    "/etc/atom/keys".into()
}
fn default_tries() -> u8 {
    3
}
fn default_reboot() -> RebootPolicy {
    RebootPolicy::Never
}
fn default_timeout() -> u64 {
    30
}
fn default_retries() -> u32 {
    3
}
fn default_state_dir() -> PathBuf {
    "/var/lib/atom".into()
}
fn default_record() -> PathBuf {
    bootsel::record::RECORD_PATH.into()
}
fn default_release() -> PathBuf {
    "/usr/lib/atom/release".into()
}
fn default_etc_dir() -> PathBuf {
    "/etc".into()
}
fn default_interval() -> String {
    "6h".into()
}

/// A repository location: HTTP(S) base URL or a local directory (`file://` or a path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repo {
    Http(String),
    Dir(PathBuf),
}

impl std::fmt::Display for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Repo::Http(u) => f.write_str(u),
            Repo::Dir(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Minutes since midnight UTC, start and end; the window may wrap past midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start_min: u16,
    pub end_min: u16,
}

impl Window {
    pub fn contains(&self, minute_of_day: u16) -> bool {
        if self.start_min <= self.end_min {
            (self.start_min..self.end_min).contains(&minute_of_day)
        } else {
            minute_of_day >= self.start_min || minute_of_day < self.end_min
        }
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub path: PathBuf,
    pub repositories: Vec<Repo>,
    pub channel: String,
    pub keys_dir: PathBuf,
    pub board: String,
    pub tries: u8,
    pub reboot: RebootPolicy,
    pub window: Option<Window>,
    pub disk: Option<PathBuf>,
    pub labels: bootsel::SlotLabels,
    /// PEM bundle of the only CAs trusted for HTTPS repositories, instead of the system's.
    pub tls_ca: Option<PathBuf>,
    pub http_timeout: Duration,
    pub http_retries: u32,
    pub state_dir: PathBuf,
    pub boot_record: PathBuf,
    pub release_file: PathBuf,
    pub etc_dir: PathBuf,
    pub check_interval: Duration,
    pub routes: Vec<RouteName>,
}

fn parse_window(s: &str) -> Result<Window, String> {
    let parse_hm = |t: &str| -> Option<u16> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some(h * 60 + m)
    };
    let (a, b) = s.split_once('-').ok_or("expected HH:MM-HH:MM")?;
    match (parse_hm(a), parse_hm(b)) {
        (Some(start_min), Some(end_min)) if start_min != end_min => Ok(Window { start_min, end_min }),
        _ => Err(format!("{s:?} is not a window like 02:00-04:00")),
    }
}

pub fn parse_repo(s: &str) -> Result<Repo, String> {
    if s.starts_with("http://") || s.starts_with("https://") {
        Ok(Repo::Http(s.trim_end_matches('/').to_owned()))
    } else if let Some(p) = s.strip_prefix("file://") {
        Ok(Repo::Dir(PathBuf::from(p)))
    } else if s.starts_with('/') {
        Ok(Repo::Dir(PathBuf::from(s)))
    } else {
        Err(format!(
            "repository {s:?} must be an http(s):// or file:// URL or an absolute path"
        ))
    }
}

/// Slots given as partition devices: the disk and the labels they stand for, from sysfs
/// (slots are still told apart by their GPT names, which the device nodes give us).
fn slot_devices(devices: &[PathBuf; 2]) -> Result<(Option<PathBuf>, bootsel::SlotLabels), String> {
    let [a, b] = [&devices[0], &devices[1]]
        .map(|d| bootsel::sysfs::partition_of_device(d).map_err(|e| format!("`slot_devices`: {e}")));
    let (a, b) = (a?, b?);
    if a.disk != b.disk {
        return Err(format!(
            "`slot_devices`: the slots must be on one disk ({} is on {}, {} on {})",
            devices[0].display(),
            a.disk.display(),
            devices[1].display(),
            b.disk.display()
        ));
    }
    // The kernel's PARTNAME when it scanned the table itself; else the GPT (partitions
    // added with BLKPG, as partx does, carry no name in sysfs).
    let label = |p: &bootsel::sysfs::PartitionInfo, dev: &Path| {
        let name = match p.name.clone().filter(|n| !n.is_empty()) {
            Some(n) => Some(n),
            None => std::fs::File::open(&p.disk)
                .map_err(|e| format!("`slot_devices`: cannot read {}: {e}", p.disk.display()))
                .and_then(|mut f| {
                    bootsel::BootTable::partition_name(&mut f, p.number)
                        .map_err(|e| format!("`slot_devices`: {}: {e}", p.disk.display()))
                })?
                .filter(|n| !n.is_empty()),
        };
        name.ok_or_else(|| {
            format!(
                "`slot_devices`: {} has no GPT partition name; Atom tells the slots apart by name",
                dev.display()
            )
        })
    };
    let labels = bootsel::SlotLabels {
        a: label(&a, &devices[0])?,
        b: label(&b, &devices[1])?,
    };
    if labels.a == labels.b {
        return Err("`slot_devices`: both partitions have the same name".into());
    }
    Ok((Some(a.disk), labels))
}

impl Settings {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text, path).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, String> {
        let raw: Raw =
            toml::from_str(text).map_err(|e| e.to_string().split_whitespace().collect::<Vec<_>>().join(" "))?;
        if raw.repositories.is_empty() {
            return Err("`repositories` must name at least one repository".into());
        }
        let repositories = raw
            .repositories
            .iter()
            .map(|r| parse_repo(r))
            .collect::<Result<Vec<_>, _>>()?;
        atom_dist::manifest::check_name("channel", &raw.channel).map_err(|e| e.to_string())?;
        atom_dist::manifest::check_name("board", &raw.board).map_err(|e| e.to_string())?;
        if !(1..=15).contains(&raw.tries) {
            return Err(format!("`tries` must be 1-15, not {}", raw.tries));
        }
        let window = raw.maintenance_window.as_deref().map(parse_window).transpose()?;
        if raw.reboot == RebootPolicy::Window && window.is_none() {
            return Err("`reboot = \"window\"` needs `maintenance_window = \"HH:MM-HH:MM\"`".into());
        }
        let check_interval =
            humantime::parse_duration(&raw.check_interval).map_err(|e| format!("`check_interval`: {e}"))?;
        if check_interval < Duration::from_secs(60) {
            return Err("`check_interval` must be at least 1m".into());
        }
        if raw.routes.is_empty() {
            return Err("`routes` must allow at least one route".into());
        }
        let (disk, labels) = match (raw.slot_devices, raw.disk, raw.labels) {
            (Some(devices), None, None) => slot_devices(&devices)?,
            (Some(_), _, _) => return Err("`slot_devices` replaces `disk` and `labels`; give one or the other".into()),
            (None, disk, labels) => {
                let [a, b] = labels.unwrap_or_else(|| ["root-a".into(), "root-b".into()]);
                (disk, bootsel::SlotLabels { a, b })
            }
        };
        Ok(Settings {
            routes: raw.routes,
            path: path.to_owned(),
            repositories,
            channel: raw.channel,
            keys_dir: raw.keys_dir,
            board: raw.board,
            tries: raw.tries,
            reboot: raw.reboot,
            window,
            disk,
            labels,
            tls_ca: raw.tls_ca,
            http_timeout: Duration::from_secs(raw.http_timeout_secs.max(1)),
            http_retries: raw.http_retries,
            state_dir: raw.state_dir,
            boot_record: raw.boot_record,
            release_file: raw.release_file,
            etc_dir: raw.etc_dir,
            check_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "repositories = [\"http://127.0.0.1:8080/\", \"file:///mnt/repo\"]\nchannel = \"stable\"\nboard = \"x86_64-generic\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let s = Settings::parse(MINIMAL, Path::new("t.toml")).unwrap();
        assert_eq!(
            s.repositories,
            [
                Repo::Http("http://127.0.0.1:8080".into()),
                Repo::Dir("/mnt/repo".into())
            ]
        );
        assert_eq!(s.tries, 3);
        assert_eq!(s.reboot, RebootPolicy::Never);
        assert_eq!(s.check_interval, Duration::from_secs(6 * 3600));
    }

    #[test]
    fn errors_name_the_problem() {
        let p = Path::new("t.toml");
        assert!(
            Settings::parse(&format!("{MINIMAL}surprise = 1\n"), p)
                .unwrap_err()
                .contains("surprise")
        );
        assert!(
            Settings::parse(&format!("{MINIMAL}tries = 0\n"), p)
                .unwrap_err()
                .contains("tries")
        );
        assert!(
            Settings::parse(&format!("{MINIMAL}reboot = \"window\"\n"), p)
                .unwrap_err()
                .contains("maintenance_window")
        );
        assert!(Settings::parse(&format!("{MINIMAL}reboot = \"sometimes\"\n"), p).is_err());
        assert!(
            Settings::parse(&MINIMAL.replace("file:///mnt/repo", "ftp://x"), p)
                .unwrap_err()
                .contains("ftp")
        );
        assert!(Settings::parse(&MINIMAL.replace("stable", "../x"), p).is_err());
        assert!(Settings::parse("channel = \"s\"", p).is_err());
    }

    #[test]
    fn windows_wrap_midnight() {
        let w = parse_window("23:00-01:30").unwrap();
        assert!(w.contains(23 * 60 + 5) && w.contains(60) && !w.contains(2 * 60));
        let w = parse_window("02:00-04:00").unwrap();
        assert!(w.contains(180) && !w.contains(240));
        assert!(parse_window("25:00-01:00").is_err());
        assert!(parse_window("02:00").is_err());
    }
}

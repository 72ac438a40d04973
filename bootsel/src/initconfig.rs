//! `/etc/bootsel.toml` in the initramfs, overridden by `bootsel.*=` on the kernel command line.
//!
//! ```toml
//! disk = "/dev/vda"            # default: the disk whose GPT has both slot labels
//! labels = ["root-a", "root-b"]
//! root_fstype = "ext4"
//! state = "state"              # PARTLABEL of the state partition; "" for none
//! state_fstype = "ext4"
//! etc = "overlay"              # overlay (upper on state) | tmpfs (stateless) | none
//! binds = ["/var", "/home"]    # bound from the state partition
//! modules = ["/lib/modules/virtio_blk.ko"]  # loaded in order (dependencies first)
//! wait_seconds = 30            # for the disk to appear
//! init = "/sbin/init"
//! emergency_shell = "/bin/sh"  # offered when nothing can boot (only with --shell); an
//!                              # unauthenticated root shell on the console
//! emergency_shell_timeout_seconds = 300  # then the host reboots
//! reboot_delay_seconds = 30    # when there is no shell
//! fallback_delay_seconds = 5   # a failed second stage shows why, then reboots
//! ```
//!
//! Command line: `bootsel.disk=`, `bootsel.labels=A,B`, `bootsel.root_fstype=`,
//! `bootsel.state=`, `bootsel.etc=`, `bootsel.binds=/var,/home`, `bootsel.wait=`,
//! `bootsel.init=`, `bootsel.shell=`, `bootsel.shell_timeout=`.

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EtcMode {
    Overlay,
    Tmpfs,
    None,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub disk: Option<String>,
    pub labels: [String; 2],
    pub root_fstype: String,
    pub state: String,
    pub state_fstype: String,
    pub etc: EtcMode,
    pub binds: Vec<String>,
    pub modules: Vec<String>,
    pub wait_seconds: u32,
    pub init: String,
    pub emergency_shell: String,
    pub reboot_delay_seconds: u32,
    /// How long the emergency shell may stay open before the host reboots.
    pub emergency_shell_timeout_seconds: u32,
    /// How long a second stage whose slot failed shows why before it reboots.
    pub fallback_delay_seconds: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            disk: None,
            labels: ["root-a".into(), "root-b".into()],
            root_fstype: "ext4".into(),
            state: "state".into(),
            state_fstype: "ext4".into(),
            etc: EtcMode::Overlay,
            binds: vec!["/var".into()],
            modules: Vec::new(),
            wait_seconds: 30,
            init: "/sbin/init".into(),
            emergency_shell: "/bin/sh".into(),
            reboot_delay_seconds: 30,
            emergency_shell_timeout_seconds: 300,
            fallback_delay_seconds: 5,
        }
    }
}

const MAX_CONFIG_BYTES: usize = 64 * 1024;

impl Config {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(format!(
                "config is {} bytes; the limit is {MAX_CONFIG_BYTES}",
                text.len()
            ));
        }
        let c: Config =
            toml::from_str(text).map_err(|e| e.to_string().split_whitespace().collect::<Vec<_>>().join(" "))?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), String> {
        for p in self.binds.iter().chain([&self.init]) {
            if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
                return Err(format!("{p:?} must be an absolute path without '..'"));
            }
        }
        if self.labels[0].is_empty() || self.labels[1].is_empty() || self.labels[0] == self.labels[1] {
            return Err("labels must be two different, non-empty partition labels".into());
        }
        if self.labels.contains(&self.state) {
            return Err(format!(
                "state partition {:?} is a slot's label: the other slot would be mounted read-write as state",
                self.state
            ));
        }
        for b in &self.binds {
            check_bind(b)?;
        }
        Ok(())
    }

    /// Applies `bootsel.key=value` words from the kernel command line. Returns warnings for
    /// words it could not use (a typo must not stop the boot, but must be visible).
    pub fn apply_cmdline(&mut self, cmdline: &str) -> Vec<String> {
        let mut warnings = Vec::new();
        for word in cmdline.split_whitespace() {
            let Some(kv) = word.strip_prefix("bootsel.") else {
                continue;
            };
            let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
            let mut candidate = self.clone();
            let applied = match key {
                "disk" => {
                    candidate.disk = (!value.is_empty()).then(|| value.to_owned());
                    Ok(())
                }
                "labels" => match value.split_once(',') {
                    Some((a, b)) => {
                        candidate.labels = [a.into(), b.into()];
                        Ok(())
                    }
                    None => Err("takes A,B".to_string()),
                },
                "root_fstype" => {
                    candidate.root_fstype = value.into();
                    Ok(())
                }
                "state" => {
                    candidate.state = if value == "none" { String::new() } else { value.into() };
                    Ok(())
                }
                "etc" => match value {
                    "overlay" => Ok(EtcMode::Overlay),
                    "tmpfs" => Ok(EtcMode::Tmpfs),
                    "none" => Ok(EtcMode::None),
                    _ => Err("takes overlay, tmpfs or none".to_string()),
                }
                .map(|mode| candidate.etc = mode),
                "binds" => {
                    candidate.binds = value.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect();
                    Ok(())
                }
                "wait" => value
                    .parse()
                    .map(|v| candidate.wait_seconds = v)
                    .map_err(|_| "takes seconds".into()),
                "init" => {
                    candidate.init = value.into();
                    Ok(())
                }
                "shell" => {
                    candidate.emergency_shell = value.into();
                    Ok(())
                }
                "shell_timeout" => value
                    .parse()
                    .map(|v| candidate.emergency_shell_timeout_seconds = v)
                    .map_err(|_| "takes seconds".into()),
                _ => Err("unknown option".into()),
            };
            match applied.and_then(|()| candidate.validate()) {
                Ok(()) => *self = candidate,
                Err(e) => warnings.push(format!("ignoring kernel option {word:?}: {e}")),
            }
        }
        warnings
    }
}

/// Binds put state-partition directories over the read-only slot: never over the OS itself
/// (`/`, `/usr`), over `/etc` (the `etc` setting governs it) or the kernel's file systems.
fn check_bind(path: &str) -> Result<(), String> {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    let refused = match parts.first().copied() {
        None => true,
        Some("usr" | "etc" | "proc" | "sys" | "dev" | "run" | "boot") => true,
        Some(_) => false,
    };
    if refused {
        return Err(format!(
            "bind {path:?} would hide the slot's own files (/, /usr, /etc, /boot, /proc, /sys, /dev, /run are refused)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_file() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let c = Config::parse(
            "disk = \"/dev/vda\"\netc = \"tmpfs\"\nbinds = [\"/var\", \"/home\"]\nmodules = [\"/m/a.ko\"]\nwait_seconds = 5\n",
        )
        .unwrap();
        assert_eq!(c.disk.as_deref(), Some("/dev/vda"));
        assert_eq!(c.etc, EtcMode::Tmpfs);
        assert_eq!(c.binds, ["/var", "/home"]);
        assert_eq!(c.wait_seconds, 5);
    }

    #[test]
    fn errors_are_reported() {
        assert!(Config::parse("disk = ").is_err());
        assert!(Config::parse("surprise = 1").unwrap_err().contains("surprise"));
        assert!(Config::parse("etc = \"sometimes\"").is_err());
        assert!(Config::parse("binds = [\"var\"]").is_err());
        assert!(Config::parse("binds = [\"/var/../etc\"]").is_err());
        for bad in ["/", "//", "/./", "/usr", "/usr/local", "/etc", "/proc", "/run/x"] {
            let e = Config::parse(&format!("binds = [\"{bad}\"]")).unwrap_err();
            assert!(e.contains("would hide the slot's own files"), "{bad}: {e}");
        }
        assert!(Config::parse("binds = [\"/var\", \"/srv/data\", \"/home\"]").is_ok());
        let e = Config::parse("state = \"root-b\"").unwrap_err();
        assert!(e.contains("is a slot's label"), "{e}");
        assert!(Config::parse("labels = [\"x\", \"x\"]").is_err());
        assert!(Config::parse(&"#".repeat(70_000)).is_err());
    }

    #[test]
    fn cmdline_overrides_and_warns() {
        let mut c = Config::default();
        let w = c.apply_cmdline(
            "root=/dev/x quiet bootsel.disk=/dev/sdb bootsel.etc=tmpfs bootsel.state=none bootsel.binds=/var,/srv \
             bootsel.wait=7 bootsel.etc=maybe bootsel.bogus=1 bootsel.init=relative",
        );
        assert_eq!(c.disk.as_deref(), Some("/dev/sdb"));
        assert_eq!(c.etc, EtcMode::Tmpfs);
        assert_eq!(c.state, "");
        assert_eq!(c.binds, ["/var", "/srv"]);
        assert_eq!(c.wait_seconds, 7);
        assert_eq!(c.init, "/sbin/init", "invalid init path ignored");
        assert_eq!(w.len(), 3, "{w:?}");
        // A slot as state, or a bind over the OS, from the command line: ignored, said.
        let w = c.apply_cmdline("bootsel.state=root-b bootsel.binds=/var,/usr");
        assert_eq!(
            (c.state.as_str(), &c.binds[..]),
            ("", &["/var".to_string(), "/srv".to_string()][..])
        );
        assert!(w[0].contains("slot's label") && w[1].contains("would hide"), "{w:?}");
    }
}

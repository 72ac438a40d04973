//! The two-stage boot contract: what the first stage (bootsel on the ESP's initramfs)
//! finds in a slot, and what it tells the slot's own boot (second stage) on the kernel
//! command line after it chose the slot and `kexec`ed the slot's kernel.
//!
//! This is a stable contract: a first stage written once at install time must boot slots
//! built years later, so keys are only ever added, never renamed or given a new meaning.
//!
//! In the slot (paths relative to its root):
//!
//! | path | what |
//! |---|---|
//! | `boot/atom/vmlinuz` | the slot's kernel (bzImage), a regular file |
//! | `boot/atom/initrd.img` | the slot's initramfs (second stage), a regular file |
//! | `boot/atom/kernel-release` | `uname -r` of that kernel, one line |
//!
//! A slot without `boot/atom/vmlinuz` is booted by the first stage itself, with the
//! first stage's kernel (slots built before kernels moved into the slot).
//!
//! On the second stage's command line (the first stage's own words are kept, except the
//! ones below and `root=`, `initrd=` and `BOOT_IMAGE=`, which it replaces):
//!
//! | word | meaning |
//! |---|---|
//! | `atom.handover=1` | the contract version; a second stage refuses a newer one it does not know |
//! | `atom.slot=A` | the chosen slot (`A` or `B`); the second stage does not choose again |
//! | `atom.partuuid=UUID` | the chosen slot's partition UUID (lower case) |
//! | `atom.disk=GUID` | the GPT disk GUID of the boot disk |
//! | `atom.tries_left=N` | tries left after this boot (0 for a successful slot) |
//! | `atom.trial=0\|1` | whether the slot is on trial (not yet marked successful) |
//! | `atom.fell_back_from=A` | present when a preferred slot was out of tries |
//! | `root=PARTUUID=UUID ro` | for a distribution initramfs (initramfs-tools, dracut) |

use std::fmt::Write as _;

use crate::SlotName;

/// Where the slot keeps its boot files, relative to the slot's root.
pub const SLOT_KERNEL: &str = "boot/atom/vmlinuz";
pub const SLOT_INITRAMFS: &str = "boot/atom/initrd.img";
pub const SLOT_KERNEL_RELEASE: &str = "boot/atom/kernel-release";

/// The hand-over contract version this bootsel writes and reads.
pub const VERSION: u32 = 1;

/// Longest command line handed over. x86's boot protocol allows 2048 bytes by default;
/// a longer one would be cut by the kernel, silently losing words at the end.
pub const MAX_CMDLINE: usize = 2048;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    pub slot: SlotName,
    pub partuuid: String,
    pub disk_guid: String,
    pub trial: bool,
    pub tries_left: u8,
    pub fell_back_from: Option<SlotName>,
}

/// Words of the first stage's command line the hand-over replaces.
fn replaced(word: &str) -> bool {
    word.starts_with("atom.")
        || word.starts_with("root=")
        || word.starts_with("initrd=")
        || word.starts_with("BOOT_IMAGE=")
        || word == "ro"
        || word == "rw"
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

impl Handover {
    /// The second stage's command line: `first_stage`'s words less the replaced ones, then
    /// the hand-over. Errors when it would not fit the kernel's limit.
    pub fn cmdline(&self, first_stage: &str) -> Result<String, String> {
        let mut out: Vec<&str> = first_stage.split_whitespace().filter(|w| !replaced(w)).collect();
        let mut own = String::new();
        let _ = write!(
            own,
            "root=PARTUUID={p} ro atom.handover={VERSION} atom.slot={s} atom.partuuid={p} atom.disk={d} \
             atom.tries_left={t} atom.trial={trial}",
            p = self.partuuid,
            s = self.slot,
            d = self.disk_guid,
            t = self.tries_left,
            trial = u8::from(self.trial),
        );
        if let Some(from) = self.fell_back_from {
            let _ = write!(own, " atom.fell_back_from={from}");
        }
        out.push(&own);
        let line = out.join(" ");
        if line.len() >= MAX_CMDLINE {
            return Err(format!(
                "the hand-over command line is {} bytes; the kernel takes {}",
                line.len(),
                MAX_CMDLINE - 1
            ));
        }
        Ok(line)
    }

    /// The hand-over on a command line: `None` when there is none (this is the first
    /// stage), an error when it is there but unusable (the second stage must then not
    /// guess a slot: it says so and lets the first stage choose again).
    pub fn parse(cmdline: &str) -> Option<Result<Handover, String>> {
        let words: Vec<(&str, &str)> = cmdline
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("atom.")?.split_once('='))
            .collect();
        // The last word wins, as with every kernel option.
        let get = |key: &str| words.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let version = get("handover")?;
        Some(Self::parse_fields(version, get))
    }

    fn parse_fields<'a>(version: &str, get: impl Fn(&str) -> Option<&'a str>) -> Result<Handover, String> {
        match version.parse::<u32>() {
            Ok(v) if (1..=VERSION).contains(&v) => {}
            _ => {
                return Err(format!(
                    "atom.handover={version} is not a hand-over version this bootsel reads (1..={VERSION})"
                ));
            }
        }
        let need = |key: &str| get(key).ok_or_else(|| format!("the hand-over lacks atom.{key}="));
        let slot: SlotName = need("slot")?.parse().map_err(|e| format!("atom.slot: {e}"))?;
        let partuuid = need("partuuid")?.to_ascii_lowercase();
        if !is_uuid(&partuuid) {
            return Err(format!("atom.partuuid={partuuid} is not a UUID"));
        }
        let disk_guid = need("disk")?.to_ascii_lowercase();
        if !is_uuid(&disk_guid) {
            return Err(format!("atom.disk={disk_guid} is not a GUID"));
        }
        let tries = need("tries_left")?;
        let tries_left = tries
            .parse::<u8>()
            .ok()
            .filter(|t| *t <= 15)
            .ok_or_else(|| format!("atom.tries_left={tries} is not 0..15"))?;
        let trial = match need("trial")? {
            "1" => true,
            "0" => false,
            other => return Err(format!("atom.trial={other} is not 0 or 1")),
        };
        let fell_back_from = get("fell_back_from")
            .map(|v| v.parse::<SlotName>().map_err(|e| format!("atom.fell_back_from: {e}")))
            .transpose()?;
        Ok(Handover {
            slot,
            partuuid,
            disk_guid,
            trial,
            tries_left,
            fell_back_from,
        })
    }
}

/// Checks a slot's kernel before handing it to `kexec_file_load`, so a missing, truncated
/// or foreign file is named on the console (the kernel's own answer is a bare ENOEXEC).
/// `header` is the file's start (4 KiB is plenty), `len` its whole length.
pub fn check_kernel(image: &[u8], len: u64) -> Result<(), String> {
    // x86 boot protocol: "HdrS" at 0x202, setup sectors at 0x1f1, protocol version at 0x206.
    const MIN: usize = 0x250;
    if image.len() < MIN {
        return Err(format!("{len} bytes is too short for a kernel"));
    }
    if &image[0x202..0x206] != b"HdrS" {
        return Err("not a Linux kernel image (no x86 boot header)".into());
    }
    let protocol = u16::from_le_bytes([image[0x206], image[0x207]]);
    if protocol < 0x020c {
        return Err(format!(
            "boot protocol {}.{} is older than 2.12 (kexec_file_load needs a 64-bit bzImage)",
            protocol >> 8,
            protocol & 0xff
        ));
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    // syssize: the protected-mode part, in 16-byte paragraphs.
    let syssize = u32::from_le_bytes([image[0x1f4], image[0x1f5], image[0x1f6], image[0x1f7]]) as usize;
    let need = ((setup_sects + 1) * 512 + syssize * 16) as u64;
    if len < need {
        return Err(format!("truncated: {len} bytes, its header says {need}"));
    }
    Ok(())
}

/// Checks that an initramfs starts like one (a newc cpio or a compressed stream the
/// kernel unpacks); a file that does not unpack at all is caught here, before the kexec.
pub fn check_initramfs(image: &[u8]) -> Result<(), String> {
    const MAGICS: &[(&[u8], &str)] = &[
        (b"070701", "cpio"),
        (b"070702", "cpio"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
        (&[0x1f, 0x8b], "gzip"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz"),
        (&[0x02, 0x21, 0x4c, 0x18], "lz4"),
        (b"BZh", "bzip2"),
        (&[0x5d, 0, 0], "lzma"),
        (&[0x89, b'L', b'Z', b'O'], "lzo"),
    ];
    if image.len() < 512 {
        return Err(format!("{} bytes is too short for an initramfs", image.len()));
    }
    if MAGICS.iter().any(|(m, _)| image.starts_with(m)) {
        Ok(())
    } else {
        Err("not an initramfs (neither a cpio archive nor a compressed one)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "0fc63daf-8483-4772-8e79-3d69d8477de4";
    const D: &str = "11111111-2222-3333-4444-555555555555";

    fn sample() -> Handover {
        Handover {
            slot: SlotName::B,
            partuuid: P.into(),
            disk_guid: D.into(),
            trial: true,
            tries_left: 1,
            fell_back_from: Some(SlotName::A),
        }
    }

    #[test]
    fn round_trip_keeps_the_operators_words_and_replaces_root() {
        let h = sample();
        let line = h
            .cmdline("BOOT_IMAGE=/vmlinuz root=/dev/sda2 rw console=ttyS0 bootsel.wait=5 atom.slot=A panic=1")
            .unwrap();
        assert!(
            line.starts_with("console=ttyS0 bootsel.wait=5 panic=1 root=PARTUUID="),
            "{line}"
        );
        assert!(
            !line.contains("/dev/sda2") && !line.contains(" rw") && !line.contains("BOOT_IMAGE"),
            "{line}"
        );
        assert_eq!(line.matches("atom.slot=").count(), 1, "{line}");
        assert_eq!(Handover::parse(&line), Some(Ok(h.clone())));
        let good = Handover {
            trial: false,
            tries_left: 0,
            fell_back_from: None,
            ..h
        };
        assert_eq!(Handover::parse(&good.cmdline("").unwrap()), Some(Ok(good)));
    }

    #[test]
    fn no_handover_is_the_first_stage() {
        assert_eq!(Handover::parse("root=/dev/sda ro atom.slot=A"), None);
    }

    #[test]
    fn bad_handovers_are_errors_not_guesses() {
        let base = sample().cmdline("").unwrap();
        for (from, to) in [
            ("atom.handover=1", "atom.handover=9"),
            ("atom.slot=B", "atom.slot=C"),
            ("atom.tries_left=1", "atom.tries_left=99"),
            ("atom.trial=1", "atom.trial=yes"),
            (&format!("atom.partuuid={P}"), "atom.partuuid=../../x"),
            (&format!("atom.disk={D}"), ""),
        ] {
            let line = base.replace(from, to);
            assert!(matches!(Handover::parse(&line), Some(Err(_))), "{line}");
        }
        let long = "x".repeat(MAX_CMDLINE);
        assert!(sample().cmdline(&long).is_err());
    }

    #[test]
    fn kernel_and_initramfs_checks() {
        assert!(check_kernel(b"short", 5).unwrap_err().contains("too short"));
        assert!(
            check_kernel(&[0u8; 4096], 4096)
                .unwrap_err()
                .contains("not a Linux kernel")
        );
        let mut k = vec![0u8; 8192];
        k[0x1f1] = 1;
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        k[0x1f4..0x1f8].copy_from_slice(&100u32.to_le_bytes());
        assert!(check_kernel(&k, 8192).is_ok());
        k[0x1f4..0x1f8].copy_from_slice(&10_000u32.to_le_bytes());
        assert!(check_kernel(&k, 8192).unwrap_err().contains("truncated"));
        assert!(check_initramfs(&[0u8; 1024]).is_err());
        let mut z = vec![0u8; 1024];
        z[..4].copy_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
        assert!(check_initramfs(&z).is_ok());
        assert!(check_initramfs(&z[..100]).is_err());
    }
}

//! `atom-build disk`: a whole bootable disk for a new host (or a VM): GPT with an EFI
//! system partition (the first stage's kernel and initramfs, and the boot loaders of
//! [`esp`]), `root-a` holding the given image and marked as the good slot, an empty
//! unbootable `root-b`, and an empty ext4 `state` partition; then the formats of
//! [`formats`].
//!
//! Reproducible like the images: identifiers are derived from the slot image's identity,
//! the FAT is stamped with SOURCE_DATE_EPOCH, and the state filesystem uses the pinned
//! mke2fs config.

pub(crate) mod esp;
mod formats;

pub use formats::{Record, add_to_sums, record_path};

use std::fs::{self, File};
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result, ensure};
use atom_dist::release::{RELEASE_PATH, Release};
use bootsel::attrs::SlotFlags;
use gptman::{GPT, GPTPartitionEntry};

use crate::cli::DiskArgs;
use crate::ext4;

const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;
/// Discoverable Partitions Specification types.
const TYPE_ESP: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
const TYPE_ROOT_X86_64: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
const TYPE_LINUX_DATA: &str = "0fc63daf-8483-4772-8e79-3d69d8477de4";
/// UEFI spec attribute bit 2: the partition syslinux's gptmbr.bin boots from.
const LEGACY_BIOS_BOOTABLE: u64 = 1 << 2;

struct Part {
    label: &'static str,
    kind: &'static str,
    size: u64,
    attributes: u64,
}

/// Builds the disk and its formats; returns every file written.
pub fn run(args: &DiskArgs, epoch: i64) -> Result<Vec<std::path::PathBuf>> {
    ensure!(
        !args.formats.is_empty(),
        "no disk format given (--format, or outputs.disk.formats in a recipe)"
    );
    let image_len = fs::metadata(&args.image)
        .with_context(|| format!("cannot read {}", args.image.display()))?
        .len();
    let release = Release::parse(
        &ext4::read_file(&args.image, RELEASE_PATH)
            .with_context(|| format!("{} is not an Atom slot image (no {RELEASE_PATH})", args.image.display()))?,
    )?;
    let slot_size = args.slot_size.unwrap_or(image_len).div_ceil(MIB) * MIB;
    ensure!(
        slot_size >= image_len,
        "--slot-size {slot_size} is smaller than the image ({image_len} bytes)"
    );
    ensure!(
        args.esp_size >= 16 * MIB && args.esp_size.is_multiple_of(MIB),
        "--esp-size must be a multiple of 1M, at least 16M"
    );
    ensure!(
        args.state_size >= 16 * MIB && args.state_size.is_multiple_of(MIB),
        "--state-size must be a multiple of 1M, at least 16M"
    );

    let good = SlotFlags::new(1, 0, true).expect("in range").apply_to(0);
    let parts = [
        Part {
            label: "esp",
            kind: TYPE_ESP,
            size: args.esp_size,
            attributes: if args.firmware.bios() { LEGACY_BIOS_BOOTABLE } else { 0 },
        },
        Part {
            label: "root-a",
            kind: TYPE_ROOT_X86_64,
            size: slot_size,
            attributes: good,
        },
        Part {
            label: "root-b",
            kind: TYPE_ROOT_X86_64,
            size: slot_size,
            attributes: 0,
        },
        Part {
            label: "state",
            kind: TYPE_LINUX_DATA,
            size: args.state_size,
            attributes: 0,
        },
    ];
    // 1 MiB in front (GPT, alignment) and 1 MiB behind (backup GPT).
    let total = MIB + parts.iter().map(|p| p.size).sum::<u64>() + MIB;
    let seed = format!("{}\0{}", release.version, release.board);

    let scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
    let esp = esp::filesystem(args, &seed, scratch.path(), epoch)?;
    let state = scratch.path().join("state.img");
    make_state(&state, args.state_size, &release, scratch.path(), epoch)?;

    let dir = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write into {}", dir.display()))?;
    let mut disk = tmp.as_file().try_clone().context("cannot reopen the new disk image")?;
    disk.set_len(total).context("cannot size the disk image")?;

    let mut gpt = GPT::new_from(&mut disk, SECTOR, guid(&format!("disk\0{seed}"))).context("cannot create the GPT")?;
    let mut start = MIB / SECTOR;
    let mut offsets = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let sectors = p.size / SECTOR;
        gpt[i as u32 + 1] = GPTPartitionEntry {
            partition_type_guid: type_guid(p.kind),
            unique_partition_guid: guid(&format!("{}\0{seed}", p.label)),
            starting_lba: start,
            ending_lba: start + sectors - 1,
            attribute_bits: p.attributes,
            partition_name: p.label.into(),
        };
        offsets.push(start * SECTOR);
        start += sectors;
    }
    gpt.write_into(&mut disk).context("cannot write the GPT")?;
    // The UEFI spec wants the protective entry's boot indicator clear, and UEFI firmware
    // may treat an active 0xEE entry as a legacy MBR disk; some old BIOSes boot only a disk
    // with an active entry. So: active only on a BIOS-only disk.
    if args.firmware == crate::cli::Firmware::Bios {
        GPT::write_bootable_protective_mbr_into(&mut disk, SECTOR)
    } else {
        GPT::write_protective_mbr_into(&mut disk, SECTOR)
    }
    .context("cannot write the protective MBR")?;
    if args.firmware.bios() {
        esp::write_mbr_boot_code(&mut disk, &args.syslinux_dir)?;
    }

    write_at(&mut disk, offsets[0], &mut Cursor::new(esp)).context("cannot write the EFI system partition")?;
    let mut image = File::open(&args.image).with_context(|| format!("cannot read {}", args.image.display()))?;
    write_at(&mut disk, offsets[1], &mut image).context("cannot write root-a")?;
    let mut state = File::open(&state).context("cannot read the state filesystem")?;
    write_at(&mut disk, offsets[3], &mut state).context("cannot write the state partition")?;
    disk.sync_all().context("cannot flush the disk image")?;
    drop(disk);

    let layout = format!(
        "esp {} MiB ({}), root-a {} MiB = {} {} (priority 1, successful), root-b {} MiB (empty, priority 0), state {} MiB",
        args.esp_size / MIB,
        esp::loaders(args.firmware),
        slot_size / MIB,
        release.version,
        release.board,
        slot_size / MIB,
        args.state_size / MIB
    );
    let record = formats::Record {
        version: release.version.to_string(),
        board: release.board.clone(),
        image: atom_dist::digest::Digest::of_file(&args.image)
            .with_context(|| format!("cannot read {}", args.image.display()))?
            .0
            .to_string(),
        image_size: image_len,
        firmware: args.firmware,
        size: total,
        outputs: Vec::new(),
    };
    let written = formats::write(tmp, args, record)?;
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    println!("built {}: {total} bytes; {layout}", names.join(", "));
    Ok(written)
}

fn make_state(path: &Path, size: u64, release: &Release, scratch: &Path, epoch: i64) -> Result<()> {
    let conf = scratch.join("mke2fs.conf");
    fs::write(&conf, ext4::MKE2FS_CONF).context("cannot write the mke2fs config")?;
    File::create(path)
        .and_then(|f| f.set_len(size))
        .context("cannot create the state filesystem")?;
    let uuid = ext4::derived_uuid("state", &release.version, &release.board);
    crate::cmd::run(
        ext4::e2fs_tool("mkfs.ext4", &conf, epoch)
            .args(["-q", "-F", "-t", "ext4", "-L", "state", "-U"])
            .arg(&uuid)
            .arg("-E")
            .arg(format!(
                "hash_seed={},lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
                ext4::derived_uuid("state-hash", &release.version, &release.board)
            ))
            .arg(path),
    )
    .map(drop)
}

/// Copies `src` to `offset`, leaving all-zero stretches as holes (the image stays sparse).
fn write_at(disk: &mut File, offset: u64, src: &mut impl Read) -> Result<()> {
    let mut buf = vec![0u8; MIB as usize];
    let mut pos = offset;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match src.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            return Ok(());
        }
        if buf[..filled].iter().any(|&b| b != 0) {
            disk.seek(SeekFrom::Start(pos))?;
            disk.write_all(&buf[..filled])?;
        }
        pos += filled as u64;
    }
}

/// A GUID for `purpose`, stable across builds of the same image, in GPT byte order.
fn guid(purpose: &str) -> [u8; 16] {
    let h = blake3::hash(format!("atom-disk\0{purpose}").as_bytes());
    let bytes: [u8; 16] = h.as_bytes()[..16].try_into().expect("16 bytes");
    uuid::Builder::from_random_bytes(bytes).into_uuid().to_bytes_le()
}

fn type_guid(s: &str) -> [u8; 16] {
    uuid::Uuid::parse_str(s).expect("constant GUID").to_bytes_le()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_guids_use_the_gpt_byte_order() {
        let g = type_guid(TYPE_ESP);
        assert_eq!(&g[..4], &[0x28, 0x73, 0x2a, 0xc1]);
        assert_eq!(bootsel::table::guid_string(&g), TYPE_ESP);
        assert_ne!(guid("root-a\0x"), guid("root-b\0x"));
        assert_eq!(guid("root-a\0x"), guid("root-a\0x"));
    }
}

//! Starting the chosen slot's own kernel: the slot's kernel and initramfs are checked,
//! loaded with `kexec_file_load` (the running kernel verifies signatures where lockdown
//! asks for it) and executed with the hand-over command line.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bootsel::handover::{self, SLOT_INITRAMFS, SLOT_KERNEL, SLOT_KERNEL_RELEASE};

/// A slot's boot files, checked, opened and ready for `kexec_file_load`.
pub struct SlotKernel {
    pub kernel: File,
    pub initramfs: File,
    pub kernel_path: PathBuf,
    /// What the slot says its kernel is (`boot/atom/kernel-release`), for the console.
    pub release: String,
}

/// Whether the mounted slot carries its own kernel (slots built before kernels moved into
/// the slot do not, and boot with the first stage's kernel).
pub fn slot_has_kernel(slot_root: &Path) -> bool {
    std::fs::symlink_metadata(slot_root.join(SLOT_KERNEL)).is_ok()
}

fn open_regular(path: &Path, what: &str) -> Result<(File, u64), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("the slot's {what} {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("the slot's {what} {} is not a regular file", path.display()));
    }
    let f = File::open(path).map_err(|e| format!("cannot open the slot's {what} {}: {e}", path.display()))?;
    Ok((f, meta.len()))
}

/// Opens and checks the slot's kernel and initramfs (under `slot_root`).
pub fn open(slot_root: &Path) -> Result<SlotKernel, String> {
    let kernel_path = slot_root.join(SLOT_KERNEL);
    let (kernel, kernel_len) = open_regular(&kernel_path, "kernel")?;
    let mut header = vec![0u8; 4096.min(kernel_len as usize)];
    kernel
        .read_exact_at(&mut header, 0)
        .map_err(|e| format!("cannot read the slot's kernel: {e}"))?;
    handover::check_kernel(&header, kernel_len)
        .map_err(|e| format!("the slot's kernel {}: {e}", kernel_path.display()))?;
    let initramfs_path = slot_root.join(SLOT_INITRAMFS);
    let (mut initramfs, _) = open_regular(&initramfs_path, "initramfs")?;
    let mut head = Vec::with_capacity(512);
    (&mut initramfs)
        .take(512)
        .read_to_end(&mut head)
        .map_err(|e| format!("cannot read the slot's initramfs: {e}"))?;
    handover::check_initramfs(&head).map_err(|e| format!("the slot's initramfs {}: {e}", initramfs_path.display()))?;
    let release = std::fs::read(slot_root.join(SLOT_KERNEL_RELEASE))
        .ok()
        .and_then(|b| {
            let line = String::from_utf8_lossy(&b[..b.len().min(256)])
                .lines()
                .next()?
                .trim()
                .to_owned();
            line.chars().all(|c| c.is_ascii_graphic()).then_some(line)
        })
        .unwrap_or_else(|| "of unknown release".into());
    Ok(SlotKernel {
        kernel,
        initramfs,
        kernel_path,
        release,
    })
}

/// Loads the kernel for the next `reboot(RB_KEXEC)`. The files may be closed (and the slot
/// unmounted) afterwards: the kernel keeps its own copy.
pub fn load(k: &SlotKernel, cmdline: &str) -> Result<(), String> {
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    // SAFETY: the descriptors are open for the duration of the call and the command line
    // is a NUL-terminated buffer of the length given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            k.kernel.as_raw_fd(),
            k.initramfs.as_raw_fd(),
            line.len() as libc::c_ulong,
            line.as_ptr(),
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    let hint = match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EKEYREJECTED) | Some(libc::EBADMSG) => {
            " (under lockdown or Secure Boot the running kernel loads only kernels signed with a key it trusts)"
        }
        Some(libc::ENOEXEC) => " (the running kernel does not take it as a kernel)",
        Some(libc::ENOSYS) => " (the first-stage kernel was built without CONFIG_KEXEC_FILE)",
        _ => "",
    };
    Err(format!(
        "kexec_file_load of {} refused: {err}{hint}",
        k.kernel_path.display()
    ))
}

/// Starts the loaded kernel. Returns only on failure.
pub fn execute() -> String {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_KEXEC) {
        Err(e) => format!("reboot(RB_KEXEC) failed: {e}"),
    }
}

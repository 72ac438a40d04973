# Shared by the VM tests (tests/vm.sh: busybox sample OS, the demo; tests/vm-systemd.sh:
# a Debian systemd sample OS). Sourced, not run: sets up the kernel, the static binaries,
# the initramfs and a signing key in $work, and defines boot/expect/refute/publish/control.
# Expects: $work set by the caller (or a temporary directory is made).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo_root=$PWD
work=${work:-$(mktemp -d /tmp/atom-vm.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
boot_timeout=${ATOM_VM_TIMEOUT:-240}

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
ok() { printf '    \033[32mok\033[0m %s\n' "$*"; }
fail() {
  printf '\n\033[31mFAIL: %s\033[0m\n' "$*" >&2
  if [[ -n ${console:-} && -e $console ]]; then
    echo "--- last lines of $console ---" >&2
    tail -n 40 "$console" >&2
  fi
  exit 1
}

packages=(qemu-system-x86 ovmf systemd-boot-efi kmod e2fsprogs zstd busybox-static rsync util-linux mount dosfstools mtools mmdebstrap)
# shellcheck source=tests/packages.sh
source tests/packages.sh
ensure_packages "${packages[@]}"
[[ $(id -u) == 0 ]] || fail "run as root (image building mounts loop devices)"

step "the Debian kernel: linux-image-amd64, unpacked (no network needed at boot)"
kernel_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[[ -n $kernel_pkg ]] || fail "apt does not know linux-image-amd64"
kver=${kernel_pkg#linux-image-}
kroot=$work/kernel
if [[ ! -e $kroot/lib/modules/$kver/modules.dep ]]; then
  rm -rf "$kroot" && mkdir -p "$kroot"
  (cd "$work" && apt-get download -q "$kernel_pkg" 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
  deb=$(ls "$work"/"$kernel_pkg"_*.deb)
  dpkg -x "$deb" "$kroot"
  depmod -b "$kroot" "$kver"
fi
vmlinuz=$kroot/boot/vmlinuz-$kver
echo "    $kernel_pkg: $vmlinuz"

step "building atom-build, and static bootsel and atom-update"
cargo build --locked -q -p atom-build
build=$repo_root/target/debug/atom-build
bootsel_static=$(bash bootsel/build-static.sh)
update_static=$(bash bootsel/build-static.sh atom-update)
ls -l "$bootsel_static" "$update_static" | awk '{print "    " $5 " bytes  " $9}'

step "the initramfs: bootsel as /init, virtio and ext4/overlay modules from modules.dep"
cat > "$work/bootsel.toml" <<'EOF'
disk = "/dev/vda"
etc = "overlay"
binds = ["/var"]
wait_seconds = 20
EOF
"$build" initramfs --bootsel "$bootsel_static" --kernel-modules "$kroot/lib/modules/$kver" \
  --module virtio_pci --module virtio_blk --module crc32c_generic --module ext4 --module overlay \
  --config "$work/bootsel.toml" --shell /bin/busybox --out "$work/initrd.img"

step "a signing key"
rm -f "$work/signer.key" "$work/signer.pub"
"$build" keygen --out "$work/signer"

rm -rf "$work/exchange"
mkdir -p "$work/exchange"
publish() { # IMAGE
  "$build" publish --repo "$work/exchange/repo" --channel stable --key "$work/signer.key" --zstd-level 3 "$1" | sed 's/^/    /'
}
control() { # the shell script the guest runs after its health checks
  cat > "$work/exchange/control.sh"
}

# install_agent ROOT: the static agent, the units and presets (atom-build install-units),
# the signing key, and an update.toml reading the repository on the exchange disk.
install_agent() {
  local root=$1
  "$build" install-units --root "$root" --bin-dir "$(dirname "$update_static")" >/dev/null
  cp "$work/signer.pub" "$root/etc/atom/keys/"
  cat > "$root/etc/atom/update.toml" <<'EOF'
repositories = ["file:///mnt/exchange/repo"]
channel = "stable"
board = "x86_64-generic"
tries = 2
EOF
}

# TCG by default: KVM in nested sandboxes has failed here on OVMF (emulation failure).
vm_accel=${ATOM_VM_ACCEL:-tcg}
# Every boot is one qemu run: -no-reboot turns the guest's reboot into qemu's exit.
qemu_machine=(-nodefaults -machine "q35,accel=$vm_accel" -cpu max -m 512 -smp 2 -display none -no-reboot)
boot_n=0
# boot [uefi]: one boot of the VM; the console log ends up in $console.
boot() {
  boot_n=$((boot_n + 1))
  console=$work/console-$boot_n.log
  rm -f "$work/exchange.img"
  local mib=$(($(du -sm "$work/exchange" | cut -f1) * 13 / 10 + 32))
  truncate -s "${mib}M" "$work/exchange.img"
  mkfs.ext4 -q -F -L exchange -d "$work/exchange" "$work/exchange.img" "${mib}M"
  local firmware=(-kernel "$vmlinuz" -initrd "$work/initrd.img" -append "ro console=ttyS0 panic=1")
  local how="direct kernel boot"
  if [[ ${1:-} == uefi ]]; then
    firmware=(-bios /usr/share/ovmf/OVMF.fd)
    how="UEFI firmware (OVMF) -> systemd-boot from the ESP"
  fi
  echo "    boot $boot_n: $how, accel $vm_accel, console: $console"
  local started=$SECONDS
  timeout "$boot_timeout" qemu-system-x86_64 "${qemu_machine[@]}" -serial "file:$console" "${firmware[@]}" \
    -drive "file=$work/disk.img,format=raw,if=virtio,cache=unsafe" \
    -drive "file=$work/exchange.img,format=raw,if=virtio,readonly=on" ||
    fail "boot $boot_n did not end within ${boot_timeout}s (or qemu failed)"
  echo "    (took $((SECONDS - started)) s)"
  # Carriage returns and colour codes out, so patterns match what a reader sees.
  sed 's/\r//g; s/\x1b\[[0-9;]*[A-Za-z]//g' "$console" > "$console.txt" && mv "$console.txt" "$console"
  grep -E "^(bootsel|ATOM-SAMPLE|staged|up to date|booted:|last boot|SLOT|[AB] |UNITS|JOURNAL|PREVIOUS|Result=)|Kernel panic|health" "$console" | grep -v "^bootsel: loaded" | sed 's/^/    | /' || true
}
expect() { # PATTERN DESCRIPTION
  grep -qE -- "$1" "$console" || fail "$2: no line matching /$1/ on boot $boot_n's console"
  ok "$2"
}
refute() { # PATTERN DESCRIPTION
  if grep -qE -- "$1" "$console"; then fail "$2: unexpected /$1/ on boot $boot_n's console"; fi
  ok "$2"
}


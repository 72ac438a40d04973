# Shared by the VM tests (tests/vm.sh: busybox sample OS, the demo; tests/vm-systemd.sh:
# a Debian systemd sample OS). Sourced, not run: sets up the kernel, the static binaries,
# the initramfs and a signing key in $work, and defines boot/expect/refute/publish/control.
# Reads the caller's arguments: [--keep] [WORKDIR] (see tests/workdir.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo_root=$PWD
# shellcheck source=tests/workdir.sh
source tests/workdir.sh
work_prefix=vm work_args "$@"
boot_timeout=${ATOM_VM_TIMEOUT:-240}

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
ok() { printf '    \033[32mok\033[0m %s\n' "$*"; }
fail() {
  printf '\n\033[31mFAIL: %s\033[0m\n' "$*" >&2
  if [[ -n ${console:-} && -e $console ]]; then
    echo "--- last lines of $console ---" >&2
    tail -n 40 "$console" >&2
    # Printed last, so that a short view of the output's end still shows why a boot died.
    echo "--- what the boot said of itself (bootsel, initramfs, panics) ---" >&2
    grep -aE 'bootsel:|run-init|Kernel panic|Attempted to kill|Gave up|ALERT|not syncing|initramfs|Begin:|Failed to|FAILED|ATOM-SAMPLE' "$console" | tail -n 30 >&2 || true
    printf '\033[31mFAIL: %s\033[0m\n' "$*" >&2
  fi
  exit 1
}

packages=(qemu-system-x86 ovmf systemd-boot-efi syslinux syslinux-common isolinux xorriso kmod e2fsprogs zstd busybox-static rsync util-linux mount dosfstools mtools mmdebstrap socat curl jq)
# shellcheck source=tests/packages.sh
source tests/packages.sh
ensure_packages "${packages[@]}"
[[ $(id -u) == 0 ]] || fail "run as root (image building mounts loop devices)"

step "two Debian kernels, unpacked: bookworm's (main suite) and the security suite's"
# linux-image-amd64 as the main suite has it, and as the security suite has it: two ABIs,
# so `uname -r` tells them apart. Prints the versioned package, e.g. linux-image-6.1.0-50-amd64.
kernel_package() { # main|security
  local version
  if [[ $1 == security ]]; then
    version=$(apt-cache madison linux-image-amd64 | awk -F'|' '$3 ~ /-security/ {gsub(/ /, "", $2); print $2; exit}')
  else
    version=$(apt-cache madison linux-image-amd64 | awk -F'|' '$3 !~ /-security|-updates|backports/ {gsub(/ /, "", $2); print $2; exit}')
  fi
  [[ -n $version ]] || return 1
  apt-cache show "linux-image-amd64=$version" | sed -n 's/^Depends: \(linux-image-[0-9][^ ,]*\).*/\1/p' | head -n 1
}
unpack_kernel() { # PACKAGE -> sets kdir and kver
  local pkg=$1
  kver=${pkg#linux-image-}
  kdir=$work/kernel-$kver
  if [[ ! -e $kdir/lib/modules/$kver/modules.dep ]]; then
    rm -rf "$kdir" && mkdir -p "$kdir"
    (cd "$work" && apt-get download -q "$pkg" 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
    dpkg -x "$(ls "$work"/"$pkg"_*.deb)" "$kdir"
    depmod -b "$kdir" "$kver"
  fi
}
old_pkg=$(kernel_package main) || fail "apt knows no linux-image-amd64 in the main suite"
new_pkg=$(kernel_package security) ||
  fail "apt knows no linux-image-amd64 in the security suite (add bookworm-security to the apt sources)"
[[ $old_pkg != "$new_pkg" ]] || fail "the main and security suites have the same kernel ($old_pkg)"
unpack_kernel "$old_pkg"
kver_old=$kver kdir_old=$kdir
unpack_kernel "$new_pkg"
kver_new=$kver kdir_new=$kdir
# The first stage (on the ESP, written once) runs the main suite's kernel.
kroot=$kdir_old
kver=$kver_old
vmlinuz=$kdir_old/boot/vmlinuz-$kver_old
echo "    first stage and 1.0.0: $old_pkg; later versions: $new_pkg"

# The modules every initramfs here loads: the virtio disk, ext4 (crc32c is a soft
# dependency modules.dep does not list) and overlay for /etc.
initramfs_modules=(virtio_pci virtio_blk crc32c_generic ext4 overlay)

step "building atom-build and atom-dist, and static bootsel and atom-update"
# The whole workspace, as tests/run-all.sh builds it: a subset of packages unifies other
# dependency features and would rebuild half the dependencies.
cargo build --locked --workspace
build=$repo_root/target/debug/atom-build
dist_bin=$repo_root/target/debug/atom-dist
bootsel_static=$(bash bootsel/build-static.sh)
update_static=$(bash bootsel/build-static.sh atom-update)
# The same package build made the installer.
install_static=$(dirname "$update_static")/atom-install
ls -l "$bootsel_static" "$update_static" | awk '{print "    " $5 " bytes  " $9}'

step "the first stage's initramfs (ESP): bootsel as /init, virtio and ext4/overlay modules"
cat > "$work/bootsel.toml" <<'EOF'
disk = "/dev/vda"
etc = "overlay"
binds = ["/var"]
wait_seconds = 20
EOF
mods=()
for m in "${initramfs_modules[@]}"; do mods+=(--module "$m"); done
"$build" initramfs --bootsel "$bootsel_static" --kernel-modules "$kroot/lib/modules/$kver" \
  "${mods[@]}" --config "$work/bootsel.toml" --shell /bin/busybox --out "$work/initrd.img"

step "a signing key"
rm -f "$work/signer.key" "$work/signer.pub"
"$build" keygen --out "$work/signer"

rm -rf "$work/exchange"
mkdir -p "$work/exchange"
publish() { # IMAGE
  "$build" publish --repo "$work/exchange/repo" --channel stable --key "$work/signer.key" --zstd-level 3 --payload-level 3 "$1" | sed 's/^/    /'
}
control() { # the shell script the guest runs after its health checks
  cat > "$work/exchange/control.sh"
}

# background PID: a process the script started, killed when the script exits.
background_pids=()
background() {
  background_pids+=("$1")
  # Their children too: `unshare --fork` ignores SIGTERM, its child does not.
  trap 'for p in "${background_pids[@]}"; do pkill -TERM -P "$p"; kill "$p"; done 2>/dev/null || true' EXIT
}

# atom-dist on the host's 127.0.0.1, serving the repository the VM tests publish into.
# Guests reach it as http://10.0.2.100 (qemu user networking, restricted: the guest can
# reach nothing else, and nothing leaves the machine).
dist_url=
start_dist() {
  [[ -z $dist_url ]] || return 0
  # Made here: the background child opens it only when it runs, maybe after the first
  # read below (under `set -e` a sed of a missing file ends the script).
  : > "$work/atom-dist.out"
  "$dist_bin" serve --repo "$work/exchange/repo" --listen 127.0.0.1:0 --cache "$work/dist-cache" \
    > "$work/atom-dist.out" 2> "$work/atom-dist.log" &
  dist_pid=$!
  background "$dist_pid"
  local _
  for _ in $(seq 100); do
    dist_url=$(sed -n 's/^atom-dist: listening on //p' "$work/atom-dist.out")
    [[ -n $dist_url ]] && break
    sleep 0.1
  done
  [[ -n $dist_url ]] || fail "atom-dist did not start: $(cat "$work/atom-dist.log")"
  echo "    atom-dist serving $work/exchange/repo on $dist_url (the guests' http://10.0.2.100)"
}
# dist_metric NAME_AND_LABELS: a counter of the running atom-dist (0 if absent).
dist_metric() {
  curl -fsS "$dist_url/metrics" | awk -v m="$1" '$1 == m {print $2; found=1} END {if (!found) print 0}'
}

# The guests' repository: atom-dist over HTTP (tests/vm.sh sets it), or the exchange disk;
# the recipes' atom.repositories.
agent_repo=${agent_repo:-file:///mnt/exchange/repo}

# TCG by default: KVM in nested sandboxes has failed here on OVMF (emulation failure).
vm_accel=${ATOM_VM_ACCEL:-tcg}
# Every boot is one qemu run: -no-reboot turns the guest's reboot into qemu's exit.
qemu_machine=(-nodefaults -machine "q35,accel=$vm_accel" -cpu max -m 512 -smp 2 -display none -no-reboot)
boot_n=0
# boot [uefi|bios]: one boot of the VM; the console log ends up in $console. uefi: OVMF
# starts systemd-boot from the ESP; bios: SeaBIOS (qemu's default firmware) starts
# gptmbr.bin and syslinux from the same ESP; neither: qemu loads the first stage itself.
boot() {
  boot_n=$((boot_n + 1))
  console=$work/console-$boot_n.log
  rm -f "$work/exchange.img"
  local mib=$(($(du -sm "$work/exchange" | cut -f1) * 13 / 10 + 32))
  truncate -s "${mib}M" "$work/exchange.img"
  mkfs.ext4 -q -F -L exchange -d "$work/exchange" "$work/exchange.img" "${mib}M"
  local firmware=(-kernel "$vmlinuz" -initrd "$work/initrd.img" -append "ro console=ttyS0 panic=1")
  local how="direct kernel boot"
  case ${1:-} in
    uefi)
      firmware=(-bios /usr/share/ovmf/OVMF.fd)
      how="UEFI firmware (OVMF) -> systemd-boot from the ESP"
      ;;
    bios)
      firmware=()
      how="legacy BIOS (SeaBIOS) -> gptmbr.bin -> syslinux from the ESP"
      ;;
  esac
  local net=()
  if [[ $agent_repo == http* ]]; then
    start_dist
    # Each guest connection to 10.0.2.100:80 becomes one socat to atom-dist on 127.0.0.1.
    net=(-netdev "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:80-cmd:socat - TCP:${dist_url#http://}"
      -device virtio-net-pci,netdev=net0)
  fi
  echo "    boot $boot_n: $how, accel $vm_accel, console: $console"
  local started=$SECONDS
  timeout "$boot_timeout" qemu-system-x86_64 "${qemu_machine[@]}" "${net[@]}" -serial "file:$console" ${firmware[@]+"${firmware[@]}"} \
    -drive "file=$work/disk.img,format=raw,if=virtio,cache=unsafe" \
    -drive "file=$work/exchange.img,format=raw,if=virtio,readonly=on" ||
    fail "boot $boot_n did not end within ${boot_timeout}s (or qemu failed)"
  echo "    (took $((SECONDS - started)) s)"
  clean_console
  grep -E "^(SYSLINUX [0-9.]+ 2|bootsel|ATOM-SAMPLE|staged|up to date|booted:|last boot|SLOT|[AB] |UNITS|JOURNAL|PREVIOUS|Result=|AGENT|NEXT-EXIT|ETC)|Kernel panic|health|update the agent" "$console" | grep -v "^bootsel: loaded" | sed 's/^/    | /' || true
}
# Carriage returns and colour codes out of $console, so patterns match what a reader sees.
clean_console() {
  sed 's/\r//g; s/\x1b\[[0-9;]*[A-Za-z]//g' "$console" > "$console.txt" && mv "$console.txt" "$console"
}
# boot_installer uefi|bios cdrom|stick ISO TARGET [SERIAL]: one boot of an installer ISO,
# as a CD (El Torito) or as a USB stick would be seen (the ISO as a disk: isohybrid MBR or
# GPT), with TARGET as an empty virtio disk (serial SERIAL). The medium boots first.
install_n=0
boot_installer() {
  install_n=$((install_n + 1))
  console=$work/console-install-$install_n.log
  local firmware=() how="legacy BIOS (SeaBIOS)"
  if [[ $1 == uefi ]]; then
    firmware=(-bios /usr/share/ovmf/OVMF.fd)
    how="UEFI (OVMF)"
  fi
  local medium=(-drive "file=$3,format=raw,if=none,id=medium,readonly=on")
  if [[ $2 == cdrom ]]; then
    medium+=(-device ide-cd,drive=medium,bootindex=0)
    how+=", the ISO as a CD"
  else
    medium+=(-device virtio-blk-pci,drive=medium,bootindex=0)
    how+=", the ISO as a USB stick (a disk)"
  fi
  echo "    install $install_n: $how, onto $4, console: $console"
  local started=$SECONDS
  timeout "$boot_timeout" qemu-system-x86_64 "${qemu_machine[@]}" -m 768 -serial "file:$console" ${firmware[@]+"${firmware[@]}"} \
    "${medium[@]}" -drive "file=$4,format=raw,if=none,id=target,cache=unsafe" \
    -device "virtio-blk-pci,drive=target,serial=${5:-atom-target},bootindex=1" ||
    fail "install $install_n did not end within ${boot_timeout}s (or qemu failed)"
  echo "    (took $((SECONDS - started)) s)"
  clean_console
  grep -E "^(ISOLINUX|atom-install)|Kernel panic" "$console" | sed 's/^/    | /' || true
}
# The last step of a passing run.
finish() {
  step "all steps passed"
  [[ -z ${dist_pid:-} ]] || kill "$dist_pid" 2>/dev/null || true
  work_done
}
expect() { # PATTERN DESCRIPTION
  grep -qE -- "$1" "$console" || fail "$2: no line matching /$1/ in $console"
  ok "$2"
}
refute() { # PATTERN DESCRIPTION
  if grep -qE -- "$1" "$console"; then fail "$2: unexpected /$1/ in $console"; fi
  ok "$2"
}


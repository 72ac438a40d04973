#!/usr/bin/env bash
# The Atom demo, and the end-to-end VM test (CI runs it; any misstep exits non-zero).
#
# Real Debian kernels boot a sample OS (busybox + atom-update + the Atom units) in qemu
# from a GPT disk made by `atom-build disk`: the first stage is the initramfs of
# `atom-build initramfs` (bootsel as /init), each slot's own initramfs is built by
# `atom-build image`. The guest updates from a real atom-dist on the host's 127.0.0.1
# (qemu user networking, restricted to that one forwarded address, http://10.0.2.100):
# the precomputed delta and the rsync endpoint; once from the repository on a second,
# read-only disk, as from a USB stick. Each boot is one qemu run with -no-reboot,
# so every reboot the guest asks for ends qemu and the next run is the next boot; what
# happened is read back from the serial console.
#
# The disk is hybrid (atom-build disk's default): boots 1-4 start under UEFI (OVMF ->
# systemd-boot), boots 5-9 under legacy BIOS (SeaBIOS -> gptmbr.bin -> syslinux), so each
# firmware sees an update and a rollback; both start the same first stage from the ESP.
#
#   install 1 (BIOS, the ISO of `atom-build installer` as a USB stick): 1.0.0's disk onto an
#           empty virtio disk, unattended (target "empty"), verified, state grown; reboot
#   install 2: the same ISO booted again with that disk in: it says it is installed and writes nothing
#   install 3 (BIOS, a CD): an ISO whose disk image was changed (padded to the signed size)
#           is refused; the target, a bootable Atom disk, is left with no partition table
#   install 4 (UEFI, a CD): 1.0.0's disk onto an empty virtio disk: the disk of boots 1-10
#
#   boot 1 (UEFI): 1.0.0 from A; atom-update now -> 2.0.0 into B
#           (atom-dist, precomputed delta)
#   boot 2: 2.0.0 from B on trial, health checks pass, marked good; update to 3.0.0
#           (atom-dist, the rsync endpoint)
#   boot 3: 3.0.0 from A; its health check fails -> mark-bad -> reboot
#   boot 4: back on 2.0.0 from B by itself; update to 4.0.0 (from the "USB stick"), whose
#           init crashes
#   boot 5, 6 (BIOS from here on): 4.0.0 from A panics; each boot spends one try
#   boot 7: A is out of tries: bootsel falls back to 2.0.0 on B; status shows it; update
#           to 5.0.0, whose initramfs lacks ext4
#   boot 8: 5.0.0's kernel starts but cannot mount its root: its second stage marks A
#           failed and reboots
#   boot 9: the first stage passes over A: 2.0.0 on B with its own kernel
#   boot 10: the disk never appears: bootsel explains and opens the emergency shell, which
#           runs a command typed on the serial console
#   boot 11 (BIOS): the disk of install 1 boots 1.0.0 and updates
#
# Every slot carries its own kernel and initramfs (/boot/atom): 1.0.0 has the main suite's
# Debian kernel, the later versions the security suite's. The ESP keeps a first stage
# (kernel + bootsel initramfs, written once) that chooses the slot, spends its try and
# starts the slot's kernel with kexec; the console shows `uname -r` on every boot.
#
# Usage (root, Debian): bash tests/vm.sh [--keep] [WORKDIR]
# A temporary work directory is removed after a passing run unless --keep is given; a
# WORKDIR given is kept (and reused: the downloaded kernels are not fetched again).
# ATOM_VM_TIMEOUT bounds each boot (seconds, default 240); ATOM_VM_ACCEL=kvm uses KVM
# (default tcg, software emulation). Packages it needs are installed.
set -euo pipefail
# shellcheck source=tests/as-root.sh
source "$(dirname "$0")/as-root.sh"
# The guests update from atom-dist on the host (qemu user networking); one step uses the
# exchange disk as a USB stick would be used.
agent_repo=http://10.0.2.100
# shellcheck source=tests/vm-lib.sh
source "$(dirname "$0")/vm-lib.sh"

step "the sample OS in five versions, built by atom-build build from examples/busybox/recipe.toml"
# This machine's paths go in with --set; versions 2.0.0-4.0.0 are the recipes of
# tests/recipes (the example plus one file each); 5.0.0's initramfs lacks ext4. All share
# one stage cache: what two versions have in common is built once.
build_os() { # VERSION RECIPE KERNEL_DIR BASE_IMAGE|none [--set KEY=VALUE...]
  local version=$1 recipe=$2 from=$3 base=$4
  shift 4
  local started=$SECONDS
  "$build" build "$recipe" --quiet --build-dir "$work/build-$version" --cache "$work/build-cache" \
    --set "os.version=$version" --set "atom.agent=$update_static" --set "atom.keys=[\"$work/signer.pub\"]" \
    --set "atom.repositories=[\"$agent_repo\"]" --set "kernel.from=$from" --set "kernel.bootsel=$bootsel_static" \
    --set "image.base=$base" "$@" || fail "atom-build build of $version failed"
  cp "$work/build-$version/out/atom-sample-$version.img" "$work/v${version%%.*}.img"
  echo "    $version: $(stat -c %s "$work/v${version%%.*}.img") bytes in $((SECONDS - started)) s ($recipe)"
}
example=examples/busybox/recipe.toml
# 1.0.0 also makes the host's disk (outputs.disk): ESP with systemd-boot and the first
# stage, root-a = 1.0.0, root-b, state.
build_os 1.0.0 "$example" "$kdir_old" none --set "outputs.disk.kernel=$vmlinuz" \
  --set "outputs.disk.initramfs=$work/initrd.img" --set "outputs.disk.cmdline=ro console=ttyS0 panic=1" \
  --set outputs.disk.slot_size=80M
cp "$work/build-1.0.0/out/atom-sample-1.0.0.disk.img" "$work/disk.img"
build_os 2.0.0 tests/recipes/sample-2.toml "$kdir_new" "$work/v1.img"
build_os 3.0.0 tests/recipes/sample-3.toml "$kdir_new" "$work/v2.img"
build_os 4.0.0 tests/recipes/sample-4.toml "$kdir_new" "$work/v2.img"
build_os 5.0.0 "$example" "$kdir_new" "$work/v2.img" --set 'kernel.initramfs_modules=["virtio_pci", "virtio_blk", "overlay"]'
grep -q '^image = ' "$work/build-5.0.0/out/build.lock.toml" || fail "the build wrote no lock"
ok "each build wrote its build.lock.toml (recipe digest, hooks, stage keys, image digest)"

step "publishing 1.0.0 and 2.0.0 to the repository on the exchange disk"
publish "$work/v1.img"
publish "$work/v2.img"
step "the installer ISO of 1.0.0's disk (isolinux and systemd-boot; unattended onto the only empty disk)"
disk_1=$work/build-1.0.0/out/atom-sample-1.0.0.disk.img
# --on-failure poweroff: a failing install ends qemu here (an operator's default is halt).
installer_args=(--disk "$disk_1" --repo "$work/exchange/repo" --key "$work/signer.key" --kernel "$vmlinuz"
  --kernel-modules "$kroot/lib/modules/$kver" --installer "$install_static"
  --cmdline "console=ttyS0,115200 panic=10" --on-failure poweroff)
"$build" installer "${installer_args[@]}" --target empty --out "$work/installer.iso" | sed 's/^/    /'
torito=$(xorriso -indev "$work/installer.iso" -report_el_torito plain 2>/dev/null | grep "El Torito boot img")
grep -q " BIOS " <<< "$torito" && grep -q " UEFI " <<< "$torito" || fail "the ISO lacks a BIOS or UEFI El Torito image: $torito"
ok "El Torito images for BIOS (isolinux) and UEFI (systemd-boot); isohybrid MBR and GPT for sticks"
(cd "$work" && sha256sum -c --strict --ignore-missing SHA256SUMS | grep -q "^installer.iso: OK") ||
  fail "the ISO's SHA256SUMS line does not check"

# check_installed DISK: its table as the installer wrote it, read on the host.
check_installed() {
  python3 - "$1" <<'EOF' || fail "$1 is not a finished install"
import json, os, struct, subprocess, sys
disk = sys.argv[1]
table = json.loads(subprocess.run(["sfdisk", "--json", disk], check=True, capture_output=True).stdout)
parts = table["partitiontable"]["partitions"]
names = [p.get("name") for p in parts]
assert names == ["esp", "root-a", "root-b", "state"], names
state = parts[3]
size = os.path.getsize(disk)
end = (state["start"] + state["size"]) * 512
assert size - end <= 2 << 20, f"state ends at {end}, the disk at {size}"
with open(disk, "rb") as f:
    f.seek(state["start"] * 512 + 1024)
    sb = f.read(1024)
blocks, = struct.unpack_from("<I", sb, 4)
log, = struct.unpack_from("<I", sb, 24)
assert blocks * (1024 << log) == state["size"] * 512, f"ext4 {blocks} blocks, partition {state['size']} sectors"
print(f"    {disk}: esp, root-a, root-b, state; state and its ext4 grown to {state['size'] * 512 >> 20} MiB")
EOF
}

step "install 1: legacy BIOS, the ISO as a USB stick; 1.0.0 onto an empty 1 GiB virtio disk"
rm -f "$work/target-bios.img"
truncate -s 1G "$work/target-bios.img"
boot_installer bios stick "$work/installer.iso" "$work/target-bios.img"
expect "^ISOLINUX [0-9.]+ " "SeaBIOS started isolinux through the ISO's hybrid MBR"
expect "atom-install: medium ATOM_INSTALL on /dev/vda" "the installer found its medium by volume id"
expect "atom-install: medium: version 1\.0\.0 for x86_64-generic \(channel stable\), signed by" "it verified install.toml and the release manifest"
expect "atom-install: the disk image matches its signature: writing the partition table" "the table was written after the digests matched"
expect "atom-install: state filesystem on /dev/vdb4 grown to" "state grown in the installer (EXT4_IOC_RESIZE_FS)"
expect "INSTALL COMPLETE" "installed onto the only empty disk, unattended"
expect "rebooting into the installed system" "and it reboots"
check_installed "$work/target-bios.img"

step "install $((install_n + 1)): the ISO boots again with the installed disk in (the stick left in): it does not install twice"
boot_installer bios stick "$work/installer.iso" "$work/target-bios.img"
expect "atom-install: /dev/vdb already holds this medium's install" "it finds the install it made and says to remove the medium"
refute "clearing the partition table" "nothing was written"
check_installed "$work/target-bios.img"

step "install $((install_n + 1)): a tampered disk image inside the ISO (BIOS, CD): refused, nothing bootable left on the target"
"$build" installer "${installer_args[@]}" --target serial:atom-old --out "$work/installer-src.iso" > /dev/null
rm -f "$work/disk-orig.zst"
xorriso -osirrox on -indev "$work/installer-src.iso" -extract /atom/disk.img.zst "$work/disk-orig.zst" 2> /dev/null
# One byte of root-a changed, recompressed, padded with a zstd skippable frame to the
# signed compressed size: only the digest can tell.
python3 - "$work/disk-orig.zst" "$work/disk-tampered.zst" <<'EOF'
import struct, subprocess, sys
orig = open(sys.argv[1], "rb").read()
disk = bytearray(subprocess.run(["zstd", "-dcq"], input=orig, capture_output=True, check=True).stdout)
gpt = disk[1024:1024 + 128 * 2]
root_a = struct.unpack_from("<Q", gpt, 128 + 32)[0] * 512
disk[root_a + 4096 + 100] ^= 0x40
packed = subprocess.run(["zstd", "-19", "-T0", "-cq"], input=bytes(disk), capture_output=True, check=True).stdout
pad = len(orig) - len(packed) - 8
assert pad >= 0, "the tampered disk compresses larger"
open(sys.argv[2], "wb").write(packed + struct.pack("<II", 0x184D2A50, pad) + bytes(pad))
EOF
rm -f "$work/installer-tampered.iso"
xorriso -indev "$work/installer-src.iso" -outdev "$work/installer-tampered.iso" -boot_image any replay \
  -update "$work/disk-tampered.zst" /atom/disk.img.zst > /dev/null 2>&1 || fail "xorriso could not rewrite the ISO"
# The target holds a bootable Atom disk (the one just installed, with another disk GUID, as
# an earlier install of another version has), chosen by its serial.
cp --sparse=always "$work/target-bios.img" "$work/target-old.img"
sfdisk --quiet --disk-id "$work/target-old.img" 0A70A70A-0000-4000-8000-000000000001
boot_installer bios cdrom "$work/installer-tampered.iso" "$work/target-old.img" atom-old
expect "^ISOLINUX [0-9.]+ " "SeaBIOS started isolinux from the CD's El Torito BIOS image"
expect "atom-install: medium ATOM_INSTALL on /dev/sr0" "the installer found its CD by volume id"
expect "INSTALL FAILED: .*the image was changed or damaged; refused" "the changed image was refused by its digest"
expect "nothing bootable was written: /dev/vda has no Atom partition table" "and it says the target has no table"
expect "powering off" "then powers off (--on-failure poweroff)"
if sfdisk --dump "$work/target-old.img" > /dev/null 2>&1; then fail "the refused install left a partition table"; fi
[[ $(head -c 1048576 "$work/target-old.img" | tr -d '\0' | wc -c) == 0 ]] || fail "the refused install left bytes in the first MiB"
ok "the target has no partition table and no boot code: nothing boots from it"

step "install $((install_n + 1)): UEFI, the ISO as a CD; 1.0.0 onto an empty virtio disk, the disk of boots 1-10"
rm -f "$work/target-uefi.img"
truncate -s 1G "$work/target-uefi.img"
boot_installer uefi cdrom "$work/installer.iso" "$work/target-uefi.img"
expect "BdsDxe|systemd-boot" "OVMF started systemd-boot from the ISO's El Torito EFI image"
expect "atom-install: medium ATOM_INSTALL on /dev/sr0" "the installer found its CD by volume id"
expect "INSTALL COMPLETE" "installed onto the only empty disk, unattended"
check_installed "$work/target-uefi.img"
cp --sparse=always "$work/target-uefi.img" "$work/disk.img"

control <<'EOF'
atom-update status
atom-update now
EOF

step "boot 1 through UEFI firmware: 1.0.0 from A, then atom-update now"
boot uefi
expect "systemd-boot|Boot0|BdsDxe" "the firmware started the boot loader from the ESP"
expect "bootsel: kernel $kver_old" "the first stage runs on the ESP's kernel ($kver_old)"
expect "loaded /lib/modules/.*virtio_blk.ko" "bootsel loaded virtio_blk with finit_module"
expect "bootsel: starting the slot's kernel $kver_old" "the first stage chose A and starts A's own kernel (kexec)"
expect "bootsel: second stage: slot A chosen by the first stage" "A's initramfs takes over without choosing again"
expect "ATOM-SAMPLE: running 1.0.0 from slot A on kernel $kver_old" "1.0.0 runs from slot A on $kver_old"
expect "ATOM-SAMPLE: marked good" "slot A marked good"
expect "ATOM-SAMPLE: network up" "the guest's network to atom-dist is up"
expect "^staged 2\.0\.0 in slot B via precomputed-delta: downloaded [0-9]+ bytes" \
  "2.0.0 staged in slot B from atom-dist over HTTP, by the precomputed delta"
[[ $(dist_metric 'atom_dist_requests_total{route="file",status="200"}') -ge 3 ]] ||
  fail "atom-dist served no files to the guest"
ok "atom-dist served the guest: $(dist_metric 'atom_dist_requests_total{route="file",status="200"}') files (manifest, signature, delta)"

step "boot 2: 2.0.0 from B on trial; passes its health checks; then update to 3.0.0 by the rsync endpoint"
publish "$work/v3.img"
# This run takes only the rsync route: atom-dist computes the delta from the signature of
# the host's running slot.
control <<'EOF'
atom-update status
{ grep -v '^routes' /etc/atom/update.toml; echo 'routes = ["rsync"]'; } > /tmp/rsync-only.toml
atom-update --config /tmp/rsync-only.toml now
EOF
boot uefi
expect "bootsel: starting the slot's kernel $kver_new" "the first stage starts B's kernel, $kver_new"
expect "ATOM-SAMPLE: running 2.0.0 from slot B on kernel $kver_new" "2.0.0 runs from slot B on its own kernel $kver_new"
expect "ATOM-SAMPLE: marked good" "2.0.0 marked good"
expect "^A +root-a +1\.0\.0 " "status names 1.0.0 in slot A (recorded when it was marked good)"
expect "^staged 3\.0\.0 in slot A via rsync-delta: downloaded [0-9]+ bytes, uploaded [0-9]+" \
  "3.0.0 staged in slot A by atom-dist's rsync endpoint (signature up, delta down)"
[[ $(dist_metric 'atom_dist_requests_total{route="delta",status="200"}') -ge 1 ]] ||
  fail "atom-dist computed no delta for the guest"
ok "atom-dist answered $(dist_metric 'atom_dist_requests_total{route="delta",status="200"}') rsync request(s), $(dist_metric atom_dist_delta_cache_misses_total) diff(s) computed"

step "boot 3: 3.0.0 from A; its health check fails, so it marks itself bad and reboots"
boot uefi
expect "ATOM-SAMPLE: running 3.0.0 from slot A" "3.0.0 runs from slot A"
expect "does not start" "the failing check's own message is on the console"
expect "ATOM-SAMPLE: health check failed" "health check failed"
refute "ATOM-SAMPLE: control script begins" "nothing ran after the failed check"

step "boot 4: back on 2.0.0 by itself; then update to 4.0.0 (its init crashes) from a \"USB stick\""
publish "$work/v4.img"
# The exchange disk as a stick: --repository replaces the configured mirrors for one run.
control <<'EOF'
atom-update now --repository file:///mnt/exchange/repo
EOF
boot uefi
expect "ATOM-SAMPLE: running 2.0.0 from slot B on kernel $kver_new" "back on 2.0.0 from slot B, on $kver_new"
expect "BdsDxe|systemd-boot" "UEFI firmware again: the rollback under UEFI"
expect "^staged 4\.0\.0 in slot A via [a-z-]+: read [0-9]+ bytes from a local repository" \
  "4.0.0 staged in slot A from the stick (bytes read locally, none downloaded)"

for attempt in 1 2; do
  step "boot $((boot_n + 1)): 4.0.0 from A, try $attempt of 2: init crashes, the kernel panics and reboots"
  control <<'EOF'
echo "ATOM-SAMPLE: should not run on a crashing version"
EOF
  boot bios
  expect "^SYSLINUX [0-9.]+ 2" "legacy BIOS: SeaBIOS started syslinux from the ESP (gptmbr.bin)"
  refute "BdsDxe" "no UEFI firmware on this boot"
  expect "ATOM-SAMPLE: 4.0.0 init crashes" "4.0.0's init ran from slot A and crashed"
  expect "Kernel panic" "the kernel panicked (no userspace, nothing marked)"
done

step "boot $((boot_n + 1)): slot A is out of tries; bootsel falls back to 2.0.0 on B; update to 5.0.0"
publish "$work/v5.img"
control <<'EOF'
atom-update status
atom-update status --json
atom-update now
EOF
boot bios
expect "ATOM-SAMPLE: running 2.0.0 from slot B on kernel $kver_new" "2.0.0 runs from slot B again, on its kernel"
expect "last boot FELL BACK: slot A ran out of tries" "status reports the fallback"
expect '"fell_back_from": ?"A"' "status --json names the slot it fell back from"
expect "^staged 5\.0\.0 in slot A via" "5.0.0 (initramfs without ext4) written to slot A and staged"

step "boot $((boot_n + 1)): 5.0.0's kernel starts, but its initramfs cannot mount the root: slot A is marked failed"
control <<'EOF'
echo "ATOM-SAMPLE: should not run on a version that cannot mount its root"
EOF
boot bios
expect "bootsel: starting the slot's kernel $kver_new" "the first stage started 5.0.0's kernel"
expect "bootsel: second stage: slot A chosen" "5.0.0's own initramfs took over"
expect "THIS SLOT CANNOT BOOT" "the second stage says the slot cannot boot"
expect "cannot mount .*ext4" "and why: no ext4 in its initramfs"
expect "slot A marked failed" "it marked slot A failed before rebooting"
refute "ATOM-SAMPLE: running 5.0.0" "5.0.0 never ran"

step "boot $((boot_n + 1)): the first stage passes over the failed slot: 2.0.0 on its kernel"
control <<'EOF'
atom-update status
EOF
boot bios
expect "ATOM-SAMPLE: running 2.0.0 from slot B on kernel $kver_new" "2.0.0 from slot B on $kver_new"
expect "last boot FELL BACK: slot A" "status reports the fallback from A"
expect "^B +root-b +2\.0\.0 .*$kver_new" "status names B's kernel"

step "boot $((boot_n + 1)): the disk never appears: bootsel says why and opens its emergency shell"
boot_n=$((boot_n + 1))
console=$work/console-$boot_n.log
rm -f "$work/serial.in" "$work/serial.out" "$console"
mkfifo "$work/serial.in" "$work/serial.out"
timeout "$boot_timeout" qemu-system-x86_64 "${qemu_machine[@]}" -serial "pipe:$work/serial" -kernel "$vmlinuz" -initrd "$work/initrd.img" \
  -append "ro console=ttyS0 panic=1 bootsel.disk=/dev/vdz bootsel.wait=2" \
  -drive "file=$work/disk.img,format=raw,if=virtio,cache=unsafe" &
qemu_pid=$!
cat "$work/serial.out" > "$console" &
exec 3> "$work/serial.in"
for _ in $(seq "$boot_timeout"); do
  grep -q "starting emergency shell" "$console" && break
  kill -0 "$qemu_pid" 2>/dev/null || break
  sleep 1
done
sleep 1
# $((6 * 7)) proves the shell ran the line (the console's echo would show it unexpanded).
printf 'echo "EMERGENCY-SHELL: $((6 * 7))"\nexit\n' >&3
wait "$qemu_pid" || fail "the emergency boot did not end (or qemu failed)"
exec 3>&-
tr -d '\r' < "$console" > "$console.txt" && mv "$console.txt" "$console"
grep -E "^(bootsel|\*\*\*|EMERGENCY)" "$console" | sed 's/^/    | /' || true
expect "CANNOT BOOT" "bootsel says it cannot boot"
expect "/dev/vdz" "and names the disk it waited for"
expect "starting emergency shell /bin/sh" "it offers the initramfs's busybox shell"
expect "^EMERGENCY-SHELL: 42" "a command typed on the serial console ran in that shell"


step "boot $((boot_n + 1)): the disk installed under BIOS (install 1) boots 1.0.0 and updates"
cp --sparse=always "$work/target-bios.img" "$work/disk.img"
control <<'EOF'
atom-update now
EOF
boot bios
expect "ATOM-SAMPLE: running 1.0.0 from slot A" "1.0.0 runs from the installed disk's slot A"
expect "ATOM-SAMPLE: marked good" "and is marked good"
expect "^staged [0-9.]+ in slot B" "the channel's current version staged in slot B: the installed disk updates"

finish

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

finish

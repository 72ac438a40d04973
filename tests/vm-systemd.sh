#!/usr/bin/env bash
# The Atom systemd units under a real systemd: a Debian root (mmdebstrap, the host's apt
# sources) with atom-update and the units installed by `atom-build install-units`, booted
# in qemu like tests/vm.sh (same first stage, disk and exchange disk). Each slot carries
# its Debian kernel (1.0.0 the main suite's, later versions the security suite's) and
# Debian's own initramfs made by update-initramfs with the Atom initramfs-tools hook: the
# first stage kexecs it, and `bootsel attach` in its local-bottom adds state and /etc.
#
#   boot 1: 1.0.0 from A, whose agent is an older build (ATOM_AGENT_VERSION=0.0.1);
#           atom-health.service passes, atom-mark-good.service runs; that agent refuses a
#           3.0.0 that needs a newer agent (channel next, min_agent) with "update the agent
#           first"; `systemctl start atom-update.service` stages 2.0.0 (sandboxed unit,
#           journald fields ATOM_VERSION/ATOM_ROUTE checked with journalctl -o json)
#   boot 2: 2.0.0 from B on trial, with the current agent it brought; health passes
#           before boot-complete.target; marked good by atom-mark-good.service; the new
#           agent takes the 3.0.0 the old one refused and the unit stages it
#   boot 3: 3.0.0's health check fails -> atom-mark-bad.service marks the slot bad and
#           reboots
#   boot 4: back on 2.0.0; the previous boot's journal shows what the units did
#
# /etc across the updates: an edit made on 1.0.0 after 2.0.0 was staged survives into
# 2.0.0, a system user new in 2.0.0's image arrives next to the host's, a file changed on
# both sides is reported by `atom-update etc conflicts`, and the fallback from 3.0.0 to
# 2.0.0 returns to 2.0.0's /etc (without what 3.0.0 wrote).
#
# Usage (root, Debian): bash tests/vm-systemd.sh [--keep] [WORKDIR] (a temporary work directory
# is removed after a passing run unless --keep; a WORKDIR given is kept and reused)
set -euo pipefail
# shellcheck source=tests/as-root.sh
source "$(dirname "$0")/as-root.sh"
# shellcheck source=tests/vm-lib.sh
source "$(dirname "$0")/vm-lib.sh"

suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
base=$work/sysbase
step "a Debian $suite root with systemd (mmdebstrap --variant=minbase, the host's apt sources)"
if [[ ! -x $base/usr/lib/systemd/systemd || ! -x $base/usr/sbin/mkinitramfs ]]; then
  rm -rf "$base"
  mmdebstrap --variant=minbase --include=systemd-sysv,udev,initramfs-tools,kmod \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    "$suite" "$base"
fi
du -sh "$base" | sed 's/^/    /'

# The slot's kernel with the modules it needs, and Debian's own initramfs for it, made by
# update-initramfs in the slot's tree with the Atom hook (install-units --bootsel).
sample_root() { # DIR VERSION KERNEL_DIR RELEASE [AGENT]
  local root=$1 version=$2 from=$3 release=$4 agent=${5:-}
  rm -rf "$root"
  cp -a "$base" "$root"
  install_agent "$root" --bootsel "$bootsel_static"
  [[ -z $agent ]] || install -m 755 "$agent" "$root/usr/bin/atom-update"
  slot_kernel "$root" "$from" "$release"
  cp "$from/boot/config-$release" "$root/boot/"
  chroot "$root" update-initramfs -c -k "$release" 2>&1 | grep -v "^W: Possible missing firmware" | sed 's/^/    /' || true
  [[ -s $root/boot/initrd.img-$release ]] || fail "update-initramfs made no initramfs for $release"
  echo atom-vm > "$root/etc/hostname"
  mkdir -p "$root/mnt/exchange"
  echo '/dev/vdb /mnt/exchange ext4 ro,nofail,x-systemd.device-timeout=30s 0 0' > "$root/etc/fstab"
  # Test-only units: a banner with the version and slot, and the control script from the
  # exchange disk, run once the slot was marked good, then power off.
  cat > "$root/etc/systemd/system/atom-vm-banner.service" <<'EOF'
[Unit]
Description=Atom VM test banner
After=local-fs.target
[Service]
Type=oneshot
StandardOutput=journal+console
ExecStart=/bin/sh -c 'echo "ATOM-SAMPLE: running $(sed -n "s/^version = \\"\\(.*\\)\\"/\\1/p" /usr/lib/atom/release) from slot $(sed -n "s/^slot = \\"\\(.*\\)\\"/\\1/p" /run/atom/boot.toml) on kernel $(uname -r)"'
[Install]
WantedBy=multi-user.target
EOF
  cat > "$root/etc/systemd/system/atom-vm-control.service" <<'EOF'
[Unit]
Description=Atom VM test control script
Requires=atom-mark-good.service mnt-exchange.mount
After=atom-mark-good.service mnt-exchange.mount multi-user.target sysinit.target
DefaultDependencies=no
Conflicts=shutdown.target
Before=shutdown.target
[Service]
Type=oneshot
StandardOutput=journal+console
StandardError=journal+console
ExecStart=/bin/sh -c 'echo "ATOM-SAMPLE: control script begins"; sh /mnt/exchange/control.sh; echo "ATOM-SAMPLE: control script exited $?"'
ExecStartPost=/usr/bin/systemctl --no-block poweroff
[Install]
WantedBy=multi-user.target
EOF
  systemctl --root="$root" enable atom-health.service atom-mark-good.service \
    atom-vm-banner.service atom-vm-control.service 2>&1 | sed 's/^/    /' >/dev/null
}

step "an older agent for 1.0.0 (the same tree built as version 0.0.1), the current one for 2.0.0 and 3.0.0"
current_agent=$("$update_static" --version | awk '{print $2}')
old_agent=$(ATOM_AGENT_VERSION=0.0.1 bash bootsel/build-static.sh atom-update)
cp "$old_agent" "$work/atom-update-0.0.1"
bash bootsel/build-static.sh atom-update >/dev/null
"$work/atom-update-0.0.1" --version | grep -qx "atom-update 0.0.1" || fail "the old agent does not say 0.0.1"
"$update_static" --version | grep -qx "atom-update $current_agent" || fail "the current agent was not rebuilt"
echo "    old agent 0.0.1, current agent $current_agent"

step "the sample OS (Debian + systemd + Atom units) in three versions"
sample_root "$work/root-v1" 1.0.0 "$kdir_old" "$kver_old" "$work/atom-update-0.0.1"
echo "setting = 1" > "$work/root-v1/etc/atom-vm.conf"
"$build" image --initramfs tree --rootfs "$work/root-v1" --version 1.0.0 --size 400M --out "$work/v1.img"
sample_root "$work/root-v2" 2.0.0 "$kdir_new" "$kver_new"
echo "new in 2.0.0" > "$work/root-v2/etc/feature"
echo "setting = 2" > "$work/root-v2/etc/atom-vm.conf"
chroot "$work/root-v2" useradd --system --no-create-home --shell /usr/sbin/nologin atomsvc
"$build" image --initramfs tree --rootfs "$work/root-v2" --version 2.0.0 --size 400M --out "$work/v2.img" --base "$work/v1.img"
sample_root "$work/root-v3" 3.0.0 "$kdir_new" "$kver_new"
printf '#!/bin/sh\necho "the sample service of 3.0.0 does not start" >&2\nexit 1\n' \
  > "$work/root-v3/usr/lib/atom/health.d/50-broken-service"
chmod 755 "$work/root-v3/usr/lib/atom/health.d/50-broken-service"
cat > "$work/root-v3/etc/systemd/system/atom-vm-etc3.service" <<'EOF'
[Unit]
Description=Atom VM test: 3.0.0 writes to /etc
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo 3 > /etc/written-by-3'
[Install]
WantedBy=multi-user.target
EOF
systemctl --root="$work/root-v3" enable atom-vm-etc3.service 2>/dev/null
"$build" image --initramfs tree --rootfs "$work/root-v3" --version 3.0.0 --size 400M --out "$work/v3.img" --base "$work/v2.img"

step "the host's disk: atom-build disk (root-a = 1.0.0)"
"$build" disk --image "$work/v1.img" --kernel "$vmlinuz" --initramfs "$work/initrd.img" \
  --cmdline "ro console=ttyS0 panic=1" --slot-size 400M --out "$work/disk.img"

journal_fields='journalctl -u atom-update.service -o json --no-pager | grep -oE "\"ATOM_(VERSION|ROUTE|SLOT)\":\"[^\"]*\"" | sort -u | sed "s/^/JOURNAL: /"'

step "boot 1: 1.0.0 from A under systemd; its old agent refuses what needs a newer one and stages 2.0.0"
publish "$work/v1.img"
publish "$work/v2.img"
# 3.0.0 for agents >= the current one, on a channel of its own until boot 2.
"$build" publish --repo "$work/exchange/repo" --channel next --key "$work/signer.key" --zstd-level 3 \
  --min-agent "$current_agent" "$work/v3.img" | sed 's/^/    /'
next_check='sed "s/^channel = .*/channel = \"next\"/" /etc/atom/update.toml > /run/next.toml; atom-update --config /run/next.toml check; echo "NEXT-EXIT: $?"'
control <<EOF
systemctl is-active atom-health.service atom-mark-good.service | tr '\n' ' ' | sed 's/^/UNITS: /'; echo
atom-update --version | sed 's/^/AGENT: /'
$next_check
systemctl start atom-update.service
systemctl show -p Result atom-update.service
echo "setting = host" > /etc/atom-vm.conf
echo "edited after staging" > /etc/host-note
$journal_fields
atom-update status
EOF
boot
expect "bootsel: starting the slot's kernel $kver_old" "the first stage starts A's kernel"
expect "Loading, please wait|Begin: Loading essential drivers" "Debian's own initramfs (initramfs-tools) is the second stage"
expect "bootsel: second stage: slot A chosen by the first stage" "its Atom hook (bootsel attach) took the hand-over"
expect "ATOM-SAMPLE: running 1.0.0 from slot A on kernel $kver_old" "1.0.0 runs from slot A under systemd on $kver_old"
expect "UNITS: active active" "atom-health.service and atom-mark-good.service ran"
expect "AGENT: atom-update 0.0.1" "1.0.0 carries the old agent"
expect "needs agent $current_agent or newer, this agent is 0.0.1: update the agent first" "the old agent refuses 3.0.0 (min_agent $current_agent)"
expect "NEXT-EXIT: 6" "with exit 6"
expect "Result=success" "atom-update.service (sandboxed) succeeded"
expect 'JOURNAL: "ATOM_VERSION":"2.0.0"' "the journal has ATOM_VERSION=2.0.0 (journalctl -o json)"
expect 'JOURNAL: "ATOM_ROUTE":"precomputed-delta"' "and ATOM_ROUTE=precomputed-delta"
expect "\]: B +root-b +2\.0\.0 .*boots next" "2.0.0 staged in slot B"

step "boot 2: 2.0.0 on trial with the agent it brought; marked good; it takes the 3.0.0 the old agent refused"
"$build" publish --repo "$work/exchange/repo" --channel stable --key "$work/signer.key" --zstd-level 3 \
  --min-agent "$current_agent" "$work/v3.img" | sed 's/^/    /'
control <<EOF
systemctl is-active boot-complete.target atom-mark-good.service | tr '\n' ' ' | sed 's/^/UNITS: /'; echo
atom-update --version | sed 's/^/AGENT: /'
$next_check
echo "ETC: host-note: \$(cat /etc/host-note)"
echo "ETC: atom-vm.conf: \$(cat /etc/atom-vm.conf)"
getent passwd atomsvc >/dev/null && echo "ETC: system user atomsvc arrived"
atom-update etc conflicts | sed 's/^/ETC: /'
echo "in 2.0.0" > /etc/written-in-2
atom-update status
echo 'reboot = "immediate"' >> /etc/atom/update.toml
systemctl start atom-update.service
echo "ATOM-SAMPLE: atom-update.service returned without a reboot"
EOF
boot
expect "ATOM-SAMPLE: running 2.0.0 from slot B on kernel $kver_new" "2.0.0 runs from slot B on its kernel $kver_new"
expect "UNITS: active active" "boot-complete.target reached, atom-mark-good.service ran"
expect "AGENT: atom-update $current_agent" "the agent upgraded itself with the slot: 2.0.0 runs agent $current_agent"
expect "NEXT-EXIT: 0" "the new agent takes the 3.0.0 (min_agent $current_agent) the old one refused"
expect "bootsel: /etc: merged slot A's changes for this image" "bootsel merged 1.0.0's /etc changes for 2.0.0 at its first boot"
expect "ETC: host-note: edited after staging" "an /etc edit made after 2.0.0 was staged survived the update"
expect "ETC: system user atomsvc arrived" "the system user new in 2.0.0's image arrived (account files merged by name)"
expect "ETC: atom-vm.conf: setting = host" "a file changed on both sides keeps the host's version"
expect "ETC: UNRESOLVED /etc/atom-vm.conf: changed on this host and in the new image; the image's version: /etc/atom-vm.conf.atom-new" "and atom-update etc conflicts reports it"
expect "\]: B +root-b +2\.0\.0 +[^ ]+ +[0-9]+ +0 +yes +booted" "slot B marked successful"
expect "reboot: Restarting system" "the sandboxed unit staged 3.0.0 and rebooted (reboot = immediate; CAP_SYS_BOOT is its only capability)"

step "boot 3: 3.0.0's health check fails: atom-mark-bad.service marks it bad and reboots"
control <<'EOF'
echo "ATOM-SAMPLE: should not run after a failed health check"
EOF
boot
expect "ATOM-SAMPLE: running 3.0.0 from slot A" "3.0.0 runs from slot A"
expect "FAILED.*Failed to start atom-healt" "atom-health.service failed"
refute "ATOM-SAMPLE: control script begins" "boot-complete.target was not reached; nothing marked good"
expect "reboot: Restarting system" "atom-mark-bad.service rebooted the host"

step "boot 4: back on 2.0.0; the journal of boot 3 shows the units' work"
control <<'EOF'
journalctl -b -1 -o cat --no-pager -u atom-health.service -u atom-mark-bad.service | sed 's/^/PREVIOUS: /'
echo "ETC: written-in-2: $(cat /etc/written-in-2)"
if test -e /etc/written-by-3; then echo "ETC: 3.0.0's write is here"; else echo "ETC: 3.0.0's write is not here"; fi
atom-update status
EOF
boot
expect "ATOM-SAMPLE: running 2.0.0 from slot B on kernel $kver_new" "back on 2.0.0 from slot B, on $kver_new"
expect "PREVIOUS: .*50-broken-service" "boot 3's journal: the failing check by name"
expect "PREVIOUS: .*marked bad" "boot 3's journal: atom-mark-bad.service marked the slot bad"
expect "ETC: written-in-2: in 2.0.0" "the fallback returned to 2.0.0's /etc"
expect "ETC: 3.0.0's write is not here" "without what 3.0.0 wrote to its own /etc"
expect "\]: A +root-a +3\.0\.0 .*not bootable" "slot A (3.0.0) is not bootable"

finish

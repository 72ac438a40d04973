#!/usr/bin/env bash
# The Atom systemd units under a real systemd: a Debian root (mmdebstrap, the host's apt
# sources) with atom-update and the units installed by `atom-build install-units`, booted
# in qemu like tests/vm.sh (same first stage, disk and exchange disk). Each slot carries
# its Debian kernel (1.0.0 the main suite's, later versions the security suite's) and
# Debian's own initramfs made by update-initramfs with the Atom initramfs-tools hook: the
# first stage kexecs it, and `bootsel attach` in its local-bottom adds state and /etc.
# Every version is built by `atom-build build` from examples/debian-server/recipe.toml.
# Every boot starts under legacy BIOS (SeaBIOS -> gptmbr.bin -> syslinux from the hybrid
# disk's ESP); tests/vm.sh covers UEFI.
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

step "an older agent for 1.0.0 (the same tree built as version 0.0.1), the current one for 2.0.0 and 3.0.0"
current_agent=$("$update_static" --version | awk '{print $2}')
# The current agent is kept aside: building the old one replaces it in target/, and
# building it again would cost another build (cargo rebuilds it when next asked).
cp "$update_static" "$work/atom-update-current"
update_static=$work/atom-update-current
old_agent=$(ATOM_AGENT_VERSION=0.0.1 bash bootsel/build-static.sh atom-update)
cp "$old_agent" "$work/atom-update-0.0.1"
"$work/atom-update-0.0.1" --version | grep -qx "atom-update 0.0.1" || fail "the old agent does not say 0.0.1"
"$update_static" --version | grep -qx "atom-update $current_agent" || fail "the current agent is not $current_agent"
echo "    old agent 0.0.1, current agent $current_agent"

step "the sample OS (Debian $suite + systemd + Atom units) in three versions, built by atom-build build"
# examples/debian-server/recipe.toml through tests/recipes/debian-*.toml: mmdebstrap, apt,
# users, units, the Atom stage, the slot's kernel with Debian's initramfs (update-initramfs
# with the Atom hook), clean, image. One stage cache: the base is bootstrapped once.
# os_args VERSION KERNEL_DIR AGENT BASE_IMAGE|none: this machine's paths for the recipes.
os_args() {
  printf '%s\n' --set "os.version=$1" --set "base.debian.suite=$suite" --set "atom.agent=$3" \
    --set "atom.bootsel=$bootsel_static" --set "atom.keys=[\"$work/signer.pub\"]" \
    --set "atom.repositories=[\"$agent_repo\"]" --set "kernel.from=$2" --set "image.base=$4"
}
build_os() { # VERSION RECIPE KERNEL_DIR AGENT BASE_IMAGE|none [--set KEY=VALUE...]
  local version=$1 recipe=$2 started=$SECONDS args
  mapfile -t args < <(os_args "$1" "$3" "$4" "$5")
  shift 5
  "$build" build "$recipe" --quiet --build-dir "$work/build-$version" --cache "$work/build-cache" \
    "${args[@]}" "$@" || fail "atom-build build of $version failed (logs in $work/build-$version/logs)"
  cp "$work/build-$version/out/debian-server-$version.img" "$work/v${version%%.*}.img"
  echo "    $version: $(stat -c %s "$work/v${version%%.*}.img") bytes in $((SECONDS - started)) s ($recipe)"
}
disk_args=(--set "outputs.disk.kernel=$vmlinuz" --set "outputs.disk.initramfs=$work/initrd.img"
  --set "outputs.disk.cmdline=ro console=ttyS0 panic=1" --set outputs.disk.slot_size=400M)
build_os 1.0.0 tests/recipes/debian-1.toml "$kdir_old" "$work/atom-update-0.0.1" none "${disk_args[@]}"
# The host's disk (outputs.disk of 1.0.0): ESP with the first stage, root-a = 1.0.0.
cp "$work/build-1.0.0/out/debian-server-1.0.0.disk.img" "$work/disk.img"
build_os 2.0.0 tests/recipes/debian-2.toml "$kdir_new" "$update_static" "$work/v1.img"
build_os 3.0.0 tests/recipes/debian-3.toml "$kdir_new" "$update_static" "$work/v2.img"
grep -q 'name = "openssh-server"' "$work/build-1.0.0/out/build.lock.toml" ||
  fail "the lock lists no openssh-server (the packages stage)"
ok "the lock lists $(grep -c '^\[\[package\]\]' "$work/build-1.0.0/out/build.lock.toml") packages with their versions"

step "--locked: a locked package version the mirrors no longer have stops the build by name"
python3 - "$work/build-1.0.0/out/build.lock.toml" "$work/stale.lock.toml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
text, n = re.subn(r'(name = "openssh-server"\nversion = ")[^"]*"', r'\g<1>1:0.1-gone"', text)
assert n == 1, "no openssh-server in the lock"
open(sys.argv[2], "w").write(text)
EOF
mapfile -t args < <(os_args 1.0.0 "$kdir_old" "$work/atom-update-0.0.1" none)
if "$build" build tests/recipes/debian-1.toml --quiet --build-dir "$work/build-locked" --cache "$work/build-cache" \
  "${args[@]}" "${disk_args[@]}" --locked "$work/stale.lock.toml" --only packages 2> "$work/locked.err"; then
  fail "a lock naming a version no mirror has was built"
fi
grep -q "package openssh-server 1:0.1-gone is no longer available" "$work/locked.err" ||
  fail "the locked build did not name the missing package: $(tail -3 "$work/locked.err")"
ok "refused: $(grep -o 'package openssh-server 1:0.1-gone is no longer available[^;]*' "$work/locked.err")"

step "a package no mirror has: the packages stage fails naming it, with the end of its log"
if "$build" build tests/recipes/debian-1.toml --quiet --build-dir "$work/build-missing" --cache "$work/build-cache" \
  "${args[@]}" "${disk_args[@]}" --set 'packages.install=["openssh-server", "atom-no-such-package"]' \
  --only packages 2> "$work/missing.err"; then
  fail "a recipe with a package no mirror has was built"
fi
grep -q "stage packages failed" "$work/missing.err" && grep -q "Unable to locate package atom-no-such-package" "$work/missing.err" ||
  fail "the failure did not name the stage and the package: $(tail -5 "$work/missing.err")"
ok "refused: stage packages failed; apt: Unable to locate package atom-no-such-package"

step "examples/debian-server/recipe.toml as written (its kernel is linux-image-amd64 through apt) and examples/build-service, built beside the boots"
# Built in the background while qemu (one TCG thread) boots: the second core is otherwise
# idle. Same stage cache: bootstrap and packages are the VM recipes'.
(
  "$build" build examples/debian-server/recipe.toml --quiet --build-dir "$work/build-example" \
    --cache "$work/build-cache" --set os.version=1.0.0 --set "base.debian.suite=$suite" \
    --set "atom.agent=$update_static" --set "atom.bootsel=$bootsel_static" \
    --set "atom.keys=[\"$work/signer.pub\"]" --set "atom.repositories=[\"$agent_repo\"]" \
    > "$work/example-build.log" 2>&1 || exit 1
  # examples/build-service: the same host running the build service, with this atom-build.
  # (an `if`: under set -e a failing build would end the subshell before its rc is kept)
  rm -rf "$work/examples"
  if cp -r examples "$work/examples" && mkdir -p "$work/examples/build-service/bin" &&
    cp "$build" "$work/examples/build-service/bin/atom-build" &&
    "$build" build "$work/examples/build-service/recipe.toml" --quiet --build-dir "$work/build-service" \
      --cache "$work/build-cache" --set os.version=1.0.0 --set "base.debian.suite=$suite" \
      --set "atom.agent=$update_static" --set "atom.bootsel=$bootsel_static" \
      --set "atom.keys=[\"$work/signer.pub\"]" --set "atom.repositories=[\"$agent_repo\"]" \
      > "$work/service-build.log" 2>&1; then
    echo "rc=0" > "$work/service-build.rc"
  else
    echo "rc=$?" > "$work/service-build.rc"
  fi
) &
example_pid=$!
background "$example_pid"
echo "    building in the background (log: $work/example-build.log)"

journal_fields='journalctl -u atom-update.service -o json --no-pager | grep -oE "\"ATOM_(VERSION|ROUTE|SLOT)\":\"[^\"]*\"" | sort -u | sed "s/^/JOURNAL: /"'

step "boot 1: 1.0.0 from A under systemd; its old agent refuses what needs a newer one and stages 2.0.0"
publish "$work/v1.img"
publish "$work/v2.img"
# 3.0.0 for agents >= the current one, on a channel of its own until boot 2.
"$build" publish --repo "$work/exchange/repo" --channel next --key "$work/signer.key" --zstd-level 3 --payload-level 3 \
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
boot bios
expect "^SYSLINUX [0-9.]+ 2" "legacy BIOS: SeaBIOS started gptmbr.bin and syslinux from the hybrid disk's ESP"
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
"$build" publish --repo "$work/exchange/repo" --channel stable --key "$work/signer.key" --zstd-level 3 --payload-level 3 \
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
boot bios
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
boot bios
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
boot bios
expect "ATOM-SAMPLE: running 2.0.0 from slot B on kernel $kver_new" "back on 2.0.0 from slot B, on $kver_new"
expect "PREVIOUS: .*50-broken-service" "boot 3's journal: the failing check by name"
expect "PREVIOUS: .*marked bad" "boot 3's journal: atom-mark-bad.service marked the slot bad"
expect "ETC: written-in-2: in 2.0.0" "the fallback returned to 2.0.0's /etc"
expect "ETC: 3.0.0's write is not here" "without what 3.0.0 wrote to its own /etc"
expect "\]: A +root-a +3\.0\.0 .*not bootable" "slot A (3.0.0) is not bootable"


step "the Debian example as written, built beside the boots: kernel, modules and initramfs from linux-image-amd64"
wait "$example_pid" || fail "atom-build build examples/debian-server/recipe.toml failed: $(tail -n 8 "$work/example-build.log")"
example_img=$work/build-example/out/debian-server-1.0.0.img
[[ -s $example_img ]] || fail "the example's build made no $example_img"
kpkg=$(grep -A1 'name = "linux-image-[0-9]' "$work/build-example/out/build.lock.toml" | sed -n 's/^name = "\(.*\)"/\1/p' | sed -n 1p)
[[ -n $kpkg ]] || fail "the example's lock lists no linux-image package"
example_release=$(debugfs -R "cat /boot/atom/kernel-release" "$example_img" 2> /dev/null)
[[ linux-image-$example_release == "$kpkg" ]] ||
  fail "the slot's kernel release '$example_release' is not the installed package $kpkg"
debugfs -R "ls -p /lib/modules/$example_release/kernel/fs/ext4" "$example_img" 2> /dev/null | grep -q 'ext4\.ko' ||
  fail "the example's slot has no modules for $example_release"
debugfs -R "dump /boot/atom/initrd.img $work/example-initrd.img" "$example_img" 2> /dev/null
# Debian's initramfs: gzip, zstd or xz, after an uncompressed early-microcode cpio if any.
python3 - "$work/example-initrd.img" <<'EOF' || fail "the example's initramfs has no Atom local-bottom hook (scripts/local-bottom/atom)"
import lzma, subprocess, sys, zlib
data = open(sys.argv[1], "rb").read()
kinds = {b"\x1f\x8b\x08": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"\xfd7zXZ": "xz"}
found = sorted((data.find(m), k) for m, k in kinds.items() if data.find(m) >= 0)
assert found, "no compressed archive"
at, kind = found[0]
rest = data[at:]
if kind == "gzip":
    cpio = zlib.decompressobj(31).decompress(rest)
elif kind == "zstd":
    cpio = subprocess.run(["zstd", "-dcq"], input=rest, capture_output=True).stdout
else:
    cpio = lzma.LZMADecompressor().decompress(rest)
sys.exit(0 if b"scripts/local-bottom/atom" in cpio else 1)
EOF
ok "$kpkg: /boot/atom/vmlinuz, modules, and Debian's initramfs with the Atom hook ($(stat -c %s "$work/example-initrd.img") bytes)"

step "examples/build-service: the image's own build service builds the image again (the builder builds itself)"
grep -q "^rc=0" "$work/service-build.rc" 2> /dev/null ||
  fail "atom-build build examples/build-service/recipe.toml failed: $(tail -n 8 "$work/service-build.log")"
stree=$work/build-service/tree
[[ -s $work/build-service/out/build-service-1.0.0.img ]] || fail "the build-service example made no image"
cmp -s "$stree/usr/bin/atom-build" "$build" || fail "the image's /usr/bin/atom-build is not the one built here"
[[ -L $stree/etc/systemd/system/multi-user.target.wants/atom-build-serve.service ]] ||
  fail "atom-build-serve.service is not enabled in the image"
for p in mmdebstrap qemu-utils e2fsprogs; do
  grep -q "name = \"$p\"" "$work/build-service/out/build.lock.toml" || fail "the image's lock lists no $p"
done
ok "the image carries this atom-build, its unit (enabled), mmdebstrap, qemu-utils, e2fsprogs"
# The image's tree as the root of the service (a mount namespace of its own: /proc, /dev,
# /sys and a /tmp inside; the tree bound on itself, so its / is a mount point as a booted
# host's is). Its own atom-build, templates, mmdebstrap and apt sources do the build.
: > "$work/service.log" # before the child opens it: the polls below read it at once
unshare --mount --fork --kill-child=SIGTERM bash -c "mount --bind '$stree' '$stree' && mount -t proc proc '$stree/proc' &&
  mount --rbind /dev '$stree/dev' && mount --rbind /sys '$stree/sys' && mount -t tmpfs tmpfs '$stree/tmp' &&
  cp /etc/resolv.conf '$stree/tmp/resolv.conf' && mount --bind '$stree/tmp/resolv.conf' '$stree/etc/resolv.conf' &&
  chroot '$stree' /usr/bin/atom-build token add example --data /var/lib/atom-build > '$work/service-token' &&
  exec chroot '$stree' /usr/bin/atom-build serve --listen 127.0.0.1:0 --data /var/lib/atom-build \
    --workers 1 --min-free 1G" 2> "$work/service.log" &
service_pid=$!
background "$service_pid"
for _ in $(seq 1 100); do
  service_url=$(sed -n 's/.*listening on \(http:\/\/127\.0\.0\.1:[0-9]*\).*/\1/p' "$work/service.log")
  [[ -n $service_url ]] && break
  kill -0 "$service_pid" 2> /dev/null || fail "the image's atom-build serve ended: $(tail -n 5 "$work/service.log")"
  sleep 0.2
done
[[ -n $service_url ]] || fail "the image's atom-build serve does not listen: $(tail -n 5 "$work/service.log")"
auth="Authorization: Bearer $(cat "$work/service-token")"
templates=$(curl -fsS -H "$auth" "$service_url/v1/templates") || fail "the image's service does not list its templates"
[[ $templates == '{"templates":["build-service","server"]}' ]] || fail "the image's templates: $templates"
order=$(curl -fsS -H "$auth" -d '{"template": "build-service", "set": ["os.version=\"2.0.0\""]}' "$service_url/v1/orders") ||
  fail "the image's service refused the order of its own template"
order_id=$(jq -r .id <<< "$order")
ok "the image's service ($service_url) lists $templates and took order $order_id"
for _ in $(seq 1 1500); do
  state=$(curl -fsS -H "$auth" "$service_url/v1/orders/$order_id" | jq -r .state) ||
    fail "cannot read the state of order $order_id"
  [[ $state == queued || $state == running ]] || break
  sleep 1
done
shown=$(curl -fsS -H "$auth" "$service_url/v1/orders/$order_id") || fail "cannot read order $order_id"
[[ $state == succeeded ]] || fail "the self-build ended $state: $(jq -r .build.error <<< "$shown"); log: $(jq -r .build.log_tail <<< "$shown")"
img_url=$(jq -r '.artifacts[] | select(.name == "build-service-2.0.0.img") | .url' <<< "$shown")
img_sha=$(jq -r '.artifacts[] | select(.name == "build-service-2.0.0.img") | .sha256' <<< "$shown")
[[ -n $img_url && $img_url != null ]] || fail "the self-build lists no build-service-2.0.0.img: $shown"
curl -fsS -H "$auth" -o "$work/self-built.img" "$service_url$img_url" || fail "cannot download the self-built image"
[[ $(sha256sum < "$work/self-built.img" | cut -d' ' -f1) == "$img_sha" ]] || fail "the downloaded image is not the listed SHA-256"
rm -f "$work/self-built-atom-build"
debugfs -R "dump /usr/bin/atom-build $work/self-built-atom-build" "$work/self-built.img" 2> /dev/null
cmp -s "$work/self-built-atom-build" "$build" || fail "the self-built image carries another atom-build"
for t in build-service server; do
  debugfs -R "cat /etc/atom/templates/$t.toml" "$work/self-built.img" 2> /dev/null | cmp -s - "$stree/etc/atom/templates/$t.toml" ||
    fail "the self-built image's template $t is not the running host's"
done
debugfs -R "cat /usr/lib/atom/release" "$work/self-built.img" 2> /dev/null | grep -qF '2.0.0' ||
  fail "the self-built image's release is not 2.0.0"
ok "built in the image by its own service: build-service 2.0.0 ($(stat -c %s "$work/self-built.img") bytes, SHA-256 checked), with the same atom-build and templates"
# unshare --fork ignores SIGTERM itself: the service, its child, is told.
pkill -TERM -P "$service_pid" 2> /dev/null || true
wait "$service_pid" 2> /dev/null || true

finish

#!/usr/bin/env bash
# Runs every Atom test on a fresh Debian machine, as root: installs the system packages
# the tests use, then lints and runs the whole workspace test suite. Tests that need root,
# loop devices or other tools fail (they never skip) when something is missing. Last, the
# VM tests boot real Debian kernels in qemu through the whole update/rollback path.
#
# Each phase prints its duration; the last line sums up every phase and the tests passed.
# About 30-35 minutes on 2 cores from a cold cargo cache. Usage: bash tests/run-all.sh
set -euo pipefail
# shellcheck source=tests/as-root.sh
source "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."

packages=(e2fsprogs rsync zstd tar util-linux mount fdisk cgpt binutils curl openssl busybox-static systemd
  dosfstools mtools qemu-system-x86 qemu-utils ovmf systemd-boot-efi syslinux syslinux-common isolinux xorriso kmod mmdebstrap casync python3
  socat sudo softhsm2 postgresql python3-aiosmtpd chromium chromium-driver jq)
# shellcheck source=tests/packages.sh
source tests/packages.sh
ensure_packages "${packages[@]}"

log=$(mktemp /tmp/atom-tests.XXXXXX.log)
summary=()
started_all=$SECONDS
# phase NAME COMMAND...: runs one phase, its output also kept in $log for the counts.
phase() {
  local name=$1 started=$SECONDS
  shift
  printf '\n==> %s\n' "$name"
  if ! "$@" 2>&1 | tee -a "$log"; then
    printf '\nFAILED in phase "%s" after %d s (full output: %s)\n' "$name" $((SECONDS - started)) "$log" >&2
    exit 1
  fi
  local took=$((SECONDS - started))
  printf '    (%s: %d s)\n' "$name" "$took"
  summary+=("$name ${took}s")
}
# The VM tests count the steps they checked ("ok ..." lines).
count_ok() { grep -c $'^    \e\\[32mok' "$log" || true; }

phase "cargo fmt --check" cargo fmt --all -- --check
phase "cargo clippy -D warnings" cargo clippy --workspace --all-targets --locked -- -D warnings
phase "cargo build (the integration tests run the other crates' binaries)" cargo build --workspace --locked
phase "cargo test" cargo test --workspace --locked -- --test-threads="$(nproc)"
passed=$(awk '/^test result:/ {for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^passed/) n += $i} END {print n + 0}' "$log")
failed=$(awk '/^test result:/ {for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^failed/) n += $i} END {print n + 0}' "$log")
phase "bootsel static build" bash -c 'bin=$(bash bootsel/build-static.sh) && echo "bootsel (static, for the initramfs): $(stat -c %s "$bin") bytes"'
phase "the sudo path (a user with sudo runs the scripts)" bash tests/sudo-path.sh
phase "fuzzing, 10 s per target (bash tests/fuzz.sh 3600 is the nightly run)" bash tests/fuzz.sh 10
phase "benchmark, small (every number produced, every output verified)" bash tests/bench.sh --small
ok_before=$(count_ok)
phase "VM end-to-end test (tests/vm.sh)" bash tests/vm.sh
phase "VM test of the systemd units under a real systemd (tests/vm-systemd.sh)" bash tests/vm-systemd.sh
vm_steps=$(($(count_ok) - ok_before))

rm -f "$log"
line=$(printf '%s, ' "${summary[@]}")
echo
echo "Screenshots the tests took of the web pages: $PWD/target/test-artifacts/"
echo "ALL PASSED in $((SECONDS - started_all)) s: $passed tests passed, $failed failed; $vm_steps VM steps checked; phases: ${line%, }"

#!/usr/bin/env bash
# Runs every Atom test on a fresh Debian machine, as root: installs the system packages
# the tests use, then lints and runs the whole workspace test suite. Tests that need root,
# loop devices or other tools fail (they never skip) when something is missing. Last, the
# VM test boots a real Debian kernel in qemu through the whole update/rollback path.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(e2fsprogs rsync zstd tar util-linux mount fdisk cgpt binutils curl openssl busybox-static systemd
  dosfstools mtools qemu-system-x86 ovmf systemd-boot-efi kmod mmdebstrap casync python3)
# shellcheck source=tests/packages.sh
source tests/packages.sh
ensure_packages "${packages[@]}"

if [[ $(id -u) -ne 0 ]]; then
  echo "tests/run-all.sh: the tests mount loop devices and must run as root" >&2
  exit 1
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build (the integration tests run the other crates' binaries)"
cargo build --workspace --locked
echo "==> cargo test"
cargo test --workspace --locked -- --test-threads="$(nproc)"
echo "==> bootsel static build"
bootsel_bin=$(bash bootsel/build-static.sh)
echo "bootsel (static, for the initramfs): $(stat -c %s "$bootsel_bin") bytes"
echo "==> fuzzing, short (10 s per target; bash tests/fuzz.sh 3600 is the nightly run)"
bash tests/fuzz.sh 10
echo "==> benchmark, small version (numbers produced, every output verified)"
bash tests/bench.sh --small
echo "==> VM end-to-end test (tests/vm.sh)"
bash tests/vm.sh
echo "==> VM test of the systemd units under a real systemd (tests/vm-systemd.sh)"
bash tests/vm-systemd.sh


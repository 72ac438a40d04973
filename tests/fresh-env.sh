#!/usr/bin/env bash
# The README's two commands, copied verbatim, in a clean Debian 12 root that has only the
# README's prerequisites (a Rust toolchain from rustup, network): a new mmdebstrap root,
# entered with chroot (the kernel's /dev, /proc and /sys bound in, for loop devices and
# qemu). Not part of tests/run-all.sh (it repeats the whole run); run before a release:
#
#   bash tests/fresh-env.sh [demo|tests|both]     (default both; as root)
#
# The root is made under /tmp and removed after a passing run.
set -euo pipefail
# shellcheck source=tests/as-root.sh
source "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
what=${1:-both}
# shellcheck source=tests/packages.sh
source tests/packages.sh
ensure_packages mmdebstrap git

root=$(mktemp -d /tmp/atom-fresh.XXXXXX)
mounted=()
cleanup() {
  local m
  for m in "${mounted[@]}"; do umount -l "$m" 2> /dev/null || true; done
}
trap cleanup EXIT
echo "    (a failed run keeps $root for inspection)"
echo "==> a clean Debian bookworm root in $root (mmdebstrap, the host's apt sources)"
mmdebstrap --variant=apt --include=ca-certificates,curl,git,build-essential,procps,kmod,udev \
  --aptopt='Acquire::Retries "3"' bookworm "$root"
if ! grep -rqs bookworm-security "$root/etc/apt/sources.list" "$root/etc/apt/sources.list.d"; then
  echo "deb http://deb.debian.org/debian-security bookworm-security main" > "$root/etc/apt/sources.list.d/security.list"
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
# This machine's network as it is: where a TLS-inspecting proxy sits in the way, its CA is
# in the host's bundle, and the clean root needs it to reach crates.io at all.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
for m in dev dev/pts proc sys; do
  mount --bind "/$m" "$root/$m"
  mounted=("$root/$m" "${mounted[@]}")
done
mkdir -p "$root/tmp" && chmod 1777 "$root/tmp"
echo "==> the repository, as a clone of this one's HEAD"
git clone --quiet "$PWD" "$root/root/atom"
echo "==> Rust from rustup (the README's prerequisite)"
if ! chroot "$root" /bin/bash -o pipefail -c "curl --proto '=https' -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy"; then
  # Where rustup's servers are out of reach (only package registries allowed), the
  # toolchain rustup installed on this machine is copied in: the same prerequisite.
  echo "    rustup unreachable; copying this machine's rustup toolchain into the clean root"
  mkdir -p "$root/root/.cargo"
  cp -a "${RUSTUP_HOME:-$HOME/.rustup}" "$root/root/.rustup"
  cp -a "${CARGO_HOME:-$HOME/.cargo}/bin" "$root/root/.cargo/bin"
  printf 'export PATH="$HOME/.cargo/bin:$PATH"\n' > "$root/root/.cargo/env"
fi
run() { # the README command, verbatim, as root in the clean root
  echo "==> in the clean root: $1"
  chroot "$root" /bin/bash -lc ". \$HOME/.cargo/env && cd /root/atom && $1"
}
case $what in
  demo) run "bash tests/vm.sh" ;;
  tests) run "bash tests/run-all.sh" ;;
  both) run "bash tests/vm.sh" && run "bash tests/run-all.sh" ;;
  *) echo "usage: bash tests/fresh-env.sh [demo|tests|both]" >&2; exit 2 ;;
esac
cleanup
trap - EXIT
rm -rf "$root"
echo "==> the README commands passed in a clean root ($what)"

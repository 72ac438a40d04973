#!/usr/bin/env bash
# The Atom benchmark: Atom's three routes against rsync, zstd --patch-from and casync on
# the same image pairs, one table per pair (see tests/bench.py for what is measured).
#
#   sudo bash tests/bench.sh          Debian images from mmdebstrap, 1 GiB slots (release
#                                     build; about half an hour)
#   sudo bash tests/bench.sh --small  busybox trees, 64 MiB slots: the CI check that every
#                                     number is produced and every output verifies
# Extra arguments go to bench.py (e.g. --work DIR).
set -euo pipefail
# shellcheck source=tests/as-root.sh
source "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
packages=(rsync zstd casync mmdebstrap e2fsprogs util-linux fdisk cgpt busybox-static python3)
# shellcheck source=tests/packages.sh
source tests/packages.sh
ensure_packages "${packages[@]}"
[[ $(id -u) == 0 ]] || { echo "bench.sh: run as root (loop devices)" >&2; exit 1; }
if [[ ${1:-} == --small ]]; then
  # Numbers and verification only: the debug build the test run already made will do.
  cargo build --locked -p atom-build -p atom-update -p atom-dist
  bin=target/debug
else
  cargo build --locked --release -p atom-build -p atom-update -p atom-dist
  bin=target/release
fi
exec python3 tests/bench.py --bin-dir "$bin" "$@"

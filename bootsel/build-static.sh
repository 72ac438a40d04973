#!/usr/bin/env bash
# Builds a static executable and prints its path: bootsel (default) for the initramfs,
# where it runs as PID 1 before any library exists, or another workspace binary (e.g.
# atom-update) for a minimal OS image without a C library.
# Usage: bash bootsel/build-static.sh [PACKAGE]
set -euo pipefail
cd "$(dirname "$0")/.."
package=${1:-bootsel}
target=$(rustc -vV | sed -n 's/^host: //p')
# bootsel goes into every initramfs: built for size (profile initramfs, full LTO). The others
# are built for speed of building (profile static, see Cargo.toml).
profile=static
[[ $package == bootsel ]] && profile=initramfs
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked -p "$package" --profile "$profile" --target "$target" --target-dir target/static
bin="target/static/$target/$profile/$package"
if readelf -d "$bin" | grep -q NEEDED; then
  echo "build-static.sh: $bin needs shared libraries" >&2
  exit 1
fi
echo "$PWD/$bin"

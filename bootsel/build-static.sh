#!/usr/bin/env bash
# Builds bootsel as a static executable for the initramfs and prints its path.
# It runs as PID 1 before any library exists, so it must not be dynamically linked.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked -q -p bootsel --profile initramfs --target "$target" --target-dir target/static
bin="target/static/$target/initramfs/bootsel"
if readelf -d "$bin" | grep -q NEEDED; then
  echo "build-static.sh: $bin needs shared libraries" >&2
  exit 1
fi
echo "$PWD/$bin"

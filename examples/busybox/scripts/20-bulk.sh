#!/bin/sh
# On the build host: bulk that stays the same between versions, like most of a real OS
# (slices of the busybox binary), so the deltas between versions have something to skip.
set -eu
mkdir -p "$ATOM_ROOT/usr/share/sample"
for i in $(seq 1 20); do
  head -c 200000 "$ATOM_ROOT/bin/busybox" | tail -c $((1000 * i)) > "$ATOM_ROOT/usr/share/sample/blob$i"
done

#!/usr/bin/env bash
# The Atom demo without a VM: sign, build, publish and audit a sample OS, serve
# it with atom-dist, and update a host disk (a loop device) with atom-update; boots are
# simulated with `bootsel choose` (tests/vm.sh boots them for real in qemu).
# Run as root on a fresh Debian machine: bash tests/demo-loop.sh [WORKDIR]
set -euo pipefail
# shellcheck source=tests/as-root.sh
source "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
# shellcheck source=tests/workdir.sh
source "$(dirname "$0")/workdir.sh"
work_prefix=demo work_args "$@"
mkdir -p "$work"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

packages=(e2fsprogs rsync zstd busybox-static fdisk util-linux cgpt)
# shellcheck source=tests/packages.sh
source tests/packages.sh
ensure_packages "${packages[@]}"

step "building atom-build, atom-dist, atom-update and bootsel (release)"
cargo build --release --locked --workspace
build=$PWD/target/release/atom-build
dist=$PWD/target/release/atom-dist
update=$PWD/target/release/atom-update
bootsel=$PWD/target/release/bootsel

sample_root() { # DIR VERSION
  local root=$1 version=$2
  rm -rf "$root"
  mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,var,usr/share/doc/sample}
  cp /bin/busybox "$root/bin/busybox"
  for tool in sh ls cat mount umount echo sleep reboot poweroff; do ln -s busybox "$root/bin/$tool"; done
  ln -s ../bin/busybox "$root/sbin/init"
  printf 'NAME="Atom sample OS"\nVERSION_ID=%s\n' "$version" > "$root/etc/os-release"
  printf 'Welcome to the Atom sample OS %s\n' "$version" > "$root/etc/motd"
  # Some bulk that stays the same between versions, like most of a real OS.
  for i in $(seq 1 40); do head -c 200000 /bin/busybox | tail -c $((1000 * i)) > "$root/usr/share/doc/sample/blob$i"; done
}

step "generating a signing key"
rm -f "$work"/signer.key "$work"/signer.pub
"$build" keygen --out "$work/signer"

step "building sample OS 1.0.0 (reproducible ext4 image)"
sample_root "$work/root-v1" 1.0.0
"$build" image --kernel none --rootfs "$work/root-v1" --version 1.0.0 --size 128M --out "$work/v1.img"

step "building sample OS 2.0.0 on top of 1.0.0 (--base: unchanged files keep their blocks)"
sample_root "$work/root-v2" 2.0.0
echo "new in 2.0.0" > "$work/root-v2/etc/feature"
"$build" image --kernel none --rootfs "$work/root-v2" --version 2.0.0 --size 128M --out "$work/v2.img" --base "$work/v1.img"
python3 - "$work/v1.img" "$work/v2.img" <<'PY'
import sys
a, b = (open(p, "rb").read() for p in sys.argv[1:3])
n = len(a) // 4096
diff = sum(a[i*4096:(i+1)*4096] != b[i*4096:(i+1)*4096] for i in range(n))
print(f"    {diff} of {n} 4 KiB blocks differ between v1 and v2 ({100*diff/n:.2f}%)")
PY

step "publishing both into a repository (channel stable)"
rm -rf "$work/repo"
"$build" publish --repo "$work/repo" --channel stable --key "$work/signer.key" "$work/v1.img"
"$build" publish --repo "$work/repo" --channel stable --key "$work/signer.key" "$work/v2.img"

step "the signed channel manifest"
cat "$work/repo/channels/stable/manifest.toml"

step "history of the channel"
"$build" history --repo "$work/repo" --channel stable

step "auditing the repository"
"$build" verify --repo "$work/repo" --key "$work/signer.pub"

step "tampering with a copy of the repository: one byte of the payload"
rm -rf "$work/tampered" && cp -a "$work/repo" "$work/tampered"
payload="$work/tampered/$(sed -n 's/^path = "\(objects\/.*\)"/\1/p' "$work/repo/channels/stable/manifest.toml")"
printf '\x00' | dd of="$payload" bs=1 seek=1000 conv=notrunc status=none
if "$build" verify --repo "$work/tampered" --key "$work/signer.pub"; then
  echo "tampering went unnoticed" >&2; exit 1
else
  echo "    (verify exited $? and named the problem)"
fi

step "a host disk: GPT with root-a (1.0.0, booted, good) and root-b (empty)"
rm -f "$work/disk.img"
truncate -s 300M "$work/disk.img"
printf 'label: gpt\nsize=4MiB, name=esp\nsize=136MiB, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name=root-a\nsize=136MiB, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name=root-b\nname=state\n' \
  | sfdisk --quiet "$work/disk.img"
loopdev=$(losetup -f --show "$work/disk.img")
server_pid=""
cleanup() { [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null; losetup -d "$loopdev" 2>/dev/null || true; }
trap cleanup EXIT
dd if="$work/v1.img" of="$loopdev" bs=1M seek=5 conv=notrunc,fsync status=none
"$bootsel" set --disk "$loopdev" --slot A --priority 1 --tries 0 --successful 1 >/dev/null
"$bootsel" status --disk "$loopdev"

step "serving the repository with atom-dist on 127.0.0.1"
: > "$work/dist.out" # before the child opens it: the reads below must find it
"$dist" serve --repo "$work/repo" --listen 127.0.0.1:0 --cache "$work/dist-cache" > "$work/dist.out" 2> "$work/dist.log" &
server_pid=$!
for _ in $(seq 50); do grep -q listening "$work/dist.out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/.*listening on //p' "$work/dist.out")
echo "    $url"

# What bootsel leaves in /run at boot, and the image's release file: simulated here.
booted() { # SLOT VERSION
  printf 'slot = "%s"\nlabel = "root-%s"\npartition = %s\npartuuid = "demo"\ndisk = "%s"\nreason = "demo"\ntrial = false\ntries_left = 0\nstate = "none"\n' \
    "$1" "${1,,}" "$([[ $1 == A ]] && echo 2 || echo 3)" "$loopdev" > "$work/boot.toml"
  printf 'version = "%s"\nboard = "x86_64-generic"\n' "$2" > "$work/release"
}
mkdir -p "$work/keys" && cp "$work/signer.pub" "$work/keys/"
cat > "$work/update.toml" <<EOF2
repositories = ["$url"]
channel = "stable"
board = "x86_64-generic"
keys_dir = "$work/keys"
state_dir = "$work/agent-state"
boot_record = "$work/boot.toml"
release_file = "$work/release"
EOF2
rm -rf "$work/agent-state"
booted A 1.0.0
au() { "$update" --config "$work/update.toml" "$@"; }

step "atom-update check, then now (running 1.0.0 from slot A)"
au check || true
au now
au status

step "reboot (simulated): bootsel picks B on trial, 2.0.0 passes its health checks"
"$bootsel" choose --disk "$loopdev"
booted B 2.0.0
au mark-good
au status

step "3.0.0 is published; it will fail to boot (simulated: never marked good)"
"$build" image --kernel none --rootfs "$work/root-v2" --version 3.0.0 --size 128M --out "$work/v3.img" --base "$work/v2.img"
"$build" publish --repo "$work/repo" --channel stable --key "$work/signer.key" "$work/v3.img"
au now
for attempt in 1 2 3; do
  echo "    boot attempt $attempt:"
  "$bootsel" choose --disk "$loopdev" | sed 's/^/      /'
done
echo "    next boot, after the tries ran out:"
"$bootsel" choose --disk "$loopdev" | sed 's/^/      /'
"$bootsel" status --disk "$loopdev"

step "done"
cleanup
trap - EXIT
work_done

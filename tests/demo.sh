#!/usr/bin/env bash
# The Atom demo, as far as it is built: sign, build, publish and audit a sample OS.
# (Serving, updating a host, rebooting and rolling back are not built yet: see README.)
# Run as root on a fresh Debian machine: bash tests/demo.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d /tmp/atom-demo.XXXXXX)}
mkdir -p "$work"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

packages=(e2fsprogs rsync zstd busybox-static)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  step "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

step "building atom-build (release)"
cargo build --release --locked -p atom-build
build=$PWD/target/release/atom-build

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
"$build" image --rootfs "$work/root-v1" --version 1.0.0 --size 128M --out "$work/v1.img"

step "building sample OS 2.0.0 on top of 1.0.0 (--base: unchanged files keep their blocks)"
sample_root "$work/root-v2" 2.0.0
echo "new in 2.0.0" > "$work/root-v2/etc/feature"
"$build" image --rootfs "$work/root-v2" --version 2.0.0 --size 128M --out "$work/v2.img" --base "$work/v1.img"
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

step "done; files are in $work"

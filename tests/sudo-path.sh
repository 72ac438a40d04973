#!/usr/bin/env bash
# The README's commands work for a user with sudo as well as for root: run as a fresh
# unprivileged user (with passwordless sudo, and a "cargo" only on that user's PATH), an
# entry script must run itself again as root and still find that cargo. Run as root; it
# makes the user and removes it again.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "sudo-path.sh: run as root (it creates a test user)" >&2; exit 1; }
command -v sudo > /dev/null || { echo "sudo-path.sh: needs sudo (package sudo)" >&2; exit 1; }

user=atom-sudo-test
home=$(mktemp -d /tmp/atom-sudo-home.XXXXXX)
cleanup() {
  userdel "$user" 2> /dev/null || true
  rm -f /etc/sudoers.d/atom-sudo-test
  rm -rf "$home"
}
trap cleanup EXIT
cleanup
mkdir -p "$home"
useradd --home-dir "$home" --no-create-home --shell /bin/bash "$user"
echo "$user ALL=(ALL) NOPASSWD: ALL" > /etc/sudoers.d/atom-sudo-test
chmod 440 /etc/sudoers.d/atom-sudo-test
# A cargo only this user's PATH knows (as rustup installs it in ~/.cargo/bin).
mkdir -p "$home/.cargo/bin" "$home/repo/tests"
printf '#!/bin/sh\necho "the user'"'"'s cargo"\n' > "$home/.cargo/bin/cargo"
chmod 755 "$home/.cargo/bin/cargo"
# A probe that starts the way every entry script starts.
cp tests/as-root.sh "$home/repo/tests/"
cat > "$home/repo/tests/probe.sh" << 'EOF'
#!/usr/bin/env bash
set -euo pipefail
source "$(dirname "$0")/as-root.sh"
echo "uid $(id -u); cargo: $(cargo); CARGO_HOME=$CARGO_HOME; args: $*"
EOF
chown -R "$user" "$home"
out=$(su - "$user" -c "export PATH=$home/.cargo/bin:\$PATH; cd $home/repo && bash tests/probe.sh one 'two words'" 2>&1)
echo "$out" | sed 's/^/    | /'
grep -q "not root; running again through sudo" <<< "$out" || { echo "FAIL: no re-run through sudo" >&2; exit 1; }
grep -q "^uid 0; cargo: the user's cargo; CARGO_HOME=$home/.cargo; args: one two words$" <<< "$out" ||
  { echo "FAIL: not root, or the user's cargo, CARGO_HOME or the arguments were lost" >&2; exit 1; }
echo "    ok: run as $user, the script ran again as root with the user's cargo and arguments"

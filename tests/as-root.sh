# Sourced first by every test, demo and benchmark entry script: they need root (loop
# devices, mounts, apt-get). Run by a user with sudo, the script runs itself again through
# sudo, keeping the user's PATH and Rust toolchain (CARGO_HOME, RUSTUP_HOME), which sudo
# would otherwise reset. Usage: source "$(dirname "$0")/as-root.sh"
if [[ $(id -u) -ne 0 ]]; then
  if ! command -v sudo > /dev/null; then
    echo "$(basename "$0"): run this as root (there is no sudo here to do it for you)" >&2
    exit 1
  fi
  echo "$(basename "$0"): not root; running again through sudo" >&2
  exec sudo env "PATH=$PATH" "CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}" \
    "RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}" bash "$0" "$@"
fi

# Sourced by the test, demo and benchmark scripts: installs the Debian packages a script
# needs, only those not yet installed (one apt-get update, only when something is missing).
# Installing one package can remove another that was installed (a newer qemu-utils from
# backports that the main suite's qemu-system-x86 breaks), so what is missing is checked
# again after each install, and a package still missing after two rounds is an error.
# Usage: ensure_packages PACKAGE...
missing_packages() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
ensure_packages() {
  local missing round updated=
  for round in 1 2 3; do
    mapfile -t missing < <(missing_packages "$@")
    ((${#missing[@]})) || return 0
    if ((round == 3)); then
      echo "ensure_packages: still not installed after two rounds: ${missing[*]}" >&2
      return 1
    fi
    printf '==> installing %s\n' "${missing[*]}"
    [[ -n $updated ]] || DEBIAN_FRONTEND=noninteractive apt-get update -q
    updated=1
    # One line per package fetched, unpacked, set up or removed: a long install is never silent.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" |
      { grep -E "^(Get:|Unpacking|Setting up|Removing)" || true; } | sed 's/^/    /'
  done
}

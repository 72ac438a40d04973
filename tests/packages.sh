# Sourced by the test, demo and benchmark scripts: installs the Debian packages a script
# needs, only those not yet installed (one apt-get update, only when something is missing).
# Usage: ensure_packages PACKAGE...
ensure_packages() {
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  printf '==> installing %s\n' "${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  # One line per package fetched, unpacked and set up: a long install is never silent.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" |
    { grep -E "^(Get:|Unpacking|Setting up)" || true; } | sed 's/^/    /'
}

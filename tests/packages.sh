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
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

#!/usr/bin/env bash
# Fuzzes every parser of outside input with cargo-fuzz (libFuzzer + AddressSanitizer):
# manifest + release file, signature file, delta (zstd + apply), the rsync signature body
# atom-dist accepts, the GPT as bootsel reads it, bootsel's config and kernel command line,
# keys.toml and channel timestamps (key roles).
#
#   bash tests/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 60 s, every target)
#
# Nightly-style: bash tests/fuzz.sh 3600. Crashes are saved under fuzz/artifacts/<target>/
# and make this script exit non-zero; the corpus grows in fuzz/corpus/<target>/.
# The machine's toolchain is stable: RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the
# sanitizer flags it needs.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
targets=("$@")
((${#targets[@]})) || mapfile -t targets < <(cargo fuzz list)
export RUSTC_BOOTSTRAP=1
# Short runs (CI's 10 s per target) build without optimization: the optimized sanitizer
# build took 300 s of a 380 s CI phase, the unoptimized one about 110 s. Longer runs use
# cargo-fuzz's optimized default, where executions per second matter.
mode=()
((seconds >= 60)) || mode=(--dev)
failed=()
for t in "${targets[@]}"; do
  echo "==> fuzzing $t for ${seconds}s"
  mkdir -p "corpus/$t"
  log=$(mktemp)
  if cargo fuzz run "${mode[@]}" "$t" "corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    grep -E "^stat::number_of_executed_units|^#[0-9]+ *DONE" "$log" | sed 's/^/    /' || true
  else
    grep -E "ERROR|SUMMARY|panicked|Test unit written|error(\[|:)" "$log" | head -20 | sed 's/^/    /' || tail -20 "$log"
    failed+=("$t")
  fi
  rm -f "$log"
done
if ((${#failed[@]})); then
  echo "fuzz.sh: crashes in: ${failed[*]} (see fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz.sh: no crashes in ${targets[*]}"

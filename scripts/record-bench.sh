#!/usr/bin/env bash
# Records one `hla bench` run in bench/results/:
#   cpu-<machine>-<date>.json   the JSON records (hla bench --json-out)
#   cpu-<machine>-<date>.md     machine (lscpu model, cores), date, commit, command, and the table
# Usage: scripts/record-bench.sh [hla bench options...]     (default: the full default bench)
# Environment: BUILD (build folder, default build), HLA (the binary, default $BUILD/hla),
#              HLA_MACHINE (the <machine> part of the name, default from the CPU model and core count).
# Run it on an otherwise idle machine: the numbers are wall-clock times.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build}
HLA=${HLA:-$BUILD/hla}
if [ ! -x "$HLA" ]; then
  echo "record-bench: $HLA not found; build it first (make build)" >&2
  exit 1
fi

model=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)
model=${model:-unknown CPU}
cores=$(nproc)
slug=$(printf '%s' "$model" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
machine=${HLA_MACHINE:-${slug}-${cores}c}
date=$(date -u +%Y-%m-%d)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ "$commit" != unknown ] && ! git diff --quiet HEAD -- src include 2>/dev/null; then
  commit="$commit (with uncommitted changes in src/ or include/)"
fi

mkdir -p bench/results
base=bench/results/cpu-${machine}-${date}
# A second run on the same day gets the time appended instead of overwriting the first.
[ -e "$base.json" ] && base=${base}-$(date -u +%H%M)

table=$(mktemp)
trap 'rm -f "$table"' EXIT
"$HLA" bench --json-out "$base.json" "$@" > "$table"

{
  echo "# hla bench — $machine — $date"
  echo
  family=$(lscpu | sed -n 's/^CPU family:[[:space:]]*//p' | head -n 1)
  cpumodel=$(lscpu | sed -n 's/^Model:[[:space:]]*//p' | head -n 1)
  tpc=$(lscpu | sed -n 's/^Thread(s) per core:[[:space:]]*//p' | head -n 1)
  avx512=no
  grep -qw avx512f /proc/cpuinfo && avx512=yes
  echo "- machine: $model (family $family, model $cpumodel), $cores cores, $tpc thread(s) per core, AVX-512: $avx512"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- commit: $commit"
  echo "- command: \`$HLA bench $*\`"
  echo "- JSON records: [$(basename "$base.json")]($(basename "$base.json"))"
  echo
  echo '```'
  cat "$table"
  echo '```'
} > "$base.md"

cat "$table"
echo
echo "record-bench: wrote $base.json and $base.md"

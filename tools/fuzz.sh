#!/usr/bin/env bash
# Runs every fuzz target (tools/fuzz/targets.py) under atheris for SECONDS each (default 60), from
# the seed corpus in tools/fuzz/corpus/, niced. New inputs and crash artifacts go under
# $FUZZ_WORK (default build/fuzz). Prints each target's executions and coverage; exits non-zero
# when a target found a crash, an unexpected exception or a hang.
#
#   tools/fuzz.sh [SECONDS] [TARGET ...]        e.g. tools/fuzz.sh 600 pllm request
#   FUZZ_RUNS=100000 tools/fuzz.sh 0 template   # a number of executions instead of a time
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then targets=(pllm gguf tokenizer template request); fi
work="${FUZZ_WORK:-build/fuzz}"
python="${PYTHON:-python}"
status=0
for target in "${targets[@]}"; do
  mkdir -p "$work/corpus/$target" "$work/crashes"
  limit=(-max_total_time="$seconds")
  if [ -n "${FUZZ_RUNS:-}" ]; then limit=(-runs="$FUZZ_RUNS"); fi
  log="$work/$target.log"
  if nice -n 19 "$python" tools/fuzz/run.py "$target" "${limit[@]}" -timeout=20 -rss_limit_mb=4096 \
      -print_final_stats=1 -artifact_prefix="$work/crashes/$target-" \
      "$work/corpus/$target" "tools/fuzz/corpus/$target" >"$log" 2>&1; then
    result=ok
  else
    result="FAILED (see $log and $work/crashes/)"
    status=1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo "?")
  echo "$target: $result, $runs executions, coverage $cov edges"
done
exit $status

#!/usr/bin/env bash
# GPU readiness in one bounded run (an H100/H200 in at most 8 minutes), then a dated entry in bench/RESULTS.md.
#
# Usage (from anywhere; run on the GPU machine after `pip install -e ".[dev]"`):
#   bash bench/gpu_check.sh                 # the real run; appends to bench/RESULTS.md
#   bash bench/gpu_check.sh --dry-run       # the same steps on the CPU at tiny sizes (CI); writes no RESULTS.md entry
#   bash bench/gpu_check.sh --budget 600    # another total budget in seconds (default 480)
#
# Steps, in order, each under its own `timeout` and skipped when the budget is spent (a step never gets more than
# what is left, minus a reserve for the record; the dry run lets each step use all of that):
#   1. kernels       every kernel against its reference in bf16/fp16/fp32 at odd sizes, gradients included
#                    (python -m bench kernel_check)
#   2. attention     TFLOP/s forward and backward at the Wan shapes against SDPA flash/efficient/cuDNN and
#                    flash-attn when importable (python -m bench.gpu_check attention)
#   3. memory-bound  the GRPO step/loss kernels as a fraction of measured device copy bandwidth, group advantages
#                    (python -m bench grpo_ops)
#   4. e2e           one reduced GRPO epoch, idgrpo path against the baseline mode (python -m bench.gpu_check e2e)
#   5. record        the dated entry (device, driver, versions, commit, every step's table)
# Logs and JSON land in bench/results/gpu_check-<date>/ (IDGRPO_GPU_CHECK_DIR overrides it). Exit 0 when every
# step passed, 1 when one failed, timed out or was skipped.
set -u
cd "$(dirname "$0")/.."

budget=480
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --budget) budget="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

start=$(date +%s)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
run_dir="${IDGRPO_GPU_CHECK_DIR:-bench/results/gpu_check-$stamp}"
mkdir -p "$run_dir"
: > "$run_dir/steps.tsv"
export IDGRPO_BENCH_DIR="$run_dir"  # every benchmark writes its JSON here
quick=()
record_args=()
if [ "$dry_run" = 1 ]; then
  quick=(--quick)
  record_args=(--quick --results "$run_dir/RESULTS.dry-run.md")  # CPU timings are never recorded in RESULTS.md
  export CUDA_VISIBLE_DEVICES=""  # the dry run is the CPU path, even on a GPU machine
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
elif ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA device visible; use --dry-run on a machine without a GPU" >&2
  exit 2
fi
record_reserve=20
failed=0

# step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS (less when less budget is left), log and time it.
step() {
  local name="$1" want="$2"
  shift 2
  local left=$(( budget - record_reserve - ($(date +%s) - start) ))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, ${left}s of the ${budget}s budget left"
    printf '%s\tskipped\t0\n' "$name" >> "$run_dir/steps.tsv"
    failed=1
    return
  fi
  # The per-step shares are sized for the GPU; the dry run's CPU steps only need to finish within the budget.
  [ "$dry_run" = 1 ] && want="$left"
  local limit=$(( want < left ? want : left ))
  echo "== $name (at most ${limit}s): $*"
  local t0
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$run_dir/$name.log"
  local rc="${PIPESTATUS[0]}"
  local status="ok"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status="timed out"
  elif [ "$rc" != 0 ]; then
    status="failed (exit $rc)"
  fi
  [ "$status" = ok ] || failed=1
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$run_dir/steps.tsv"
}

step kernels 200 python -m bench kernel_check "${quick[@]}"
step attention 110 python -m bench.gpu_check attention "${quick[@]}"
step memory-bound 40 python -m bench grpo_ops "${quick[@]}"
step e2e 110 python -m bench.gpu_check e2e "${quick[@]}"

echo "== record"
timeout 60 python -m bench.gpu_check record "$run_dir" "${record_args[@]}" || failed=1
echo "== gpu_check: $(( $(date +%s) - start ))s of ${budget}s; steps:"
sed 's/^/   /' "$run_dir/steps.tsv"
exit "$failed"

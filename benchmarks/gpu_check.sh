#!/usr/bin/env bash
# `make gpu-check`: the whole GPU run in one call, sized for a borrowed GPU machine (one command
# of at most 10 minutes, nothing installable, a few files returned from one folder).
#
# Stages, in this order, each timed and under its own time limit, all within GPU_CHECK_BUDGET_S
# seconds (default 480; a stage that would start with less than 10 s left is skipped):
#   build      the CUDA extension in place with every core (MAX_JOBS), for this GPU's architecture
#              (TORCH_CUDA_ARCH_LIST overrides), and a check that the CUDA kernels are registered
#   check      python -m saf_kernels.check on cuda and cpu, the cuda and triton backends required
#   plan_cache tests/test_plan_cache.py: graph capture with forced plan-cache misses, two-stream reuse
#   memcheck   compute-sanitizer --tool memcheck on benchmarks/gpu_kernels_once.py (every CUDA kernel once)
#   racecheck  compute-sanitizer --tool racecheck on the same
#   tests      pytest -m "(cuda or triton) and not slow" on the GPU
#   bench      python -m saf_kernels.bench ($BENCH_ARGS, default --quick)
#
# Everything goes to OUT_DIR (default benchmarks/results/gpu-check-<device>-<date>), never more
# than 8 files: gpu_check.log (all output, stage by stage, with times), summary.json (device,
# commit, date, versions, each stage's status, exit code, seconds and last lines), check.json,
# tests.xml (JUnit of the GPU tests), bench.json and bench.txt.
#
# Exit status: 0 every stage passed; 1 a stage failed or ran out of time; 2 no CUDA device here
# (every stage is skipped: nothing GPU-side was checked). GPU_CHECK_DRY_RUN=1 prints each stage's
# command without running it (how CI checks the wiring on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
DRY=${GPU_CHECK_DRY_RUN:-0}
JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
WORK=$(mktemp -d)  # per-stage scratch, outside OUT_DIR (which must hold few files)
trap 'rm -rf "$WORK"' EXIT

now() { date +%s.%N; }

# Device: name and compute capability, or nothing.
read -r GPU_NAME GPU_ARCH < <("$PY" -c "import torch
if torch.cuda.is_available():
    c = torch.cuda.get_device_capability(0)
    print(torch.cuda.get_device_name(0).replace(' ', '-'), f'{c[0]}.{c[1]}')" 2>/dev/null) || true
if [[ -z ${OUT_DIR:-} ]]; then
  if [[ -n ${GPU_NAME:-} ]]; then
    OUT_DIR=benchmarks/results/gpu-check-${GPU_NAME}-$(date -u +%Y-%m-%d)
  else
    OUT_DIR=${TMPDIR:-/tmp}/saf-gpu-check
  fi
fi
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_check.log
: >"$LOG"
: >"$WORK/stages.tsv"

say() { echo "$*" | tee -a "$LOG"; }

# stage NAME LIMIT CMD...: runs CMD (output to the log) under min(LIMIT, budget left) seconds.
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  local cmd="$*"
  if [[ $SKIP_ALL != "" ]]; then
    printf '%s\tskip\t\t0\t%s\t%s\n' "$name" "$limit" "$SKIP_ALL" >>"$WORK/stages.tsv"
    say "== $name: skipped ($SKIP_ALL)"
    return 0
  fi
  if ((left < 10)); then
    printf '%s\tskip\t\t0\t%s\t%s\n' "$name" "$limit" "time budget spent" >>"$WORK/stages.tsv"
    say "== $name: skipped (time budget of ${BUDGET}s spent)"
    return 0
  fi
  ((limit > left)) && limit=$left
  say "== $name (limit ${limit}s): $cmd"
  if [[ $DRY == 1 ]]; then
    printf '%s\tdry\t\t0\t%s\t%s\n' "$name" "$limit" "$cmd" >>"$WORK/stages.tsv"
    return 0
  fi
  local t0 rc status secs
  t0=$(now)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$WORK/$name.out" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  cat "$WORK/$name.out" >>"$LOG"
  case $rc in
    0) status=pass ;;
    124 | 137) status=timeout ;;
    *) status=fail ;;
  esac
  [[ $status == pass ]] || FAILED=1
  # The last lines (pytest's summary, the sanitizer's ERROR SUMMARY) for summary.json.
  local tail_lines
  tail_lines=$( (grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|error" "$WORK/$name.out" || tail -n 2 "$WORK/$name.out") | tail -n 3 | tr '\t\n' '  ')
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$limit" "$tail_lines" >>"$WORK/stages.tsv"
  say "-- $name: $status (exit $rc) in ${secs}s"
}

FAILED=0
SKIP_ALL=""
if [[ -z ${GPU_NAME:-} && $DRY != 1 ]]; then
  SKIP_ALL="no CUDA device (torch.cuda.is_available() is False): nothing GPU-side was checked"
fi
say "saf_kernels gpu-check: device ${GPU_NAME:-none} (sm ${GPU_ARCH:-?}), $JOBS jobs, budget ${BUDGET}s, results in $OUT_DIR"

SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null || true)
SAN_ARGS=(--error-exitcode 1 --print-limit 50)
if [[ -n $SANITIZER ]] && "$SANITIZER" --help 2>/dev/null | grep -q -- "--kernel-name "; then
  SAN_ARGS+=(--kernel-name kns=saf)  # instrument this library's kernels only (namespace saf::cuda)
fi

stage build 240 bash -c "SAF_KERNELS_BUILD=cuda MAX_JOBS=$JOBS TORCH_CUDA_ARCH_LIST='${TORCH_CUDA_ARCH_LIST:-${GPU_ARCH:-9.0}}' \
  $PY setup.py build_ext --inplace && $PY -c 'from saf_kernels import _backend as b; assert b.has_cuda_kernels(), \"no CUDA kernels registered\"; print(\"CUDA kernels: registered\")'"
stage check 90 "$PY" -m saf_kernels.check --device cuda --device cpu --require cuda --require triton --json "$OUT_DIR/check.json"
stage plan_cache 60 "$PY" -m pytest tests/test_plan_cache.py -q -rA -p no:cacheprovider
if [[ -z $SANITIZER && -z $SKIP_ALL && $DRY != 1 ]]; then
  printf 'memcheck\tfail\t\t0\t0\tcompute-sanitizer not found\nracecheck\tfail\t\t0\t0\tcompute-sanitizer not found\n' \
    >>"$WORK/stages.tsv"
  say "== memcheck, racecheck: FAILED: compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"
  FAILED=1
else
  SAN=${SANITIZER:-compute-sanitizer}
  stage memcheck 75 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck "${SAN_ARGS[@]}" \
    "$PY" benchmarks/gpu_kernels_once.py
  stage racecheck 75 "$SAN" --tool racecheck "${SAN_ARGS[@]}" "$PY" benchmarks/gpu_kernels_once.py
fi
stage tests 180 "$PY" -m pytest tests -m "(cuda or triton) and not slow" -q -rfEs -p no:cacheprovider --durations=10 \
  --ignore=tests/test_plan_cache.py --junitxml="$OUT_DIR/tests.xml"
stage bench 90 bash -c "$PY -m saf_kernels.bench --no-progress --json '$OUT_DIR/bench.json' ${BENCH_ARGS:---quick} | tee '$OUT_DIR/bench.txt'"

# summary.json: where, what, when, and every stage.
"$PY" - "$WORK/stages.tsv" "$OUT_DIR/summary.json" "$BUDGET" "$(($(date +%s) - START))" "$DRY" <<'EOF' 2>>"$LOG" || FAILED=1
import datetime, json, os, platform, subprocess, sys
tsv, out, budget, total, dry = sys.argv[1:]
stages = []
for line in open(tsv):
    name, status, rc, secs, limit, info = (line.rstrip("\n").split("\t") + [""] * 6)[:6]
    stages.append(dict(stage=name, status=status, exit_code=int(rc) if rc else None, seconds=float(secs or 0),
                       limit_s=int(limit or 0), info=info.strip()))
facts = {}
try:
    import torch
    facts.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    if torch.cuda.is_available():
        facts.update(device=torch.cuda.get_device_name(0),
                     capability=".".join(map(str, torch.cuda.get_device_capability(0))))
except Exception as e:  # noqa: BLE001
    facts["torch_error"] = repr(e)
try:
    import importlib.metadata as md
    facts["triton"] = md.version("triton")
except Exception:  # noqa: BLE001
    facts["triton"] = None
commit = os.environ.get("GIT_COMMIT")
if not commit:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = "unknown"
ok = all(s["status"] in ("pass", "dry") for s in stages)
json.dump(dict(commit=commit, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               python=platform.python_version(), budget_s=int(budget), total_s=int(total), dry_run=dry == "1",
               ok=ok, **facts, stages=stages), open(out, "w"), indent=1)
EOF
say "== summary: $OUT_DIR/summary.json"
column -t -s $'\t' "$WORK/stages.tsv" 2>/dev/null | cut -c1-160 | tee -a "$LOG" || cat "$WORK/stages.tsv"
if [[ -n $SKIP_ALL ]]; then
  say "gpu-check: $SKIP_ALL"
  exit 2
fi
if ((FAILED)); then
  say "gpu-check: FAILED (see $LOG)"
  exit 1
fi
if [[ $DRY == 1 ]]; then
  say "gpu-check: dry run, nothing was run ($(($(date +%s) - START))s)"
  exit 0
fi
say "gpu-check: OK in $(($(date +%s) - START))s"

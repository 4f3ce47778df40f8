#!/usr/bin/env bash
# `make gpu-check`: on a CUDA machine where nothing can be installed (torch with CUDA, nvcc,
# Triton, pytest and pytest-benchmark already there). Builds the CUDA extension in place, runs
# the cuda and triton tests on the GPU, runs the benchmark report and the pytest-benchmark
# suites, and writes benchmarks/results/<device>-<date>.{json,txt,png} plus the test log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

device=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))") || { echo "no CUDA device"; exit 1; }
stamp="$OUT_DIR/${device}-$(date -u +%Y-%m-%d)"
status=0

echo "== build (CUDA) =="
SAF_KERNELS_BUILD=cuda MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace 2>&1 | tail -n 5 || status=1
$PY -c "from saf_kernels import _backend as b; assert b.has_cuda_kernels(), 'CUDA kernels missing'; print('CUDA kernels: ok')" || status=1

echo "== tests on the GPU (cuda, triton) =="
$PY -m pytest tests -m "cuda or triton" -q -p no:cacheprovider -x 2>&1 | tee "$stamp-tests.txt" | tail -n 25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark report =="
$PY -m saf_kernels.bench --no-progress --json "$stamp.json" --plot "$stamp.png" ${BENCH_ARGS:-} | tee "$stamp.txt" || status=1

if [ "${SKIP_PYTEST_BENCHMARK:-0}" != "1" ]; then
  echo "== pytest-benchmark suites =="
  $PY -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-json "$stamp-pytest-benchmark.json" 2>&1 | tail -n 40 || status=1
fi
echo "results: $stamp.*"
exit $status

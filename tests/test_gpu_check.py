"""`make gpu-check` (benchmarks/gpu_check.sh) without a GPU: its stages are wired (dry run), it
fails clearly when there is no CUDA device, it writes at most 8 files into OUT_DIR, it passes
shellcheck, and the program it runs under compute-sanitizer still matches the API (run on the
CPU kernels)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from saf_kernels import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STAGES = ["build", "check", "plan_cache", "memcheck", "racecheck", "tests", "bench"]
MAX_FILES = 8  # what the borrowed GPU machine returns from one folder


def _run(tmp_path, **env):
    out = tmp_path / "out"
    e = dict(os.environ, OUT_DIR=str(out), PYTHON=sys.executable, **env)
    r = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)
    files = sorted(os.listdir(out))
    return r, files, json.loads((out / "summary.json").read_text())


def test_dry_run_wires_every_stage(tmp_path):
    r, files, s = _run(tmp_path, GPU_CHECK_DRY_RUN="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [x["stage"] for x in s["stages"]] == STAGES
    assert all(x["status"] == "dry" for x in s["stages"]) and s["dry_run"] and s["ok"]
    cmd = {x["stage"]: x["info"] for x in s["stages"]}
    assert "SAF_KERNELS_BUILD=cuda" in cmd["build"] and "build_ext --inplace" in cmd["build"]
    assert "saf_kernels.check --device cuda" in cmd["check"] and "--require cuda --require triton" in cmd["check"]
    assert "--tool memcheck" in cmd["memcheck"] and "--tool racecheck" in cmd["racecheck"]
    assert all("benchmarks/gpu_kernels_once.py" in cmd[k] for k in ("memcheck", "racecheck"))
    assert "(cuda or triton) and not slow" in cmd["tests"] and "--junitxml" in cmd["tests"]
    assert "saf_kernels.bench" in cmd["bench"]
    assert sum(x["limit_s"] for x in s["stages"]) >= s["budget_s"]  # the budget, not the sum, bounds the run
    assert s["commit"] and s["date"] and len(files) <= MAX_FILES
    assert set(files) <= {"gpu_check.log", "summary.json", "check.json", "tests.xml", "bench.json", "bench.txt"}


def test_without_a_gpu_it_fails_clearly(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: `make gpu-check` would run for real")
    r, files, s = _run(tmp_path)
    assert r.returncode == 2
    assert "no CUDA device" in r.stdout and "nothing GPU-side was checked" in r.stdout
    assert all(x["status"] == "skip" for x in s["stages"]) and not s["ok"]
    assert files == ["gpu_check.log", "summary.json"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    r = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_make_target_runs_the_script():
    r = subprocess.run(["make", "-n", "gpu-check"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "benchmarks/gpu_check.sh" in r.stdout


@pytest.mark.skipif(not _backend.HAS_EXT, reason="the compiled extension is not built")
def test_sanitizer_program_matches_the_api():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_kernels_once.py"), "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "groups of kernels ran on cpu" in r.stdout

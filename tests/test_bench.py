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


def test_sharded_counter_and_table():
    """The sharded group's collective counter (one process, a gloo group of one) and its table."""
    import torch
    import torch.distributed as dist

    from saf_kernels.bench import sharded

    from .helpers import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        counter = sharded._Counter()
        try:
            dist.all_reduce(torch.ones(3))  # not counted: inactive
            counter.active = True
            dist.all_reduce(torch.ones((), dtype=torch.float64))
            out = torch.empty(4)
            (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, torch.ones(4))
        finally:
            counter.restore()
        assert dist.all_reduce is counter._orig["all_reduce"]
    finally:
        dist.destroy_process_group()
    assert dict(counter.count) == {"all_reduce": 1, "all_gather": 1}
    assert dict(counter.bytes) == {"all_reduce": 8, "all_gather": 16}
    row = {"kind": "sharded", "wrapper": "fsdp2", "method": "sam", "median_s": 0.5, "ratio_to_sgd": 2.0,
           "collectives_per_step": dict(counter.count), "collective_bytes_per_step": dict(counter.bytes)}
    text = sharded.table([row, {"kind": "sharded", "unavailable": "needs 2 GPUs"}])
    assert "1 / 8 B" in text and "1 / 16 B" in text and "2.000x" in text and "needs 2 GPUs" in text

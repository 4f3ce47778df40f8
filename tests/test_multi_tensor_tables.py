"""The pointer tables of the multi-tensor Triton kernels (saf_kernels/triton/multi_tensor.py):
cached by the tensors' addresses, sizes and dtypes and the per-tensor values, rebuilt when any
of them changes, values apart from the rest."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from saf_kernels.triton import multi_tensor as mt  # noqa: E402


def _lists():
    return [torch.randn(5), torch.randn(40000), torch.randn(7, dtype=torch.float64)], [
        torch.randn(5), torch.randn(40000), torch.randn(7, dtype=torch.float64)]


def test_tables_hit_on_the_same_tensors_and_values():
    a, b = _lists()
    t1 = mt.build_tables([a, b], [[0.1], [1.0, 2.0, 3.0]], [0])
    assert mt.build_tables([list(a), list(b)], [[0.1], [1.0, 2.0, 3.0]], [0]) is t1
    assert [t.dtypes for t in t1] == [(torch.float32,), (torch.float64,)]
    t32 = t1[0]
    o = mt.offsets(t32, 2)
    meta = t32.meta.tolist()
    assert meta[:4] == [a[0].data_ptr(), b[0].data_ptr(), a[1].data_ptr(), b[1].data_ptr()]
    assert meta[o.numel:o.numel + 2] == [5, 40000]
    assert meta[o.chunk_tensor:o.chunk_start] == [0, 1, 1, 1]  # 40000 elements: 3 chunks of 16384
    assert meta[o.chunk_start:] == [0, 0, mt.CHUNK, 2 * mt.CHUNK]
    assert t32.fmeta.tolist() == [0.1, 1.0, 0.1, 2.0]


def test_new_values_keep_the_table_and_new_tensors_rebuild_it():
    a, b = _lists()
    t1 = mt.build_tables([a, b], [[0.1]], [0])
    t2 = mt.build_tables([a, b], [[0.2]], [0])  # a learning-rate schedule
    assert t2[0].meta is t1[0].meta and t2[0].fmeta.tolist() == [0.2, 0.2]
    c = [x.clone() for x in a]
    t3 = mt.build_tables([c, b], [[0.1]], [0])
    assert t3[0].meta is not t1[0].meta and int(t3[0].meta[0]) == c[0].data_ptr()
    t4 = mt.build_tables([a, b], [[0.1]], [2])  # flags
    assert t4[0].meta is not t1[0].meta
    a[1].resize_(100)  # same address, fewer elements
    t5 = mt.build_tables([a, b], [[0.1]], [0])
    assert t5[0].meta is not t1[0].meta and t5[0].n_chunks == 2


def test_the_cache_is_bounded():
    cache = mt.PlanCache(size=3)
    builds = []
    for i in range(10):
        cache.get((i,), torch.device("cpu"), lambda up, i=i: builds.append(i) or i)
        cache.get((0,), torch.device("cpu"), lambda up: builds.append("again") or 0)  # kept in use
    assert len(cache.entries) == 3 and "again" not in builds


def test_a_full_cache_keeps_the_newest_entry():
    # A full cache once evicted the entry it had just built (its use count was still 0), so every
    # later miss rebuilt: the first 32 distinct tables of a test session were the only ones cached.
    cache = mt.PlanCache(size=3)
    builds = []
    for i in range(10):
        cache.get((i,), torch.device("cpu"), lambda up, i=i: builds.append(i) or i)
        assert cache.get((i,), torch.device("cpu"), lambda up: builds.append("again") or i) == i
    assert "again" not in builds and len(cache.entries) == 3
    assert set(k.t for k in cache.entries) == {(7,), (8,), (9,)}

"""philox_: the counter-based random numbers of the ESAM / R-SAM kernels, on every backend.

The raw words are checked three ways: against a known-answer vector of Philox4x32-10, against the
plain-PyTorch implementation (saf_kernels.reference, int64 arithmetic), and against Triton's own
tl.randint4x (the triton backend calls it directly): all three agree bit for bit, so the C++ /
CUDA generator (csrc/include/saf/philox.h) is Triton's stream.
"""

from __future__ import annotations

import pytest
import torch

from saf_kernels import ops as O
from saf_kernels import reference

from .helpers import KERNEL_PAIRS, skip_unless_available

PAIRS = KERNEL_PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")]
SEEDS = [0, 1, 123456789, -5, 2**40 + 7, -(2**63), 2**64 - 1]


def _skip(backend, device):
    skip_unless_available(backend, device, "philox_")


def test_known_answer():
    # Random123's kat_vectors for philox4x32_10: counter (0, 0, 0, 0), key (0, 0).
    words = reference.philox4x32_10(torch.tensor([0]), 0)[0].tolist()
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_words_identical_on_every_backend(backend, device):
    _skip(backend, device)
    for seed in SEEDS:
        for offset, n in ((0, 1), (0, 37), (5, 1001), (2**40, 64)):
            out = torch.empty(n, dtype=torch.int64, device=device)
            O.philox_(out, seed, offset, "words", backend=backend)
            expect = reference.philox_(torch.empty(n, dtype=torch.int64), seed, offset, "words")
            assert torch.equal(out.cpu(), expect), f"seed {seed} offset {offset} n {n}"
            assert int(out.min()) >= 0 and int(out.max()) < 2**32


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("kind", ["uniform", "bernoulli"])
def test_uniform_and_bernoulli_bit_exact(backend, device, kind):
    _skip(backend, device)
    for dtype in (torch.float32, torch.float64):
        out = torch.empty(3, 333, dtype=dtype, device=device)
        O.philox_(out, 42, 7, kind, p=0.3, backend=backend)
        expect = reference.philox_(torch.empty(3, 333, dtype=dtype), 42, 7, kind, p=0.3)
        assert torch.equal(out.cpu(), expect)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_normals_match_reference(backend, device):
    _skip(backend, device)
    out = torch.empty(20011, dtype=torch.float64, device=device)
    O.philox_(out, 2024, 3, "normal", backend=backend)
    expect = reference.philox_(torch.empty(20011, dtype=torch.float64), 2024, 3, "normal")
    # float32 log / cos / sin: a few float32 ulps of the float64 Box-Muller on the same uniforms.
    torch.testing.assert_close(out.cpu(), expect, rtol=2e-6, atol=2e-6)
    assert abs(out.mean().item()) < 0.03 and abs(out.std().item() - 1.0) < 0.03


def test_statistics():
    out = torch.empty(200000)
    reference.philox_(out, 9, 0, "bernoulli", p=0.3)
    assert abs(out.mean().item() - 0.3) < 0.005
    u = reference.philox_(torch.empty(200000), 9, 0, "uniform")
    assert 0.0 <= u.min().item() and u.max().item() < 1.0 and abs(u.mean().item() - 0.5) < 0.005
    # Different seeds and offsets give different streams; the same ones the same stream.
    a = reference.philox_(torch.empty(64, dtype=torch.int64), 1, 0, "words")
    assert not torch.equal(a, reference.philox_(torch.empty(64, dtype=torch.int64), 2, 0, "words"))
    shifted = reference.philox_(torch.empty(60, dtype=torch.int64), 1, 1, "words")
    assert torch.equal(a[4:], shifted)  # offset counts counters: 4 positions each
    for p in (0.0, 1.0):
        out = reference.philox_(torch.empty(1000), 5, 0, "bernoulli", p=p)
        assert torch.all(out == p)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_bad_arguments(backend, device):
    _skip(backend, device)
    out = torch.empty(4, device=device)
    with pytest.raises(ValueError, match="kind must be one of"):
        O.philox_(out, 0, kind="gauss", backend=backend)
    with pytest.raises(TypeError, match="needs an int64 out"):
        O.philox_(out, 0, kind="words", backend=backend)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        O.philox_(out, 0, kind="bernoulli", p=1.5, backend=backend)
    with pytest.raises(ValueError, match="offset must be an integer"):
        O.philox_(out, 0, -1, backend=backend)
    with pytest.raises(ValueError, match="seed must be an integer"):
        O.philox_(out, 2**64, backend=backend)
    with pytest.raises(ValueError, match="contiguous"):
        O.philox_(torch.empty(4, 4, device=device).t(), 0, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    _skip(backend, "cpu")
    op = torch.ops.saf_kernels.philox_ if backend == "cpu" else torch.ops.saf_kernels.philox_triton
    torch.library.opcheck(op, (torch.empty(10), 3, 0, 2, 0.5))
    torch.library.opcheck(op, (torch.empty(7, dtype=torch.int64), 3, 1, 0, 0.5))

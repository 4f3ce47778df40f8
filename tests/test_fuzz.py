"""Fuzzing of every public multi-tensor op: at least 1,000 hypothesis examples per op in the CI
run, over the backends it runs (the C++ CPU kernels, the Triton kernels under the interpreter,
and the plain-PyTorch ``backend="torch"`` path, which goes through the same argument checks).

The properties are test_properties_multi_tensor.py's (every result against the float64
reference, NaN / inf / zero gradients, AMP scale and found_inf, empty lists); the problems here
are small (at most 4 x 4 elements, empty and single-element tensors, 0-dim, transposed views
that are dense but not contiguous) so that many examples fit in the CI time. The number of
examples each op ran is printed in the test summary (conftest.py's terminal summary).
"""

from __future__ import annotations

import collections

import pytest

pytest.importorskip("hypothesis", reason="fuzzing needs hypothesis (the GPU machines lack it)")
from hypothesis import given  # noqa: E402

from . import test_properties_multi_tensor as P  # noqa: E402
from .helpers import FULL  # noqa: E402

# Small shapes: empty, single element, 0-dim, odd sizes, 2-D and 3-D (transposable).
SHAPES = [(), (1,), (0,), (3,), (5,), (2, 3), (4, 4), (1, 7), (3, 1, 2), (2, 0)]
# Examples per backend. Full (SAF_FULL=1 or -m slow): >= 1,000 per op in all (the interpreter runs
# Triton ~50x slower). The default run: a share of that, within its time budget (the properties
# cost ~80 ms of CPU per example on the 2-core CI machine; 1,000 per op would add ~12 minutes).
FULL_EXAMPLES = {"cpu": 700, "torch": 270, "triton": 30}
CI_EXAMPLES = {"cpu": 40, "torch": 15, "triton": 3}


def _examples(backend, config) -> int:
    full = FULL or "slow" in (config.getoption("-m") or "")
    return (FULL_EXAMPLES if full else CI_EXAMPLES)[backend]
BACKENDS = ["cpu", "torch", pytest.param("triton", marks=pytest.mark.triton)]

#: op -> backend -> examples run (read by conftest.py's terminal summary).
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

# op -> (strategy, property, the op whose availability decides a skip). rsam_noise_ needs each
# output unit contiguous (it raises on a transposed view, by design): no views there.
OPS = {
    "sam_perturb_+sam_restore_": (P.sam_problems, P._sam_property, "sam_perturb_"),
    "sam_restore_sgd_": (P.sgd_problems, P._sgd_property, "sam_restore_sgd_"),
    "sam_restore_adamw_": (P.adamw_problems, P._adamw_property, "sam_restore_adamw_"),
    "ema_update_": (P.ema_problems, P._ema_property, "ema_update_"),
    "esam_perturb_": (P.esam_problems, P._esam_property, "esam_perturb_"),
    "rsam_noise_": (P.rsam_problems, P._rsam_noise_property, "rsam_noise_"),
    "rsam_perturb_": (P.rsam_problems, P._rsam_perturb_property, "rsam_perturb_"),
    "gsam_combine_": (P.gsam_problems, P._gsam_combine_property, "gsam_combine_"),
    "gsam_restore_sgd_": (P.gsam_problems, P._gsam_sgd_property, "gsam_restore_sgd_"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_fuzz(op, backend, pytestconfig):
    strategy, prop, name = OPS[op]
    views = op != "rsam_noise_"
    P.skip_unless_available(backend, "cpu", name)

    @P._settings(_examples(backend, pytestconfig))
    @given(strategy(shapes=SHAPES, views=views))
    def run(p):
        prop(p, backend)
        COUNTS[op][backend] += 1

    run()

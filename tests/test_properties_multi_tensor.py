"""Property-based tests (hypothesis) of every public multi-tensor op, and of the SAF bank step,
against the plain-PyTorch reference (saf_kernels/reference.py): random tensor lists (none at all,
numel 0 and 1, odd sizes, one across a 16384-element chunk), dtypes mixed within a list, scalar or
per-tensor hyperparameters, seeds and offsets, AMP scale / found_inf, zero gradients and a NaN or
an inf in a gradient.

What the ops do with a non-finite value, asserted here as "the kernel does what the reference
does" (same NaN / inf positions, everything else to the dtype's tolerance):

- sam_perturb_, esam_perturb_ (a kept element), rsam_perturb_: a non-finite norm perturbs
  nothing (the weights stay bit for bit; the returned norm is inf, or NaN with a NaN).
  esam_perturb_ ignores a non-finite gradient in an element its mask drops.
- sam_restore_sgd_ / sam_restore_adamw_ / gsam_restore_sgd_: the NaN or inf propagates into that
  element of the weights (and of the optimizer state), as torch.optim does.
- gsam_combine_: an undefined decomposition leaves ``grads = g_p`` (unscaled).
- ema_update_: a NaN / inf in the model propagates to that element of the EMA (any decay).
- rsam_noise_: a NaN / inf weight makes the noise of its whole output unit non-finite.

- saf_bank_step: a NaN logit makes the loss NaN if its row takes part in a term (a label not
  ignored, or a past entry); a row in neither term counts for nothing (0), as the reference
  (test_bank_step_nan_row_without_labels).

The tests at the end pin what the properties once found: sam_restore_sgd_ on an empty list with
momentum != 0 is a no-op; with ``eps = 0`` a zero gradient perturbs nothing (no 0/0).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("hypothesis", reason="property tests need hypothesis (the GPU machines lack it)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from saf_kernels import _backend, reference  # noqa: E402
from saf_kernels import ops as O  # noqa: E402
from saf_kernels.ops import trajectory_bank as tb  # noqa: E402

from .helpers import skip_unless_available  # noqa: E402
from .tolerances import TOL, assert_close  # noqa: E402

DTYPE_LIST = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPES = st.sampled_from(DTYPE_LIST)
# numel 0 and 1, odd sizes, 0-dim, and 16385 / 2 x 8193: one element past a 16384-element chunk.
SHAPES = [(), (1,), (3,), (0,), (257,), (16385,), (3, 5), (2, 3, 4), (7, 1), (2, 8193)]
CPU_EXAMPLES, TRITON_EXAMPLES = 35, 5  # the Triton interpreter is slow
# CPU tensors only: the C++ CPU kernels, and the Triton kernels under the interpreter (conftest sets
# TRITON_INTERPRET=1 without a GPU; elsewhere they skip).
BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.triton)]
# NaN / inf / 0 inputs are the point here: numpy's warnings about them from the Triton interpreter are noise.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 2.0**-52}
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
        torch.float16: torch.int16}


def _settings(n):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _examples(backend):
    return CPU_EXAMPLES if backend == "cpu" else TRITON_EXAMPLES


def _check_property(problems, check, backend):
    """``check(p, backend)`` on the problems Hypothesis draws from ``problems`` (settings above)."""
    @_settings(_examples(backend))
    @given(problems)
    def run(p):
        check(p, backend)

    run()


# ---------------------------------------------------------------------------------------------
# Drawing problems
# ---------------------------------------------------------------------------------------------


# What the gradients hold: random most of the time, else all zero or one NaN / +-inf.
SPECIALS = st.sampled_from(["random"] * 6 + ["zero", "nan", "inf", "-inf"])


@st.composite
def tensor_lists(draw, max_tensors=4, shapes=SHAPES, views=False):
    """A list of 0..max_tensors tensors: shapes, dtypes (one for all or mixed), value scale, and
    what the gradients hold (random, all zero, or one NaN / inf). ``views``: a tensor of 2 or
    more dims may be a transposed view (dense, not contiguous), the same layout in every list."""
    n = draw(st.sampled_from([1, 2, 3, max_tensors, 0]))  # an empty list one time in five
    shape_pool = shapes
    shapes = draw(st.lists(st.sampled_from(shape_pool), min_size=n, max_size=n))
    if draw(st.booleans()):
        dtypes = draw(st.lists(DTYPES, min_size=n, max_size=n))
    else:
        dtypes = [draw(DTYPES)] * n
    return dict(
        n=n, shapes=shapes, dtypes=dtypes, seed=draw(st.integers(0, 2**31 - 1)),
        scale=draw(st.sampled_from([1e-3, 1.0, 30.0])),
        special=draw(SPECIALS),
        per_tensor=draw(st.booleans()),
        views=draw(st.lists(st.booleans(), min_size=n, max_size=n)) if views else [False] * n,
    )


def _values(draw, strategy, n, per_tensor):
    """(what the op is given, the per-tensor list the reference is given)."""
    if per_tensor:
        vals = draw(st.lists(strategy, min_size=n, max_size=n))
        return vals, vals
    v = draw(strategy)
    return v, [v] * n


def _amp(draw):
    """GradScaler's tensors: (grad_scale, found_inf), each possibly None."""
    gs = draw(st.sampled_from([None, None, 0.125, 1024.0]))
    fi = draw(st.sampled_from([None, None, None, 0.0, 1.0]))
    return (None if gs is None else torch.tensor(gs), None if fi is None else torch.tensor(fi))


class Gen:
    """Random tensors from the problem's seed (hypothesis shrinks the seed, not the values)."""

    def __init__(self, p):
        self.p = p
        self.g = torch.Generator().manual_seed(p["seed"])

    def randn(self, shape, dtype, scale=None):
        s = self.p["scale"] if scale is None else scale
        return (torch.randn(shape, generator=self.g, dtype=torch.float64) * s).to(dtype)

    def list(self, dtypes=None, scale=None):
        views = self.p.get("views") or [False] * len(self.p["shapes"])
        # Views of shapes whose last two dims both exceed 1: a size-1 dim's stride is arbitrary
        # (ops compare the lists' strides as given).
        return [self.view(s, d, scale) if v and len(s) >= 2 and min(s[-2:]) > 1 else self.randn(s, d, scale)
                for s, d, v in zip(self.p["shapes"], dtypes or self.p["dtypes"], views)]

    def view(self, shape, dtype, scale=None):
        """A transposed view of that shape: dense, not contiguous (its last two dims swapped)."""
        t = self.randn((*shape[:-2], shape[-1], shape[-2]), dtype, scale)
        return t.transpose(-1, -2)

    def special(self, tensors, kind=None):
        """Apply the problem's special gradient to a list (in place): all zero, or one NaN / inf
        at a random element of a random non-empty tensor."""
        kind = kind or self.p["special"]
        if kind == "zero":
            for t in tensors:
                t.zero_()
            return
        if kind == "random":
            return
        nonempty = [t for t in tensors if t.numel()]
        if not nonempty:
            return
        t = nonempty[int(torch.randint(len(nonempty), (), generator=self.g))]
        i = int(torch.randint(t.numel(), (), generator=self.g))
        at = []  # the element's index (t may be a transposed view: no view(-1))
        for d in reversed(t.shape):
            at.append(i % d)
            i //= d
        t[tuple(reversed(at))] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[kind]


def _clone(ts):
    return [t.clone() for t in ts]


def _all64(ts):
    return bool(ts) and all(t.dtype == torch.float64 for t in ts)


def _acc(ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _tol(dtype, all64):
    # float64 tensors in a list that also holds lower-precision ones share a norm accumulated from
    # float32 products: float32's tolerance then.
    return dtype if dtype != torch.float64 or all64 else torch.float32


def _check_list(got, want, all64, what, floors=None):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}[{i}]"
        # At least one step of the dtype's subnormal spacing (float16 moments of tiny gradients).
        floor = max(floors[i] if floors else 0.0, 2 * torch.finfo(a.dtype).tiny * ULP[a.dtype])
        assert_close(a, b, _tol(a.dtype, all64), f"{what}[{i}] {a.dtype} {tuple(a.shape)}",
                     atol_floor=floor)


def _check_step(got, want, before, all64, what, floors=None, tol_dtype=None):
    """``got`` against ``want``, both ``before`` plus a step (a perturbation, an optimizer update):
    each element within two roundings of the result plus the tolerance table's error on the step
    itself -- comparing the results alone would hide a wrong step much smaller than the weights.
    NaN and inf must sit at the same places."""
    for i, (a, b, w) in enumerate(zip(got, want, before)):
        where = f"{what}[{i}] {a.dtype} {tuple(a.shape)}"
        assert a.dtype == b.dtype and a.shape == b.shape, where
        rtol, atol = TOL[tol_dtype or _tol(a.dtype, all64)]
        a64, b64, w64 = (t.detach().double().reshape(-1) for t in (a, b, w))
        assert torch.equal(a64.isnan(), b64.isnan()), f"{where}: NaN at other places"
        fin = torch.isfinite(b64)
        inf = ~fin & ~b64.isnan()
        assert torch.equal(a64[inf], b64[inf]), f"{where}: inf at other places"
        step = (b64 - w64).abs()
        step = torch.where(fin & torch.isfinite(step), step, torch.zeros((), dtype=torch.float64))
        smax = float(step.max()) if step.numel() else 0.0
        floor = (floors[i] if floors else 0.0) + 2 * torch.finfo(a.dtype).tiny * ULP[a.dtype]
        tol = 2 * ULP[a.dtype] * b64.abs() + rtol * step + atol * smax + floor
        err = (a64 - b64).abs()
        bad = fin & ~(err <= tol)
        if bad.any():
            j = int(bad.nonzero()[0, 0])
            raise AssertionError(f"{where}: {int(bad.sum())} elements off, e.g. [{j}] got {a64[j].item()!r} want "
                                 f"{b64[j].item()!r} (from {w64[j].item()!r}, tolerance {tol[j].item():.3g})")


def _restored(params, stash, mode):
    """The weights a restore starts the base step from (float64)."""
    if mode == "copy":
        return [s.double() for s in stash]
    return [p.double() - s.double() for p, s in zip(params, stash)]


def _stash_floors(params, stash):
    """A delta stash holds the perturbation rounded to its dtype, and exactly that is added: where
    the stash is coarser than the weights (bfloat16 for float32 weights), the kernel's and the
    reference's float32 perturbations, a few ulps apart, may round to neighbouring stash values --
    one stash ulp of the perturbation (the Triton interpreter also converts float32 to bfloat16 by
    truncation, cast_impl in triton/runtime/interpreter.py, where the GPU rounds to nearest)."""
    return [ULP[s.dtype] * float(s.double().abs().nan_to_num(0.0, 0.0, 0.0).max()) if s.numel()
            and s.dtype != t.dtype else 0.0 for t, s in zip(params, stash)]


def _restore_floors(perturbed, floors):
    """A delta-mode restore computes (w + e) - e: the kernel and the reference may differ by what
    their perturbed weights were allowed to differ by (one rounding of |w + e|, which can exceed
    |w| when e is large, plus the stash's allowance)."""
    return [2 * ULP[t.dtype] * float(t.double().abs().nan_to_num(0.0, 0.0, 0.0).max() if t.numel() else 0.0)
            + (floors[i] if floors else 0.0) for i, t in enumerate(perturbed)]


def _stash_dtypes(p, params, backend):
    """The delta stash's dtypes: bfloat16 if the problem says so, else the params'. Not for float64
    params under the Triton interpreter, whose float64 -> bfloat16 cast is broken (cast_impl:
    ``astype(uint16)`` of the value, not a rounding; the GPU converts correctly)."""
    interp = backend == "triton" and _backend.triton_interpreted()
    return [torch.bfloat16 if p["stash_bf16"] and not (interp and t.dtype == torch.float64) else t.dtype
            for t in params]


def _check_scalar(out, ref, dtype, what, floor=0.0):
    assert out.dtype == ref.dtype and out.shape == ref.shape, f"{what}: {out.dtype}{tuple(out.shape)} vs " \
                                                              f"{ref.dtype}{tuple(ref.shape)}"
    assert_close(out, ref, dtype, what, atol_floor=floor)


def _norm_floor(params):
    """The kernels square in float32 unless a param is float64 (the reference in float64): values
    below 2^-63 square to below float32's normal range, so a norm of such values may come out 0."""
    if _acc(params) == torch.float64:
        return 0.0
    return 2.0**-63 * math.sqrt(sum(t.numel() for t in params))


def _bits_equal(a, b):
    return torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def _finite(ts):
    return all(bool(torch.isfinite(t).all()) for t in ts)


def _empty_result(out, shape=()):
    assert isinstance(out, torch.Tensor) and out.shape == shape and not out.any(), out


# ---------------------------------------------------------------------------------------------
# sam_perturb_ / sam_restore_
# ---------------------------------------------------------------------------------------------


@st.composite
def sam_problems(draw, **kw):
    p = draw(tensor_lists(**kw))
    n, pt = p["n"], p["per_tensor"]
    p["rho"] = _values(draw, st.floats(0.0, 2.0), n, pt)
    p["adaptive"] = _values(draw, st.booleans(), n, pt)
    p["eta"] = _values(draw, st.sampled_from([0.0, 0.01, 0.5]), n, pt)
    p["eps"] = draw(st.sampled_from([1e-12, 1e-7, 0.1]))
    p["stash_mode"] = draw(st.sampled_from(["copy", "delta"]))
    p["stash_bf16"] = draw(st.booleans()) and p["stash_mode"] == "delta"
    p["grad_scale"], p["found_inf"] = _amp(draw)
    return p


def _sam_property(p, backend):
    skip_unless_available(backend, "cpu", "sam_perturb_")
    r = Gen(p)
    params, grads = r.list(scale=1.0), r.list()
    r.special(grads)
    orig = _clone(params)
    sdt = _stash_dtypes(p, params, backend)
    stash = [torch.full_like(t, 7.0, dtype=d) for t, d in zip(params, sdt)]
    rp, rs = _clone(params), _clone(stash)
    mode = p["stash_mode"]
    norm = O.sam_perturb_(params, grads, stash, p["rho"][0], adaptive=p["adaptive"][0], eta=p["eta"][0], eps=p["eps"],
                          grad_scale=p["grad_scale"], found_inf=p["found_inf"], stash_mode=mode, backend=backend)
    if p["n"] == 0:
        _empty_result(norm)
        O.sam_restore_(params, stash, mode, backend=backend)
        return
    ref = reference.sam_perturb_(rp, grads, rs, p["rho"][1], p["adaptive"][1], p["eta"][1], p["eps"], p["grad_scale"],
                                 p["found_inf"], mode)
    all64 = _all64(params)
    floors = _stash_floors(orig, rs)
    _check_scalar(norm, ref, _tol(_acc(params), all64), f"{p} norm", _norm_floor(params))
    _check_step(params, rp, orig, all64, f"{p} params", floors=floors)
    if mode == "copy":
        assert all(_bits_equal(s, o) for s, o in zip(stash, orig)), "the copy stash holds the weights bit for bit"
    else:
        _check_list(stash, rs, all64, f"{p} delta stash", floors=floors)
    if p["special"] == "zero" or not math.isfinite(ref.item()) or (p["found_inf"] is not None and p["found_inf"]):
        # Nothing to perturb (a zero gradient must not give 0/0), or a skipped step.
        assert _finite(params) and all(torch.equal(a, o) for a, o in zip(params, orig)), p
    lossy = _restore_floors(params, floors)
    O.sam_restore_(params, stash, mode, backend=backend)
    reference.sam_restore_(rp, rs, mode)
    _check_list(params, rp, all64, f"{p} restored", floors=lossy)
    if mode == "copy":
        assert all(_bits_equal(a, o) for a, o in zip(params, orig)), "copy-mode restore must be bit exact"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_perturb_restore_property(backend):
    _check_property(sam_problems(), _sam_property, backend)


# ---------------------------------------------------------------------------------------------
# sam_restore_sgd_ / sam_restore_adamw_ (fused restore + base step)
# ---------------------------------------------------------------------------------------------


@st.composite
def sgd_problems(draw, **kw):
    p = draw(tensor_lists(**kw))
    n, pt = p["n"], p["per_tensor"]
    p["lr"] = _values(draw, st.floats(0.0, 1.0), n, pt)
    p["weight_decay"] = _values(draw, st.sampled_from([0.0, 5e-4, 0.1]), n, pt)
    p["momentum"] = _values(draw, st.sampled_from([0.0, 0.5, 0.9]), n, pt)
    p["dampening"] = _values(draw, st.sampled_from([0.0, 0.1]), n, pt)
    # Nesterov only with a momentum and no dampening (torch.optim.SGD and the op reject the rest).
    ok = [m > 0 and d == 0 for m, d in zip(p["momentum"][1], p["dampening"][1])]
    nest = _values(draw, st.booleans(), n, pt)[1]
    nest = [a and o for a, o in zip(nest, ok)]
    p["nesterov"] = (nest, nest) if pt else ((bool(nest) and all(nest)), [bool(nest) and all(nest)] * n)
    p["maximize"] = _values(draw, st.booleans(), n, pt)
    p["first_run"] = _values(draw, st.booleans(), n, pt)
    p["buffers"] = draw(st.booleans()) or any(m != 0 for m in p["momentum"][1])  # momentum != 0 needs them
    p["stash_mode"] = draw(st.sampled_from(["copy", "delta"]))
    p["grad_scale"], p["found_inf"] = _amp(draw)
    return p


def _sgd_property(p, backend):
    skip_unless_available(backend, "cpu", "sam_restore_sgd_")
    r = Gen(p)
    params, stash, grads = r.list(scale=1.0), r.list(scale=0.01 if p["stash_mode"] == "delta" else 1.0), r.list()
    r.special(grads)
    bufs = r.list(scale=1.0) if p["buffers"] else []
    rp, rb = _clone(params), _clone(bufs)
    restored = _restored(params, stash, p["stash_mode"])
    kw = {k: p[k][0] for k in ("lr", "weight_decay", "momentum", "dampening", "nesterov", "maximize", "first_run")}
    if p["n"] == 0 and kw["momentum"]:
        kw["momentum"] = 0.0  # raises: test_sam_restore_sgd_empty_list_with_momentum below
    O.sam_restore_sgd_(params, grads, stash, bufs, **kw, stash_mode=p["stash_mode"], grad_scale=p["grad_scale"],
                       found_inf=p["found_inf"], backend=backend)
    if p["n"] == 0:
        return
    reference.sam_restore_sgd_(rp, grads, stash, rb, *(p[k][1] for k in kw), p["stash_mode"], p["grad_scale"],
                               p["found_inf"])
    all64 = _all64(params)
    _check_step(params, rp, restored, all64, f"{p} params")
    _check_list(bufs, rb, all64, f"{p} momentum buffers")
    if p["special"] == "zero" and _finite(stash) and _finite(bufs):
        assert _finite(params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_restore_sgd_property(backend):
    _check_property(sgd_problems(), _sgd_property, backend)


@st.composite
def adamw_problems(draw, **kw):
    p = draw(tensor_lists(**kw))
    n, pt = p["n"], p["per_tensor"]
    p["lr"] = _values(draw, st.sampled_from([0.0, 1e-3, 0.1]), n, pt)
    p["beta1"] = _values(draw, st.sampled_from([0.0, 0.5, 0.9]), n, pt)
    p["beta2"] = _values(draw, st.sampled_from([0.0, 0.9, 0.999]), n, pt)
    p["eps"] = _values(draw, st.sampled_from([1e-8, 1e-3]), n, pt)
    p["weight_decay"] = _values(draw, st.sampled_from([0.0, 1e-2, 0.5]), n, pt)
    p["maximize"] = _values(draw, st.booleans(), n, pt)
    p["steps"] = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n))
    p["stash_mode"] = draw(st.sampled_from(["copy", "delta"]))
    p["grad_scale"], p["found_inf"] = _amp(draw)
    return p


def _adamw_property(p, backend):
    skip_unless_available(backend, "cpu", "sam_restore_adamw_")
    r = Gen(p)
    params, stash, grads = r.list(scale=1.0), r.list(scale=0.01 if p["stash_mode"] == "delta" else 1.0), r.list()
    r.special(grads)
    m = r.list()
    # A reachable second moment (v >= m^2, squared in float64: no float16 underflow).
    v = [(a.double() ** 2 + r.randn(a.shape, torch.float64) ** 2).to(a.dtype) for a in m]
    if p["special"] == "zero":  # a first step with a zero gradient: m = v = 0, 0 / (0 + eps)
        m, v = [torch.zeros_like(a) for a in m], [torch.zeros_like(a) for a in v]
    steps = [torch.tensor(float(s)) for s in p["steps"]]
    rp, rm, rv = _clone(params), _clone(m), _clone(v)
    restored = _restored(params, stash, p["stash_mode"])
    keys = ("lr", "beta1", "beta2", "eps", "weight_decay", "maximize")
    O.sam_restore_adamw_(params, grads, stash, m, v, steps, **{k: p[k][0] for k in keys}, stash_mode=p["stash_mode"],
                         grad_scale=p["grad_scale"], found_inf=p["found_inf"], backend=backend)
    if p["n"] == 0:
        return
    reference.sam_restore_adamw_(rp, grads, stash, rm, rv, steps, *(p[k][1] for k in keys), p["stash_mode"],
                                 p["grad_scale"], p["found_inf"])
    all64 = _all64(params)
    _check_step(params, rp, restored, all64, f"{p} params")
    _check_list(m, rm, all64, f"{p} exp_avg")
    _check_list(v, rv, all64, f"{p} exp_avg_sq")
    if p["special"] == "zero":
        assert _finite(params) and _finite(m) and _finite(v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_restore_adamw_property(backend):
    _check_property(adamw_problems(), _adamw_property, backend)


# ---------------------------------------------------------------------------------------------
# ema_update_
# ---------------------------------------------------------------------------------------------


@st.composite
def ema_problems(draw, **kw):
    p = draw(tensor_lists(**kw))
    n = p["n"]
    p["model_dtypes"] = draw(st.lists(DTYPES, min_size=n, max_size=n)) if draw(st.booleans()) else p["dtypes"]
    p["decay"] = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.9998]), st.floats(0.0, 1.0)))
    p["decay_tensor"] = draw(st.sampled_from([None, torch.float32, torch.float64]))
    return p


def _ema_property(p, backend):
    skip_unless_available(backend, "cpu", "ema_update_")
    r = Gen(p)
    ema, model = r.list(scale=1.0), r.list(p["model_dtypes"])
    r.special(model)
    before, re_ = _clone(ema), _clone(ema)
    decay = p["decay"] if p["decay_tensor"] is None else torch.tensor(p["decay"], dtype=p["decay_tensor"])
    O.ema_update_(ema, model, decay, backend=backend)
    if p["n"] == 0:
        return
    # The reference gets the decay as a number: given a tensor it rounds the weight 1 - decay to
    # the EMA's dtype (reference.ema_update_), where the kernels keep it in float32.
    reference.ema_update_(re_, model, float(decay))
    for i, (a, b, e0, m) in enumerate(zip(ema, re_, before, model)):
        # Arithmetic in float32 (float64 for a float64 EMA on the CPU; the Triton kernel takes a
        # Python decay as a float32 argument: one float32 rounding of the decay times |m - e|); the
        # reference rounds the model to the EMA's dtype before the lerp: one rounding of |m| times
        # 1 - decay.
        f64 = a.dtype == torch.float64 and (backend == "cpu" or p["decay_tensor"] is not None)
        tol = torch.float64 if f64 else _tol(a.dtype, False)
        m64, e64 = m.double().nan_to_num(0.0, 0.0, 0.0), e0.double()
        big_m = float(m64.abs().max()) if m.numel() else 0.0
        big_d = float((m64 - e64).abs().max()) if m.numel() else 0.0
        floor = (1 - p["decay"]) * ULP[a.dtype] * big_m if m.dtype != a.dtype else 0.0
        floor += 2 * ULP[torch.float32] * big_d if a.dtype == torch.float64 and not f64 else 0.0
        _check_step([a], [b], [e0], False, f"{p} ema[{i}]", floors=[floor], tol_dtype=tol)
        if p["decay"] == 1.0 and bool(torch.isfinite(m).all()):
            assert torch.equal(a, e0), "decay 1 keeps the EMA"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_update_property(backend):
    _check_property(ema_problems(), _ema_property, backend)


# ---------------------------------------------------------------------------------------------
# esam_perturb_ / esam_restore_
# ---------------------------------------------------------------------------------------------

SEEDS = st.one_of(st.integers(-(2**63), 2**64 - 1), st.integers(-3, 3))
OFFSETS = st.one_of(st.integers(0, 2**62 - 1), st.integers(0, 9))


@st.composite
def esam_problems(draw, **kw):
    p = draw(sam_problems(**kw))
    n, pt = p["n"], p["per_tensor"]
    p["beta"] = _values(draw, st.one_of(st.sampled_from([1.0, 0.5]), st.floats(1e-3, 1.0)), n, pt)
    p["eps"] = draw(st.sampled_from([1e-7, 1e-12, 0.1]))
    p["philox_seed"], p["offset"] = draw(SEEDS), draw(OFFSETS)
    return p


def _esam_property(p, backend):
    skip_unless_available(backend, "cpu", "esam_perturb_")
    r = Gen(p)
    params, grads = r.list(scale=1.0), r.list()
    r.special(grads)
    orig = _clone(params)
    sdt = _stash_dtypes(p, params, backend)
    stash = [torch.full_like(t, 7.0, dtype=d) for t, d in zip(params, sdt)]
    rp, rs = _clone(params), _clone(stash)
    mode, seed, off = p["stash_mode"], p["philox_seed"], p["offset"]
    norm = O.esam_perturb_(params, grads, stash, p["rho"][0], p["beta"][0], seed, off, adaptive=p["adaptive"][0],
                           eta=p["eta"][0], eps=p["eps"], grad_scale=p["grad_scale"], found_inf=p["found_inf"],
                           stash_mode=mode, backend=backend)
    if p["n"] == 0:
        _empty_result(norm)
        O.esam_restore_(params, stash, p["beta"][0], seed, off, mode, backend=backend)
        return
    ref = reference.esam_perturb_(rp, grads, rs, p["rho"][1], p["adaptive"][1], p["eta"][1], p["beta"][1], seed, off,
                                  p["eps"], p["grad_scale"], p["found_inf"], mode)
    all64 = _all64(params)
    floors = _stash_floors(orig, rs)
    _check_scalar(norm, ref, _tol(_acc(params), all64), f"{p} norm", _norm_floor(params))
    _check_step(params, rp, orig, all64, f"{p} params", floors=floors)
    masks = reference.esam_keep_masks(orig, p["beta"][1], seed, off)
    for a, o, m in zip(params, orig, masks):  # dropped elements keep their bits
        assert _bits_equal(reference.flat_memory(a)[~m], reference.flat_memory(o)[~m]), "a dropped element moved"
    if mode == "copy":
        assert all(_bits_equal(s, o) for s, o in zip(stash, orig))
    else:
        _check_list(stash, rs, all64, f"{p} delta stash", floors=floors)
    if p["special"] == "zero":
        assert _finite(params) and all(torch.equal(a, o) for a, o in zip(params, orig)), p
    lossy = _restore_floors(params, floors)
    O.esam_restore_(params, stash, p["beta"][0], seed, off, mode, backend=backend)
    reference.esam_restore_(rp, rs, p["beta"][1], seed, off, mode)
    _check_list(params, rp, all64, f"{p} restored", floors=lossy)
    if mode == "copy":
        assert all(_bits_equal(a, o) for a, o in zip(params, orig))


@pytest.mark.parametrize("backend", BACKENDS)
def test_esam_perturb_restore_property(backend):
    _check_property(esam_problems(), _esam_property, backend)


# ---------------------------------------------------------------------------------------------
# rsam_noise_ / rsam_perturb_
# ---------------------------------------------------------------------------------------------


@st.composite
def rsam_problems(draw, **kw):
    p = draw(tensor_lists(**kw))
    n, pt = p["n"], p["per_tensor"]
    p["std"] = _values(draw, st.one_of(st.just(0.0), st.floats(0.0, 0.1)), n, pt)
    p["rho"] = _values(draw, st.floats(0.0, 2.0), n, pt)
    p["lam"] = draw(st.one_of(st.just(2.0), st.floats(-3.0, 3.0)))
    p["eps"] = draw(st.sampled_from([1e-12, 1e-6]))
    p["philox_seed"], p["offset"] = draw(SEEDS), draw(OFFSETS)
    p["weights"] = draw(SPECIALS)  # what rsam_noise_ sees
    p["grad_scale"], p["found_inf"] = _amp(draw)
    return p


def _rsam_noise_property(p, backend):
    skip_unless_available(backend, "cpu", "rsam_noise_")
    r = Gen(p)
    params = r.list(scale=1.0)
    r.special(params, p["weights"])
    stash = [torch.full_like(t, 7.0) for t in params]
    rp, rs, orig = _clone(params), _clone(stash), _clone(params)
    seed, off = p["philox_seed"], p["offset"]
    O.rsam_noise_(params, stash, p["std"][0], seed, off, backend=backend)
    if p["n"] == 0:
        return
    reference.rsam_noise_(rp, rs, p["std"][1], seed, off)
    assert all(_bits_equal(a, b) for a, b in zip(stash, rs)), "the stash holds the weights before the noise"
    # The kernels' normals are float32 (a few ulps from the reference's): float32's tolerance for
    # float64 weights too.
    _check_step(params, rp, orig, False, f"{p} noisy weights")


def _rsam_perturb_property(p, backend):
    skip_unless_available(backend, "cpu", "rsam_perturb_")
    r = Gen(p)
    stash = r.list(scale=1.0)
    # The noisy weights: the clean ones plus the reference's noise.
    params = _clone(stash)
    reference.rsam_noise_(params, [torch.empty_like(t) for t in params], p["std"][1], p["philox_seed"], p["offset"])
    grads = r.list()
    r.special(grads)
    rp = _clone(params)
    norm = O.rsam_perturb_(params, grads, stash, p["rho"][0], p["lam"], p["eps"], grad_scale=p["grad_scale"],
                           found_inf=p["found_inf"], backend=backend)
    if p["n"] == 0:
        _empty_result(norm)
        return
    ref = reference.rsam_perturb_(rp, grads, stash, p["rho"][1], p["lam"], p["eps"], p["grad_scale"], p["found_inf"])
    all64 = _all64(params)
    _check_scalar(norm, ref, _tol(_acc(params), all64), f"{p} norm", _norm_floor(params))
    _check_step(params, rp, stash, all64, f"{p} params")
    skipped = not math.isfinite(ref.item()) or (p["found_inf"] is not None and bool(p["found_inf"]))
    if skipped:  # back to the clean weights, bit for bit
        assert all(_bits_equal(a, s) for a, s in zip(params, stash)), p
    if p["special"] == "zero" and p["std"][1] == [0.0] * p["n"]:
        assert all(_bits_equal(a, s) for a, s in zip(params, stash)), "d = 0 must not give 0/0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rsam_noise_property(backend):
    _check_property(rsam_problems(), _rsam_noise_property, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rsam_perturb_property(backend):
    _check_property(rsam_problems(), _rsam_perturb_property, backend)


# ---------------------------------------------------------------------------------------------
# gsam_combine_ / gsam_restore_sgd_
# ---------------------------------------------------------------------------------------------


@st.composite
def gsam_problems(draw, **kw):
    p = draw(sgd_problems(**kw))
    p["alpha"] = draw(st.one_of(st.sampled_from([0.0, 0.4]), st.floats(-1.0, 2.0)))
    p["eps"] = draw(st.sampled_from([1e-12, 0.0, 1e-3]))
    p["restore"] = draw(st.booleans())
    p["old_special"] = draw(SPECIALS)
    p["old_grad_scale"] = draw(st.sampled_from([None, torch.tensor(64.0)]))
    return p


def _gsam_inputs(p):
    r = Gen(p)
    params = r.list(scale=1.0)
    stash = r.list(scale=0.01 if p["stash_mode"] == "delta" else 1.0)
    g_p, old = r.list(), r.list()
    r.special(g_p)
    r.special(old, p["old_special"])
    return r, params, stash, g_p, old


def _gsam_combine_property(p, backend):
    skip_unless_available(backend, "cpu", "gsam_combine_")
    _, params, stash, g_p, old = _gsam_inputs(p)
    rp, rg = _clone(params), _clone(g_p)
    st_arg = stash if p["restore"] else []
    stats = O.gsam_combine_(params, g_p, old, st_arg, p["alpha"], p["eps"], restore=p["restore"],
                            stash_mode=p["stash_mode"], grad_scale=p["grad_scale"], old_grad_scale=p["old_grad_scale"],
                            found_inf=p["found_inf"], backend=backend)
    if p["n"] == 0:
        _empty_result(stats, (3,))
        return
    ref = reference.gsam_combine_(rp, rg, old, st_arg, p["alpha"], p["eps"], p["stash_mode"], p["restore"],
                                  p["grad_scale"], p["old_grad_scale"], p["found_inf"])
    all64 = _all64(params)
    _check_scalar(stats, ref, _tol(_acc(params), all64), f"{p} stats")
    _check_list(g_p, rg, all64, f"{p} combined grads")
    _check_list(params, rp, all64, f"{p} params")
    if p["special"] == "zero" and p["old_special"] == "zero":
        assert _finite(g_p), "zero gradients must not give 0/0"


def _gsam_sgd_property(p, backend):
    skip_unless_available(backend, "cpu", "gsam_restore_sgd_")
    r, params, stash, g_p, old = _gsam_inputs(p)
    bufs = r.list(scale=1.0) if p["buffers"] else []
    rp, rb = _clone(params), _clone(bufs)
    restored = _restored(params, stash, p["stash_mode"])
    keys = ("lr", "weight_decay", "momentum", "dampening", "nesterov", "maximize", "first_run")
    stats = O.gsam_restore_sgd_(params, g_p, old, stash, bufs, **{k: p[k][0] for k in keys}, alpha=p["alpha"],
                                eps=p["eps"], stash_mode=p["stash_mode"], grad_scale=p["grad_scale"],
                                old_grad_scale=p["old_grad_scale"], found_inf=p["found_inf"], backend=backend)
    if p["n"] == 0:
        _empty_result(stats, (3,))
        return
    ref = reference.gsam_restore_sgd_(rp, g_p, old, stash, rb, *(p[k][1] for k in keys), p["alpha"], p["eps"],
                                      p["stash_mode"], p["grad_scale"], p["old_grad_scale"], p["found_inf"])
    all64 = _all64(params)
    _check_scalar(stats, ref, _tol(_acc(params), all64), f"{p} stats")
    _check_step(params, rp, restored, all64, f"{p} params")
    _check_list(bufs, rb, all64, f"{p} momentum buffers")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gsam_combine_property(backend):
    _check_property(gsam_problems(), _gsam_combine_property, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gsam_restore_sgd_property(backend):
    _check_property(gsam_problems(), _gsam_sgd_property, backend)


# ---------------------------------------------------------------------------------------------
# looksam_gv_ + looksam_combine_, msam_sgd_ / msam_adamw_
# ---------------------------------------------------------------------------------------------


def _coarsest(ts):
    """The tolerance of a value reduced over the list: that of its coarsest dtype."""
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        if any(t.dtype == dt for t in ts):
            return dt
    return torch.float64


@st.composite
def looksam_problems(draw, **kw):
    p = draw(tensor_lists(**kw))
    p["alpha"] = draw(st.one_of(st.sampled_from([0.0, 0.7]), st.floats(-1.0, 2.0)))
    p["eps"] = draw(st.sampled_from([1e-12, 0.0, 1e-3]))
    p["old_special"] = draw(SPECIALS)
    p["norm_dtype"] = draw(st.sampled_from([torch.float32, torch.float64]))
    return p


def _cancellation_floors(ts):
    """An absolute floor per tensor for results that cancel to ~0 (g_s - c g with g_s parallel
    to g): a few units of the accumulation's last place of the inputs' magnitude (a fused
    multiply-add there rounds once, the reference twice)."""
    return [4 * ULP[torch.float64 if t.dtype == torch.float64 else torch.float32]
            * float(t.double().abs().nan_to_num(0.0, 0.0, 0.0).max()) if t.numel() else 0.0 for t in ts]


def _looksam_property(p, backend):
    skip_unless_available(backend, "cpu", "looksam_gv_")
    r = Gen(p)
    gs, g, gv = r.list(), r.list(), r.list()
    r.special(gs)
    r.special(g, p["old_special"])
    nrm, rn = torch.full((), 3.0, dtype=p["norm_dtype"]), torch.full((), 3.0, dtype=p["norm_dtype"])
    rv = _clone(gv)
    stats = O.looksam_gv_(gv, nrm, gs, g, p["eps"], backend=backend)
    if p["n"] == 0:
        _empty_result(stats, (3,))
        assert float(nrm) == 3.0
        return
    ref = reference.looksam_gv_(rv, rn, gs, g, p["eps"])
    all64 = _all64(gv)
    _check_scalar(stats, ref, _tol(_acc(gv), all64), f"{p} stats")
    floors = _cancellation_floors(gs)
    _check_list(gv, rv, all64, f"{p} gv", floors=floors)
    _check_scalar(nrm, rn, _tol(_coarsest(gv), all64), f"{p} gv_norm",
                  floor=math.sqrt(sum(f * f * t.numel() for f, t in zip(floors, gs))))
    new = r.list()
    r.special(new)
    rnew = _clone(new)
    out = O.looksam_combine_(new, gv, nrm, p["alpha"], p["eps"], backend=backend)
    ref = reference.looksam_combine_(rnew, gv, nrm, p["alpha"], p["eps"])
    _check_scalar(out, ref, _tol(_acc(new), all64), f"{p} |g|")
    _check_list(new, rnew, all64, f"{p} combined grads", floors=_cancellation_floors(new))


@st.composite
def msam_problems(draw, **kw):
    p = draw(tensor_lists(**kw))
    n, pt = p["n"], p["per_tensor"]
    p["lr"] = _values(draw, st.sampled_from([0.0, 1e-3, 0.1]), n, pt)
    p["weight_decay"] = _values(draw, st.sampled_from([0.0, 5e-4, 0.1]), n, pt)
    p["momentum"] = _values(draw, st.sampled_from([0.0, 0.5, 0.9]), n, pt)
    p["rho_prev"] = _values(draw, st.sampled_from([0.0, 0.05, 0.5]), n, pt)
    p["rho"] = _values(draw, st.sampled_from([0.0, 0.05, 0.5]), n, pt)
    p["beta1"] = _values(draw, st.sampled_from([0.0, 0.5, 0.9]), n, pt)
    p["beta2"] = _values(draw, st.sampled_from([0.0, 0.9, 0.999]), n, pt)
    p["eps"] = _values(draw, st.sampled_from([1e-8, 1e-3]), n, pt)
    p["steps"] = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n))
    # inv_norm as the optimizers keep it (float32, float64 for float64 params; test_msam.py tries float16).
    p["inv"] = draw(st.sampled_from([0.0, 0.25, 3.0]))
    p["inv_dtype"] = draw(st.sampled_from([torch.float32, torch.float64]))
    p["norm_eps"] = draw(st.sampled_from([1e-12, 1e-3]))
    return p


def _msam_property(p, backend, rule):
    op = f"msam_{rule}_"
    skip_unless_available(backend, "cpu", op)
    r = Gen(p)
    params, grads, buf = r.list(scale=1.0), r.list(), r.list()
    r.special(grads)
    lists = [params, grads, buf]
    if rule == "adamw":  # a reachable second moment, v >= m^2
        lists.append([(a.double() ** 2 + r.randn(a.shape, torch.float64) ** 2).to(a.dtype) for a in buf])
        lists.append([torch.tensor(float(s)) for s in p["steps"]])
    ref_lists = [_clone(ts) for ts in lists]
    before = _clone(params)
    inv, rinv = (torch.full((), p["inv"], dtype=p["inv_dtype"]) for _ in range(2))
    keys = ("lr", "weight_decay", "momentum") if rule == "sgd" else ("lr", "beta1", "beta2", "eps", "weight_decay")
    keys += ("rho_prev", "rho")
    fn = O.msam_sgd_ if rule == "sgd" else O.msam_adamw_
    eps_key = "eps" if rule == "sgd" else "norm_eps"
    out = fn(*lists, inv, **{k: p[k][0] for k in keys}, **{eps_key: p["norm_eps"]}, backend=backend)
    if p["n"] == 0:
        _empty_result(out)
        assert float(inv) == p["inv"]
        return
    ref = getattr(reference, op)(*ref_lists, rinv, *(p[k][1] for k in keys), p["norm_eps"])
    all64 = _all64(params)
    _check_scalar(out, ref, _tol(_coarsest(params), all64), f"{p} norm")
    _check_scalar(inv, rinv, _tol(_coarsest(params), all64), f"{p} inv_norm")
    # The re-perturbation scales with inv_norm, one global value checked above to the tolerance of
    # the coarsest buffer (the Triton interpreter rounds bfloat16 by truncation): what its error
    # moves the weights by is allowed on top of the step's own tolerance.
    dinv = abs(float(inv) - float(rinv))
    dinv = dinv if math.isfinite(dinv) else 0.0
    floors = [2 * r * dinv * float(b.double().abs().nan_to_num(0.0, 0.0, 0.0).max()) if b.numel() else 0.0
              for r, b in zip(p["rho"][1], ref_lists[2])]
    _check_step(params, ref_lists[0], before, all64, f"{p} params", floors=floors)
    for k, name in ((2, "buffer"), (3, "exp_avg_sq"))[:len(lists) - 2]:
        _check_list(lists[k], ref_lists[k], all64, f"{p} {name}")


def _msam_sgd_property(p, backend):
    _msam_property(p, backend, "sgd")


def _msam_adamw_property(p, backend):
    _msam_property(p, backend, "adamw")


@pytest.mark.parametrize("backend", BACKENDS)
def test_looksam_property(backend):
    _check_property(looksam_problems(), _looksam_property, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_msam_property(backend, rule):
    _check_property(msam_problems(), _msam_sgd_property if rule == "sgd" else _msam_adamw_property, backend)


# ---------------------------------------------------------------------------------------------
# The SAF bank step (trajectory_bank_step) and record
# ---------------------------------------------------------------------------------------------

INT64_MIN = -(2**63)


@st.composite
def bank_problems(draw, **kw):
    N = draw(st.integers(1, 40))
    B = draw(st.integers(1, min(N, 9))) if draw(st.sampled_from([True] * 4 + [False])) else 0  # 0: empty batch
    S = draw(st.integers(1, 4))
    return dict(
        N=N, B=B, S=S, C=draw(st.sampled_from([10, 3, 257, 2, 1])),
        epoch=S + draw(st.integers(-S, 8)),  # mostly past the warm-up (epoch >= delay)
        bank_dtype=draw(st.sampled_from(tb.BANK_DTYPES)), dtype=draw(DTYPES),
        lam=draw(st.floats(0.0, 2.0)), T=draw(st.floats(0.25, 8.0)), eps=draw(st.sampled_from([0.0, 0.1])),
        ignore=draw(st.sampled_from([-100, 0])), labels=draw(st.sampled_from([True, True, False])),
        use_past=draw(st.sampled_from([True, True, False])), record=draw(st.booleans()),
        id_dtype=draw(st.sampled_from([torch.int64, torch.int32])), nan_row=draw(st.sampled_from([False, False, True])),
        ignored=draw(st.lists(st.sampled_from([False, False, True]), min_size=B, max_size=B)),
        valid=draw(st.sampled_from([0.7, 1.0, 0.3, 0.0])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _bank(p, g):
    N, S, C, epoch = p["N"], p["S"], p["C"], p["epoch"]
    values = (torch.randn(N, S, C, generator=g, dtype=torch.float64) * 3).to(p["bank_dtype"])
    epochs = torch.randint(-1, max(epoch, 1), (N, S), generator=g, dtype=torch.int32)
    slot = epoch % S
    valid = torch.rand(N, generator=g) < p["valid"]
    other = torch.tensor([-1, epoch - S + 1, epoch, epoch - 2 * S], dtype=torch.int32).clamp(min=-1)
    epochs[:, slot] = torch.where(valid, torch.tensor(epoch - S, dtype=torch.int32),
                                  other[torch.randint(0, 4, (N,), generator=g)]).clamp(min=-1)
    # A slot without a valid entry holds NaN: a correct step never reads it.
    values[:, slot][epochs[:, slot] != epoch - S] = math.nan
    claims = torch.zeros(N, dtype=torch.int32)
    state = torch.zeros(tb.STATE_SIZE, dtype=torch.int64)
    state[1] = state[2] = INT64_MIN
    state[3] = -1
    return [values, epochs, claims, state]


def _bank_property(p, backend):
    skip_unless_available(backend, "cpu", "saf_bank_step")
    g = torch.Generator().manual_seed(p["seed"])
    B, C = p["B"], p["C"]
    bank = _bank(p, g)
    ref_bank = [t.clone() for t in bank]
    ids = torch.randperm(p["N"], generator=g)[:B].to(p["id_dtype"])
    z = (torch.randn(B, C, generator=g, dtype=torch.float64) * 3).to(p["dtype"])
    if p["nan_row"] and B:
        z[-1, 0] = math.nan
    z.requires_grad_()
    y = None
    if p["labels"]:
        y = torch.randint(0, C, (B,), generator=g)
        if B:
            y[torch.tensor(p["ignored"])] = p["ignore"]
    args = (p["epoch"], p["lam"], p["T"], p["eps"], p["ignore"], p["use_past"], p["record"])
    loss, counts = tb.trajectory_bank_step(z, y, ids, *bank, *args, backend=backend)
    z64 = z.detach().double().requires_grad_()
    ref_loss, ref_counts = reference.saf_bank_step(z64, y, ids, ref_bank[0], ref_bank[1], p["epoch"], p["T"], 1.0,
                                                   p["lam"], p["eps"], p["ignore"], p["use_past"], p["record"])
    what = str(p)
    assert loss.dtype == p["dtype"] and loss.shape == (), what
    assert torch.equal(counts, ref_counts), what + f" counts {counts} vs {ref_counts}"
    assert torch.equal(bank[1], ref_bank[1]), what + " tags"
    torch.testing.assert_close(bank[0], ref_bank[0], rtol=0, atol=0, equal_nan=True)
    assert int(bank[2].abs().sum()) == 0 and int(bank[3][0]) == 0, "claims released, no error flag"
    # float32 arithmetic (float64 logits: the Triton kernel's scalar arguments are float32); the
    # KL terms carry cancellation error ~ eps * T^2 * (log C + 1 + |z| / T).
    tol = p["dtype"] if p["dtype"] != torch.float64 or backend == "cpu" else torch.float32
    eps32 = torch.finfo(torch.float32).eps if tol != torch.float64 else torch.finfo(torch.float64).eps
    floor = 4 * eps32 * (1 + p["lam"] * p["T"] ** 2) * (math.log(C) + 1 + 3 / p["T"])
    assert_close(loss, ref_loss, tol, what + " loss", atol_floor=floor)
    if not (p["nan_row"] and B):
        assert torch.isfinite(loss), what + ": a NaN slot was read"
        if B:
            (gz,) = torch.autograd.grad(loss, z)
            (gr,) = torch.autograd.grad(ref_loss, z64)
            assert_close(gz, gr, tol, what + " grad", atol_floor=floor / B)


def _record_property(p, backend):
    skip_unless_available(backend, "cpu", "saf_bank_record")
    g = torch.Generator().manual_seed(p["seed"])
    bank = _bank(p, g)
    ref_bank = [t.clone() for t in bank]
    # Ids may repeat here: an id held by several rows records none of them.
    ids = torch.randint(0, p["N"], (p["B"],), generator=g).to(p["id_dtype"])
    rows = (torch.randn(p["B"], p["C"], generator=g, dtype=torch.float64) * 3).to(p["dtype"])
    if p["nan_row"] and p["B"]:
        rows[-1, 0] = math.nan
    tb.trajectory_bank_record(rows, ids, *bank, p["epoch"], backend=backend)
    reference.saf_bank_record(rows, ids, ref_bank[0], ref_bank[1], p["epoch"])
    assert torch.equal(bank[1], ref_bank[1]), str(p) + " tags"
    torch.testing.assert_close(bank[0], ref_bank[0], rtol=0, atol=0, equal_nan=True)
    assert int(bank[2].abs().sum()) == 0 and int(bank[3][0]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_step_property(backend):
    _check_property(bank_problems(), _bank_property, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_record_property(backend):
    _check_property(bank_problems(), _record_property, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_step_nan_row_without_labels(backend):
    """Found by the property above (then a strict xfail): with labels=None a NaN row without a past
    entry takes part in no term and counts for nothing, on every backend as in the reference."""
    skip_unless_available(backend, "cpu", "saf_bank_step")
    p = dict(N=1, S=1, C=3, epoch=0, bank_dtype=torch.float32, valid=0.0)
    bank = _bank(p, torch.Generator().manual_seed(0))
    z = torch.tensor([[math.nan, 0.0, 1.0]])
    args = (0, 0.3, 2.0, 0.0, -100, False, False)  # epoch 0, use_past=False: no row can have a past entry
    loss, counts = tb.trajectory_bank_step(z, None, torch.tensor([0]), *bank, *args, backend=backend)
    ref, _ = reference.saf_bank_step(z.double(), None, torch.tensor([0]), bank[0], bank[1], 0, 2.0, 1.0, 0.3, 0.0,
                                     -100, False, False)
    assert counts.tolist() == [1, 0] and ref.item() == 0.0
    assert loss.item() == 0.0, f"loss {loss.item()}, reference 0"


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_sam_restore_sgd_empty_list_with_momentum(backend):
    # Empty lists are a no-op whatever the hyperparameters (no momentum buffers are needed).
    skip_unless_available(backend, "cpu", "sam_restore_sgd_")
    O.gsam_restore_sgd_([], [], [], [], [], lr=0.1, momentum=0.9, backend=backend)
    O.sam_restore_sgd_([], [], [], [], lr=0.1, momentum=0.9, backend=backend)


def _zero_grad_eps0(op, backend):
    w = torch.randn(5)
    p, g = [w.clone()], [torch.zeros(5)]
    if op == "sam_perturb_":
        O.sam_perturb_(p, g, [torch.empty(5)], 0.05, eps=0.0, backend=backend)
    elif op == "esam_perturb_":
        O.esam_perturb_(p, g, [torch.empty(5)], 0.05, 1.0, 7, eps=0.0, backend=backend)
    else:  # no noise applied: d = lam * g + (w - stash) = 0
        O.rsam_perturb_(p, g, [w.clone()], 0.05, eps=0.0, backend=backend)
    return p[0], w


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("op", ["sam_perturb_", "esam_perturb_", "rsam_perturb_"])
def test_zero_gradient_with_eps_0_keeps_the_weights(op, backend):
    # A zero norm perturbs nothing, whatever eps (eps = 0 once gave 0 * inf: NaN weights).
    skip_unless_available(backend, "cpu", op)
    got, w = _zero_grad_eps0(op, backend)
    assert torch.equal(got, w), got
    # ... while a non-zero gradient with eps = 0 still moves the weights by rho (sam_perturb_).
    if op == "sam_perturb_":
        w = torch.randn(5)
        p = [w.clone()]
        O.sam_perturb_(p, [torch.ones(5)], [torch.empty(5)], 0.05, eps=0.0, backend=backend)
        torch.testing.assert_close((p[0] - w).norm().item(), 0.05, rtol=1e-5, atol=0.0)

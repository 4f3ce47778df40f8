"""The Triton kernels as a GPU would compile and call them, checked on a machine without a GPU.

Under ``TRITON_INTERPRET=1`` the kernels never reach the GPU compiler, and the interpreter
differs from a launch on a GPU: a Python ``float`` argument becomes ``fp32`` on a GPU but stays a
float64 Python number in the interpreter. This module closes both gaps.

**Launch hook** (:func:`install`, from ``tests/conftest.py`` when the interpreter is on). Every
launch of a Triton kernel is bound by Triton's own binder for a CUDA target, the one a real
launch uses, which gives its specialisation: argument types (``*fp32``, ``i32``/``i64``,
``fp32``), which integers are specialised as 1 or divisible by 16, pointer alignment,
constexprs, ``num_warps``. Then

* scalar arguments reach the interpreter typed as on the GPU: a float not annotated
  ``tl.float64`` is rounded to ``fp32`` (so a kernel that loses precision on a GPU loses it in CI
  too), annotated integers get their annotated width;
* the launch is recorded, one :class:`Launch` per distinct specialisation (what a GPU's JIT cache
  would compile), with argument descriptors that any Triton version can bind again.

**Ahead-of-time compile** (:func:`compile_launches`, in a subprocess with ``TRITON_INTERPRET``
unset and a fresh cache, under the installed Triton or another one on ``PYTHONPATH``): each
recorded launch is bound again by that Triton's binder and compiled with ``triton.compile`` for
``sm_80`` and ``sm_90``; ptxas' log (``-v``) and ``cuobjdump --dump-resource-usage`` give
registers, spills, stack and shared memory.

Command line (``python -m tests.triton_aot``): ``compile`` a launch file for some architectures
(prints JSON), ``report`` several such results as ``benchmarks/results/triton-sm80-sm90.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CUDA target whose binder decides the specialisation of a recorded launch (binding does not
# depend on the architecture).
BIND_ARCH = 90
ARCHS = (80, 90)


# --------------------------------------------------------------------------------------------
# Argument descriptors: what a launch passed, in a form any Triton version can bind again.
# --------------------------------------------------------------------------------------------


class FakeTensor:
    """What Triton's binder reads of a tensor argument: its dtype and its address."""

    def __init__(self, dtype: str, ptr: int):
        self.dtype = dtype
        self._ptr = ptr

    def data_ptr(self) -> int:
        return self._ptr


def describe(value):
    """A JSON descriptor of one kernel argument (tensors by dtype and address mod 16)."""
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return {"tensor": str(value.dtype).replace("torch.", ""), "ptr_mod16": int(value.data_ptr()) % 16}
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"tl": value.name}
    if isinstance(value, tl.constexpr):
        return describe(value.value)
    if callable(getattr(value, "fn", None)) and hasattr(value.fn, "__qualname__"):
        return {"fn": kernel_id(value)}  # a triton.jit function passed as a constexpr (an element function)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}: {value!r}")


def materialize(desc):
    """The stand-in a binder sees for a descriptor: a fake tensor, a Triton dtype or the value."""
    if isinstance(desc, dict) and "tensor" in desc:
        return FakeTensor(desc["tensor"], 4096 + desc["ptr_mod16"])
    if isinstance(desc, dict) and "tl" in desc:
        import triton.language as tl

        return tl.dtype(desc["tl"])
    if isinstance(desc, dict) and "fn" in desc:
        return resolve_kernel(desc["fn"])
    return desc


# --------------------------------------------------------------------------------------------
# Binding as a GPU launch binds.
# --------------------------------------------------------------------------------------------


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    return target, make_backend(target)


_BINDERS: dict = {}


def _binder(fn, backend_key, backend):
    """Triton's binder (``create_function_from_signature``) for a JITFunction or, under the
    interpreter, an InterpretedFunction (whose parameters are rebuilt as a JITFunction's)."""
    key = (id(fn), backend_key)
    hit = _BINDERS.get(key)
    if hit is None:
        from triton.runtime.jit import KernelParam, create_function_from_signature

        pyfn = fn.fn
        sig = inspect.signature(pyfn)
        jit_kw = getattr(fn, "kwargs", None) or {}
        dns = getattr(fn, "do_not_specialize", None) or jit_kw.get("do_not_specialize") or []
        dnsa = getattr(fn, "do_not_specialize_on_alignment", None) or jit_kw.get("do_not_specialize_on_alignment") or []
        params = [
            KernelParam(i, p, i in dns or p.name in dns, i in dnsa or p.name in dnsa)
            for i, p in enumerate(sig.parameters.values())
        ]
        hit = (sig, params, create_function_from_signature(sig, params, backend))
        _BINDERS[key] = hit
    return hit


def spec_key(specialization, options) -> str:
    """One string per distinct compile: the binder's specialisation and the launch options."""
    parts = []
    for ty, val in specialization:
        if ty == "constexpr":
            parts.append(f"constexpr={describe(val)!r}")
        else:
            parts.append(f"{ty}:{val}")
    return ";".join(parts) + "|" + json.dumps(options, sort_keys=True, default=str)


@dataclass
class Launch:
    """One distinct specialisation of one kernel, as a GPU launch would compile it."""

    kernel: str  # "module:qualname"
    args: dict  # parameter name -> descriptor
    options: dict  # num_warps, num_stages, ...
    key: str  # spec_key under the Triton that recorded it
    source: str = ""  # the test that first launched it
    tags: list = field(default_factory=list)
    constexprs: list = field(default_factory=list)  # names of the constexpr parameters
    triton: str = ""  # the version that recorded it

    @property
    def name(self) -> str:
        return self.kernel.split(":")[1]


def kernel_id(fn) -> str:
    pyfn = fn.fn
    return f"{pyfn.__module__}:{pyfn.__qualname__}"


def resolve_kernel(kernel: str):
    module, qualname = kernel.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def matches_code(launch: Launch) -> bool:
    """Whether a stored launch fits the kernels as they are now: its kernel and every jit
    function it passes exist, with the parameter names it recorded."""
    try:
        fn = resolve_kernel(launch.kernel)
        if list(inspect.signature(fn.fn).parameters) != list(launch.args):
            return False
        for desc in launch.args.values():
            if isinstance(desc, dict) and "fn" in desc:
                resolve_kernel(desc["fn"])
    except (ImportError, AttributeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# The interpreter hook.
# --------------------------------------------------------------------------------------------


class Recorder:
    """Distinct launches seen in this process, by specialisation key."""

    def __init__(self):
        self.launches: dict[str, Launch] = {}
        self.current_test = ""
        self.record_only = False  # record without running (for launch configurations no test reaches)
        self.tags: list[str] = []

    def add(self, launch: Launch) -> None:
        hit = self.launches.get(launch.key)
        if hit is None:
            self.launches[launch.key] = launch
        else:
            hit.source = hit.source or launch.source
            for t in launch.tags:
                if t not in hit.tags:
                    hit.tags.append(t)

    def dump(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(launches_to_json(self.launches.values()), f, indent=1)


RECORDER = Recorder()
_INSTALLED = False
_TRITON_VERSION = ""


def launches_to_json(launches) -> dict:
    import triton

    return {"triton": triton.__version__, "launches": [asdict(x) for x in launches]}


def launches_from_json(obj) -> list[Launch]:
    return [Launch(**x) for x in obj["launches"]]


@contextlib.contextmanager
def record_only(*tags: str):
    """Launches inside record but do not run (their outputs stay unwritten)."""
    old = RECORDER.record_only, RECORDER.tags
    RECORDER.record_only, RECORDER.tags = True, list(tags)
    try:
        yield RECORDER
    finally:
        RECORDER.record_only, RECORDER.tags = old


def _typed_scalar(value, ty: str):
    """``value`` as the interpreter's scalar tensor of Triton type ``ty`` (``fp32``, ``i64``, ...)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    tl_ty = tl.str_to_ty(ty, None)
    np_ty = {"fp16": np.float16, "bf16": np.float32, "fp32": np.float32, "fp64": np.float64, "i8": np.int8,
             "i16": np.int16, "i32": np.int32, "i64": np.int64, "u8": np.uint8, "u16": np.uint16, "u32": np.uint32,
             "u64": np.uint64}[ty]
    return tl.tensor(TensorHandle(np.array([value], dtype=np_ty), tl_ty), tl_ty)


def gpu_typed_args(params, specialization, bound: dict) -> dict:
    """The bound arguments with every float (and every annotated integer) replaced by a scalar of
    the type a GPU launch passes: ``fp32`` for a plain Python float, the annotation's type else."""
    out = dict(bound)
    for kp, (ty, _) in zip(params, specialization):
        v = bound[kp.name]
        if ty == "constexpr" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) or kp.annotation_type:
            out[kp.name] = _typed_scalar(v, ty)
    return out


def install() -> None:
    """Wrap the interpreter's launch: record each launch and type its scalars as a GPU does."""
    global _INSTALLED
    if _INSTALLED:
        return
    from triton.runtime.interpreter import InterpretedFunction

    global _TRITON_VERSION
    import triton

    _TRITON_VERSION = triton.__version__
    target, backend = _backend(BIND_ARCH)
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        _, params, binder = _binder(self, BIND_ARCH, backend)
        bound, specialization, options = binder(*args, **kwargs)
        key = kernel_id(self) + "|" + spec_key(specialization, options)
        source = "" if RECORDER.record_only else RECORDER.current_test  # "": no test launched it
        launch = Launch(kernel_id(self), {k: describe(v) for k, v in bound.items()}, dict(options), key,
                        source, list(RECORDER.tags), [kp.name for kp in params if kp.is_constexpr],
                        _TRITON_VERSION)
        RECORDER.add(launch)
        if RECORDER.record_only or warmup:
            return None
        typed = gpu_typed_args(params, specialization, bound)
        return original(self, grid=grid, warmup=warmup, **typed, **options)

    InterpretedFunction.run = run
    _INSTALLED = True


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile (TRITON_INTERPRET unset).
# --------------------------------------------------------------------------------------------

_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_CUOBJ = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def compile_one(launch: Launch, arch: int) -> dict:
    """Bind ``launch`` with this Triton for ``sm_<arch>`` and compile it; registers, spills,
    shared memory, or the error."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    row = {"kernel": launch.name, "key": launch.key, "arch": arch, "triton": triton.__version__,
           "num_warps": launch.options.get("num_warps", 4), "tags": launch.tags, "source": launch.source}
    t0 = time.perf_counter()
    try:
        fn = resolve_kernel(launch.kernel)
        target, backend = _backend(arch)
        sig, params, binder = _binder(fn, arch, backend)
        args = {k: materialize(v) for k, v in launch.args.items()}
        bound, specialization, options = binder(**args, **launch.options)
        opts, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, options)
        if launch.triton == triton.__version__:  # bound again as recorded
            row["key_match"] = kernel_id(fn) + "|" + spec_key(specialization, options) == launch.key
        row["signature"] = ",".join(f"{k}:{v}" for k, v in signature.items() if v != "constexpr")
        row["constexprs"] = {str(k): describe(v) for k, v in _constexpr_names(sig, constexprs).items()}
        log = io.StringIO()
        old = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                        options=opts.__dict__)
        finally:
            knobs.nvidia.dump_ptxas_log = old
        row.update(_resources(log.getvalue(), kernel))
        row["ok"] = True
    except Exception as e:  # noqa: BLE001  (a compile error is the result)
        row["ok"] = False
        row["error"] = f"{type(e).__name__}: {str(e)[-3000:]}"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _constexpr_names(sig, constexprs) -> dict:
    names = list(sig.parameters)
    return {names[path[0]]: v for path, v in constexprs.items() if len(path) == 1}


def _resources(ptxas_log: str, kernel) -> dict:
    out = {"shared": int(getattr(kernel.metadata, "shared", 0))}
    m = _PTXAS_SPILL.search(ptxas_log)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = (int(x) for x in m.groups())
    m = _PTXAS_REGS.search(ptxas_log)
    if m:
        out["registers"] = int(m.group(1))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        r = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True)
        m = _CUOBJ.search(r.stdout)
        if m:
            reg, stack, shared, local = (int(x) for x in m.groups())
            out["cuobjdump"] = {"REG": reg, "STACK": stack, "SHARED": shared, "LOCAL": local}
            out.setdefault("registers", reg)
    finally:
        os.unlink(f.name)
    if "spill_stores" not in out:
        out["ptxas_log_missing"] = True
    return out


def _worker_init(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def _compile_job(job):
    launch, arch = job
    return compile_one(Launch(**launch), arch)


def compile_launches(launches: list[Launch], archs=ARCHS, jobs: int = 1) -> list[dict]:
    """Compile every launch for every architecture in this process (``jobs`` worker processes),
    with ``TRITON_INTERPRET`` unset and a fresh Triton cache."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_launches needs TRITON_INTERPRET unset (run it in a subprocess)")
    work = [(asdict(x), a) for x in launches for a in archs]
    # Largest first: the long compiles do not trail at the end.
    with tempfile.TemporaryDirectory(prefix="triton-aot-cache-") as cache:
        _worker_init(cache)
        if jobs <= 1:
            return [_compile_job(w) for w in work]
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(cache,)) as pool:
            return list(pool.map(_compile_job, work, chunksize=1))


def run_compile_subprocess(launches: list[Launch], archs=ARCHS, jobs: int = 1, pythonpath: str | None = None,
                           timeout: float | None = None) -> list[dict]:
    """:func:`compile_launches` in a fresh interpreter (``TRITON_INTERPRET`` unset), under the
    Triton found first on ``pythonpath`` (default: the installed one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, ROOT, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="triton-aot-") as tmp:
        src = os.path.join(tmp, "launches.json")
        out = os.path.join(tmp, "rows.json")
        with open(src, "w") as f:
            json.dump({"launches": [asdict(x) for x in launches]}, f)
        cmd = [sys.executable, "-m", "tests.triton_aot", "compile", src, "--out", out, "--jobs", str(jobs),
               "--arch", ",".join(str(a) for a in archs)]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"AOT compile process failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
        with open(out) as f:
            return json.load(f)["rows"]


# --------------------------------------------------------------------------------------------
# Launch configurations no test reaches, the quick set, the spill rule.
# --------------------------------------------------------------------------------------------

FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def launch_config_classes(limit: int = 1 << 17) -> list[int]:
    """The smallest C of each distinct trajectory-loss launch configuration (any dtype)."""
    from saf_kernels.triton.trajectory_loss import _launch_config

    seen, out = set(), []
    cands = sorted({1} | {c for k in range(1, limit.bit_length()) for c in (2**k, 2**k + 1)})
    for C in cands:
        cfg = (_launch_config(C, False), _launch_config(C, True))
        if cfg not in seen:
            seen.add(cfg)
            out.append(C)
    return out


# The probability-target (SOFT) bank-step tiles the quick set compiles: C = 33 and 129 give the
# float32 tiles 32 x 64 and 8 x 256, C = 5 the float64 tile 64 x 8 (4 warps), whose index-label
# variants took the most registers (215-223 of 255 under Triton 3.6 for sm_90; 198 in float64).
SOFT_QUICK = {"float32": (33, 129), "float64": (5,)}


def record_launch_configs() -> list[Launch]:
    """Record (without running) the launches of every trajectory-loss and bank launch
    configuration, for every float dtype, with labels and gradient (the most live values), and
    of every row tile of ``rsam_noise``. Tagged ``launch-config``; ``quick`` marks the ones the
    quick set compiles: float32 logits with a bfloat16 bank (the float32 tiles' most live
    values) and float64; with probability targets, the tiles of ``SOFT_QUICK``. Needs the
    interpreter hook."""
    import torch

    from saf_kernels.triton.rsam import rsam_noise
    from saf_kernels.triton.trajectory_bank import bank_record_triton, bank_step_triton
    from saf_kernels.triton.trajectory_loss import trajectory_loss_triton

    def tags(quick):
        return ("launch-config", "quick") if quick else ("launch-config",)

    before = set(RECORDER.launches)
    for C in launch_config_classes():
        for name in FLOAT_DTYPES:
            dt = getattr(torch, name)
            z = torch.zeros(2, C, dtype=dt)
            y = torch.zeros(2, dtype=torch.long)
            with record_only(*tags(name == "float64")):
                trajectory_loss_triton(z, z, y, 2.0, 1.0, 0.3, 0.1, -100, 2, True)
            for bank_dt in {torch.bfloat16, dt}:
                values = torch.zeros(4, 2, C, dtype=bank_dt)
                epochs = torch.full((4, 2), -1, dtype=torch.int32)
                claims = torch.zeros(4, dtype=torch.int32)
                state = torch.zeros(8, dtype=torch.int64)
                ids = torch.arange(2)
                with record_only(*tags(name == "float32" and bank_dt == torch.bfloat16)):
                    bank_step_triton(z, y, ids, values, epochs, claims, state, 2, 2.0, 1.0, 0.3, 0.1, -100, True,
                                     True, True)
                with record_only(*tags(False)):
                    bank_record_triton(z, ids, values, epochs, claims, state, 3)
            # Probability targets [B, C] (SOFT): one more tile of live values. Every configuration
            # is recorded (make triton-sweep compiles them); the quick set compiles the bank step's
            # tiles closest to the register limit (SOFT_QUICK).
            p = torch.zeros(2, C, dtype=dt)
            with record_only(*tags(False)):
                trajectory_loss_triton(z, z, p, 2.0, 1.0, 0.3, 0.0, -100, 2, True)
            bank_dt = torch.bfloat16 if name == "float32" else dt
            values = torch.zeros(4, 2, C, dtype=bank_dt)
            with record_only(*tags(C in SOFT_QUICK.get(name, ()))):
                bank_step_triton(z, p, torch.arange(2), values, torch.full((4, 2), -1, dtype=torch.int32),
                                 torch.zeros(4, dtype=torch.int32), torch.zeros(8, dtype=torch.int64), 2, 2.0, 1.0,
                                 0.3, 0.0, -100, True, True, True)
    with record_only(*tags(False)):
        for name in FLOAT_DTYPES:
            dt = getattr(torch, name)
            params = [torch.zeros(2, 2**k, dtype=dt) for k in range(12)] + [torch.zeros(5, dtype=dt)]
            rsam_noise(params, [torch.empty_like(p) for p in params], [1e-3] * len(params), 1, 0)
    return [x for k, x in RECORDER.launches.items() if k not in before or "launch-config" in x.tags]


def _dtypes(launch: Launch) -> tuple:
    return tuple(sorted({d["tensor"] for d in launch.args.values() if isinstance(d, dict) and "tensor" in d}))


# Constexprs that size a tile or a loop: their variants are the launch configurations.
SIZE_CONSTEXPRS = {"BLOCK_R", "BLOCK_C", "SINGLE", "BLOCK", "CHUNK", "LANES", "RB", "CB"}


def quick_set(launches: list[Launch]) -> list[Launch]:
    """A small set that still reaches every code path: launches chosen so that every kernel's
    flag constexprs (with ``num_warps``) and every kernel's dtype constexprs occur at least once,
    plus the launch configurations tagged ``quick`` (every tile of the trajectory loss)."""
    def flags(x):
        return (x.kernel, json.dumps(x.options, sort_keys=True), tuple(
            (k, json.dumps(x.args[k])) for k in x.constexprs
            if k not in SIZE_CONSTEXPRS and not (isinstance(x.args[k], dict) and "tl" in x.args[k])))

    def dtypes(x):
        return (x.kernel, tuple((k, x.args[k]["tl"]) for k in x.constexprs
                                if isinstance(x.args[k], dict) and "tl" in x.args[k]))

    out = [x for x in launches if "quick" in x.tags]
    cands = [(x, {("f",) + flags(x), ("d",) + dtypes(x)}) for x in launches if x.source and x not in out]
    todo = set().union(*(k for _, k in cands)) if cands else set()
    while todo:  # greedy set cover: the launch that covers most of what is left
        x, keys = max(cands, key=lambda c: len(c[1] & todo))
        out.append(x)
        todo -= keys
    return out


def must_not_spill(row: dict) -> bool:
    """The trajectory-loss kernel: no launch configuration may spill registers."""
    return row["kernel"] == "_trajectory_loss_kernel"


# --------------------------------------------------------------------------------------------
# The committed report.
# --------------------------------------------------------------------------------------------


def _git(*args) -> str:
    r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def save_rows(path: str, rows: list[dict], launches: list[Launch], mode: str) -> None:
    """One compile run's rows and the launches it compiled (the input of :func:`merge_report`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"mode": mode, "rows": rows, "launches": [asdict(x) for x in launches]}, f)


def merge_report(path: str, rows: list[dict], launches: list[Launch], mode: str = "full") -> None:
    """Write ``path``.json (every row) and ``path``.md (per kernel summary), replacing the rows
    of the same launches, Triton version and architecture."""
    import datetime

    old = {}
    if os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            old = json.load(f)
    new = {(r["triton"], r["key"], r["arch"]) for r in rows}
    kept = [r for r in old.get("rows", []) if (r["triton"], r["key"], r["arch"]) not in new]
    all_rows = kept + rows
    what = ("every distinct Triton launch of the test suite (TRITON_INTERPRET=1) plus every launch configuration"
            if mode == "full" else
            "the quick set of make test: launches of the test suite (TRITON_INTERPRET=1) that reach every "
            "kernel's flag and dtype constexprs, plus every trajectory-loss launch configuration (float32 logits "
            "with a bfloat16 bank, float64); Triton 3.6 for sm_90 only")
    obj = {
        "what": what + ", compiled ahead of time for sm_80 and sm_90 (tests/triton_aot.py)",
        "mode": mode,
        "commit": _git("rev-parse", "--short", "HEAD"),
        "date": datetime.date.today().isoformat(),
        "tritons": sorted({r["triton"] for r in all_rows}),
        "launches": list(({x["key"]: x for x in old.get("launches", [])} | {x.key: asdict(x) for x in launches})
                         .values()),
        "rows": sorted(all_rows, key=lambda r: (r["triton"], r["kernel"], r["key"], r["arch"])),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".json", "w") as f:
        json.dump(obj, f, indent=1)
    with open(path + ".md", "w") as f:
        f.write(render_markdown(obj))


def render_markdown(obj: dict) -> str:
    rows = obj["rows"]
    lines = [
        "# Triton kernels compiled for sm_80 and sm_90",
        "",
        f"Commit {obj['commit']}, {obj['date']}; Triton {', '.join(obj['tritons'])}: {obj['what']}.",
        "Registers and spills from ptxas -v, shared memory from Triton's metadata (dynamic) and cuobjdump.",
        "",
        "## Per kernel",
        "",
        "| kernel | Triton | arch | launches | errors | registers (max) | spill stores (max, B) | stack (max, B) "
        "| shared (max, B) | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["triton"], r["arch"]), []).append(r)
    for (kernel, version, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if r["ok"]]
        mx = lambda k: max((r.get(k, 0) for r in ok), default=0)  # noqa: E731
        lines.append(f"| {kernel} | {version} | sm_{arch} | {len(rs)} | {len(rs) - len(ok)} | {mx('registers')} | "
                     f"{mx('spill_stores')} | {mx('stack')} | {mx('shared')} | "
                     f"{sum(r['seconds'] for r in rs):.0f} |")
    lines += ["", "## Trajectory loss: launch configurations (labels and gradient)", "",
              "| Triton | arch | ACC | bank | BLOCK_R x BLOCK_C | single | warps | logits, target | registers "
              "| spill stores (B) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    traj = [r for r in rows if r["kernel"] == "_trajectory_loss_kernel" and "launch-config" in r.get("tags", [])
            and r["ok"]]
    for r in sorted(traj, key=lambda r: (r["triton"], r["arch"], str(r["constexprs"].get("ACC")),
                                         bool(r["constexprs"].get("BANK")), r["constexprs"]["BLOCK_C"],
                                         r["constexprs"]["BLOCK_R"], r["signature"])):
        c = r["constexprs"]
        sig = dict(t.split(":") for t in r["signature"].split(","))
        dts = f"{sig['z_ptr'][1:]}, {sig['t_ptr'][1:]}"
        lines.append(f"| {r['triton']} | sm_{r['arch']} | {c['ACC']['tl']} | {bool(c.get('BANK'))} | "
                     f"{c['BLOCK_R']} x {c['BLOCK_C']} | {c['SINGLE']} | {r['num_warps']} | {dts} | "
                     f"{r.get('registers')} | {r.get('spill_stores')} |")
    errors = [r for r in rows if not r["ok"]]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r['kernel']} sm_{r['arch']} Triton {r['triton']}: "
                                          f"{r['error'].splitlines()[0]}" for r in errors]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.triton_aot", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile a launch file for sm_80/sm_90 under this Triton")
    c.add_argument("launches")
    c.add_argument("--out", required=True)
    c.add_argument("--arch", default="80,90")
    c.add_argument("--jobs", type=int, default=1)
    r = sub.add_parser("report", help="merge compile rows (build/triton-aot-*.json) into the committed report")
    r.add_argument("rows", nargs="+")
    r.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "triton-sm80-sm90"))
    args = ap.parse_args(argv)
    if args.cmd == "report":
        for path in args.rows:
            with open(path) as f:
                saved = json.load(f)
            merge_report(args.out, saved["rows"], launches_from_json(saved), saved["mode"])
        return 0
    if args.cmd == "compile":
        with open(args.launches) as f:
            launches = launches_from_json(json.load(f))
        archs = tuple(int(a) for a in args.arch.split(","))
        t0 = time.perf_counter()
        rows = compile_launches(launches, archs, args.jobs)
        import triton

        with open(args.out, "w") as f:
            json.dump({"triton": triton.__version__, "seconds": round(time.perf_counter() - t0, 1), "rows": rows},
                      f, indent=1)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(_main())

"""``python -m saf_kernels.bench``: every fused op against eager PyTorch and torch.compile, and
every method's training step against plain SGD, on an embedded default that needs no download.

Examples::

    python -m saf_kernels.bench --quick
    python -m saf_kernels.bench --ops saf_loss --json out.json --plot out.png
    python -m saf_kernels.bench --ops none --methods none --sharded    # DDP and FSDP2, 2 processes
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import ops as op_bench
from .report import Progress, environment, method_table, op_table, render, soft_table, write_json, write_plot


def _methods_module():
    try:
        from . import methods

        return methods
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    methods_mod = _methods_module()
    known_methods = list(methods_mod.METHODS) if methods_mod else []
    ap = argparse.ArgumentParser(prog="python -m saf_kernels.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--quick", action="store_true", help="a short run (under a minute on a 2-core CPU)")
    ap.add_argument("--ops", default=None,
                    help=f"comma-separated ops to run ({','.join(op_bench.OP_NAMES)}), or 'none'")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated methods to run ({','.join(known_methods) or 'none available'}), or 'none'")
    ap.add_argument("--json", default=None, metavar="PATH", help="write machine-readable results here")
    ap.add_argument("--plot", default=None, metavar="PATH", help="write a PNG chart of the ratios here")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baselines (slow to build)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--sharded", action="store_true",
                    help="also SGD / SAM / SAM fused_step under DDP and FSDP2 in 2 processes, with the collectives "
                         "counted (saf_kernels.bench.sharded; a few minutes on a 2-core CPU)")
    ap.add_argument("--fused-linear-big", action="store_true",
                    help="fused_linear: add 8192x512x50257 (CPU, minutes) and 8192x4096x128256 bf16 (CUDA)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    ops = None if args.ops is None else [o for o in args.ops.split(",") if o and o != "none"]
    if ops:
        unknown = set(ops) - set(op_bench.OP_NAMES)
        if unknown:
            ap.error(f"unknown ops {sorted(unknown)}; known: {sorted(op_bench.OP_NAMES)}")
    methods = None if args.methods is None else [m for m in args.methods.split(",") if m and m != "none"]
    if methods:
        unknown = set(methods) - set(known_methods)
        if unknown:
            ap.error(f"unknown methods {sorted(unknown)}; known: {known_methods}")

    env = environment(device)
    progress = Progress(enabled=not args.no_progress)
    t0 = time.perf_counter()
    rows: list[dict] = []
    sections: dict[str, str] = {}
    if ops != []:
        rows += op_bench.run_op_benchmarks(device, args.quick, ops, progress, compile_baseline=not args.no_compile)
        title = "Fused ops, forward + backward (median per call; speed-up = baseline time / fused time)"
        if any(r.get("kind") == "op" for r in rows):
            sections[title] = op_table(rows)
        if any(r.get("op", "").endswith("_soft") for r in rows):
            sections["Probability (soft) targets beside class indices (ce+kl: F.cross_entropy on the probabilities, "
                     "then the fused KL)"] = soft_table(rows)
        # ---- multi-tensor family ----
        if any(r.get("kind") == "multi_tensor" for r in rows):
            from .multi_tensor import table as multi_tensor_table

            sections["SAM first_step + second_step (SGD momentum base; everything but forward/backward)"] = \
                multi_tensor_table(rows)
        # ---- end multi-tensor family ----
        if ops is None or "triton_tables" in ops:
            from . import host_overhead

            hrows = host_overhead.run(device, args.quick)
            rows += hrows
            sections[host_overhead.TITLE] = host_overhead.table(hrows)
        if ops is None or "fused_linear" in ops:
            from . import fused_linear

            frows = fused_linear.run(device, args.quick, big=args.fused_linear_big, progress=progress,
                                     compile_baseline=not args.no_compile)
            rows += frows
            sections[fused_linear.TITLE] = fused_linear.table(frows)
    if methods != []:
        if methods_mod is None:
            sections["Training step vs plain SGD"] = "not available in this version"
        else:
            mrows = methods_mod.run_method_benchmarks(device, args.quick, methods, progress)
            rows += mrows
            sections[methods_mod.TITLE.format(**methods_mod.describe(device, args.quick))] = method_table(mrows)
    if args.sharded:
        from . import sharded

        srows, fields = sharded.run(device, args.quick, progress)
        rows += srows
        sections[sharded.TITLE.format(**fields) if fields else "Sharded training"] = sharded.table(srows)
    progress.close()
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    text = render(env, rows, sections)
    print(text)
    print(f"\n(ran in {env['wall_s']} s)")
    if args.json:
        write_json(args.json, env, rows, text)
        print(f"results written to {args.json}")
    if args.plot:
        err = write_plot(args.plot, rows)
        print(f"plot: {err}" if err else f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

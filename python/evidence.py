"""The evidence table: for each method, test accuracy, top Hessian eigenvalue, worst loss increase
in a rho-ball and step time relative to SGD, over several seeds, on the embedded MNIST digits.

    python python/evidence.py                       # every method, 3 seeds (~30 min on 2 CPU cores)
    python python/evidence.py --methods sgd,sam,saf --seeds 0,1 --epochs 10 --json out.json

Runs ``python/train.py``'s ``run`` in this process, one configuration after another (no two
runs share the CPU), and prints a Markdown table: mean +- standard deviation over seeds. Step
time is each run's median training step divided by the SGD run's of the same seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402


def _ms(xs):
    if len(xs) == 1:
        return f"{xs[0]:.3g}"
    return f"{statistics.mean(xs):.3g} ± {statistics.stdev(xs):.2g}"


def _meta() -> dict:
    import platform
    import subprocess

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    return dict(commit=commit, date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine())


def make_table(results: dict[str, list[dict]], seeds: list[int]) -> str:
    """Markdown table: mean ± std over seeds; the step-time ratio as the median over seeds with
    its range (one run's step time is at the mercy of other load on a shared machine)."""
    sgd_step = {r["seed"]: r["step_ms_median"] for r in results["sgd"]}
    cfg = results["sgd"][0]
    lines = [
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), {cfg['epochs']} epochs; mean ± std over seeds, "
        f"step time: median over seeds (min-max). rho-ball increase at rho = {cfg['rho']}.",
        "",
        "| method | test accuracy (%) | top Hessian eigenvalue | loss increase in rho-ball | step time vs SGD |",
        "|---|---|---|---|---|",
    ]
    for m, rs in results.items():
        acc = [100 * r["test_acc"] for r in rs]
        eig = [r["hessian_top_eig"] for r in rs]
        ball = [r["rho_ball_increase"] for r in rs]
        ratio = sorted(r["step_ms_median"] / sgd_step[r["seed"]] for r in rs)
        spread = f" ({ratio[0]:.2f}-{ratio[-1]:.2f})" if len(ratio) > 1 else ""
        lines.append(f"| {m} | {_ms(acc)} | {_ms(eig)} | {_ms(ball)} | {statistics.median(ratio):.2f}x{spread} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(train.METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--render", default=None, metavar="JSON", help="print the table of a saved run and exit")
    args, train_args = ap.parse_known_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        print(make_table(saved["results"], sorted({r["seed"] for r in saved["results"]["sgd"]})))
        return 0
    methods = [m for m in args.methods.split(",") if m]
    if "sgd" not in methods:
        methods.insert(0, "sgd")
    seeds = [int(s) for s in args.seeds.split(",") if s]

    results: dict[str, list[dict]] = {m: [] for m in methods}
    t0 = time.perf_counter()
    for seed in seeds:
        for m in methods:
            extra = ["--threads", str(args.threads)] if args.threads else []
            a = train.parse_args(["--method", m, "--seed", str(seed), "--quiet", *extra, *train_args])
            if a.threads:
                import torch

                torch.set_num_threads(a.threads)
            r = train.run(a)
            results[m].append(r)
            print(f"[{time.perf_counter() - t0:6.0f} s] {m:5s} seed {seed}: test {100 * r['test_acc']:.2f}%  "
                  f"eig {r['hessian_top_eig']:.2f}  ball {r['rho_ball_increase']:.4f}  step "
                  f"{r['step_ms_median']:.1f} ms", flush=True)

    table = make_table(results, seeds)
    print("\n" + table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table, "results": results, "argv": sys.argv[1:], "meta": _meta()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

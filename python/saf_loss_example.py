"""The fused SAF loss in a hand-written training loop (no helper classes).

Keeps each sample's logits from ``delay`` epochs ago in a tensor indexed by sample id and adds
``lam * T^2 * KL(past || current)`` to the cross-entropy once ``epoch >= start_epoch``, with one
fused kernel for the loss and its gradient. Runs in a few seconds on a CPU:

    python python/saf_loss_example.py
"""

from __future__ import annotations

import argparse

import torch

import saf_kernels as sk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--delay", type=int, default=2)
    ap.add_argument("--start-epoch", type=int, default=3)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()

    torch.manual_seed(0)
    n, d, classes = 2048, 32, 10
    x = torch.randn(n, d)
    w_true = torch.randn(d, classes)
    y = (x @ w_true + 0.5 * torch.randn(n, classes)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # past[e % delay, i] holds sample i's logits of epoch e; the same slot is read, then overwritten.
    past = torch.zeros(args.delay, n, classes)
    for epoch in range(args.epochs):
        perm = torch.randperm(n)
        total = 0.0
        for ids in perm.split(128):
            logits = model(x[ids])
            slot = epoch % args.delay
            if epoch >= args.start_epoch:
                loss = sk.saf_loss(logits, y[ids], past[slot, ids], lam=0.3, temperature=5.0, backend=args.backend)
            else:
                loss = torch.nn.functional.cross_entropy(logits, y[ids])
            past[slot, ids] = logits.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(ids)
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        print(f"epoch {epoch}: loss {total / n:.4f}  train accuracy {acc:.3f}")


if __name__ == "__main__":
    main()

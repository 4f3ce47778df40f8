"""MESA and SAF for a language model, through the fused linear + CE + KL loss: a small causal
transformer (plain PyTorch) trained on the bytes of the standard library's own ``.py`` files (no
download), with plain cross-entropy, with MESA (an EMA teacher's hidden states and lm_head), and
with SAF through a top-k trajectory bank (k logits per token from ``delay`` epochs ago).

    python python/lm_mesa.py                 # ~1-2 minutes on a 2-core CPU
    python python/lm_mesa.py --steps 600 --layers 4 --device cuda

The output layer never materialises ``[tokens, V]`` logits for the loss:

    h = model.hidden(x)                                              # [B, T, d]
    loss = sk.fused_linear_trajectory_loss(h, model.lm_head.weight, y,            # MESA
                                           mesa.teacher.hidden(x), mesa.teacher.lm_head.weight)
    loss = sk.fused_linear_trajectory_loss(h, model.lm_head.weight, y,            # SAF
                                           target_topk=bank.lookup(ids, epoch))
    bank.record_linear(ids, h, model.lm_head.weight, epoch=epoch)

Samples are fixed windows of the training bytes (their index is the sample id SAF's bank needs);
an epoch is one pass over them. Prints, per method, the validation loss (cross-entropy in nats
per byte on held-out windows), the median step time and the peak memory of the run after its
first step (peak RSS growth on CPU, ``max_memory_allocated`` on CUDA). With V = 256 bytes the logits are small: this
shows the API and the training behaviour; the memory saving at V = 32k-256k is in the benchmark
(``python -m saf_kernels.bench --ops fused_linear``).
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

import torch
import torch.nn as nn

import saf_kernels as sk
from saf_kernels.bench.fused_linear import map_large_allocations, peak_bytes, reset_peak

V = 256  # bytes


def corpus(max_bytes: int) -> torch.Tensor:
    """The standard library's .py files (sorted by path), concatenated, as bytes."""
    root = os.path.dirname(os.__file__)
    out, n = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, "rb") as f:
            b = f.read()
        out.append(b)
        n += len(b)
        if n >= max_bytes:
            break
    data = b"".join(out)[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class ByteLM(nn.Module):
    """Token + position embeddings, pre-norm causal transformer layers, final norm, lm_head."""

    def __init__(self, d: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.tok = nn.Embedding(V, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, V, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos[:t]
        return self.norm(self.blocks(h, mask=self.mask[:t, :t], is_causal=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(x))


@torch.no_grad()
def val_loss(model: ByteLM, val: torch.Tensor) -> float:
    model.eval()
    x, y = val[:, :-1], val[:, 1:]
    loss = nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)).item()
    model.train()
    return loss


def train(method: str, train_windows: torch.Tensor, val: torch.Tensor, args, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    seq = train_windows.shape[1] - 1
    model = ByteLM(args.d, args.layers, args.heads, seq).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    mesa = sk.MESA(model, lam=args.lam, temperature=args.temperature, decay=args.decay) if method == "mesa" else None
    bank = sk.TopKTrajectoryBank(train_windows.shape[0], k=args.k, tokens=seq, delay=args.delay,
                                 device=device) if method == "saf" else None
    n = train_windows.shape[0]
    per_epoch = n // args.batch
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(n, generator=gen)
    base, times = 0, []
    for step in range(args.steps):
        if step == min(1, args.steps - 1):  # after the first (warm-up) step: the steady state's peak
            base = reset_peak(device)
        epoch, i = divmod(step, per_epoch)
        if i == 0 and step:
            order = torch.randperm(n, generator=gen)
        ids = order[i * args.batch:(i + 1) * args.batch].to(device)
        xy = train_windows[ids]
        x, y = xy[:, :-1], xy[:, 1:]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if method == "ce":
            loss = nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
        else:
            h = model.hidden(x)
            w = model.lm_head.weight
            if method == "mesa":
                with torch.no_grad():
                    th = mesa.teacher.hidden(x)
                loss = sk.fused_linear_trajectory_loss(h, w, y, th, mesa.teacher.lm_head.weight, lam=args.lam,
                                                       temperature=args.temperature)
            else:
                loss = sk.fused_linear_trajectory_loss(h, w, y, target_topk=bank.lookup(ids, epoch), lam=args.lam,
                                                       temperature=args.temperature)
                bank.record_linear(ids, h, w, epoch=epoch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mesa is not None:
            mesa.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = peak_bytes(device)
    res = {"method": method, "val_loss": val_loss(model, val), "train_loss": float(loss.detach()),
           "step_ms": 1e3 * statistics.median(times[1:] or times),
           "peak_mib": max(peak - base, 0) / 2**20}
    if bank is not None:
        res["bank_mib"] = bank.nbytes / 2**20
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--methods", default="ce,mesa,saf")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-windows", type=int, default=256, help="training samples (fixed windows: SAF's ids)")
    ap.add_argument("--val-windows", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lam", type=float, default=0.8)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--decay", type=float, default=0.99)
    ap.add_argument("--k", type=int, default=32, help="top-k logits per token in SAF's bank")
    ap.add_argument("--delay", type=int, default=1, help="SAF: epochs back the target is")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        map_large_allocations()
    w = args.seq + 1
    data = corpus((args.train_windows + args.val_windows) * w)
    windows = data[: (data.numel() // w) * w].view(-1, w)
    train_windows = windows[: args.train_windows].to(device)
    val = windows[args.train_windows: args.train_windows + args.val_windows].to(device)
    results = [train(m, train_windows, val, args, device) for m in args.methods.split(",") if m]
    if not args.quiet:
        epochs = args.steps / max(args.train_windows // args.batch, 1)
        print(f"{args.steps} steps ({epochs:.1f} epochs) of batch {args.batch} x {args.seq} bytes, d={args.d}, "
              f"{args.layers} layers, {device}")
        print(f"{'method':<6} {'val loss':>9} {'train loss':>11} {'step':>10} {'peak memory':>12}")
        for r in results:
            peak = f"{r['peak_mib']:.1f} MiB"
            extra = f"  (bank {r['bank_mib']:.2f} MiB)" if "bank_mib" in r else ""
            print(f"{r['method']:<6} {r['val_loss']:>9.4f} {r['train_loss']:>11.4f} {r['step_ms']:>7.1f} ms "
                  f"{peak:>12}{extra}")
    return {"results": results}


if __name__ == "__main__":
    main()

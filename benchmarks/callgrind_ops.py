"""K calls of each named fused multi-tensor op on a ResNet-18-sized CPU parameter list, for counting
instructions under callgrind (load-independent, unlike timings on a shared machine):

    OMP_NUM_THREADS=1 valgrind --tool=callgrind python benchmarks/callgrind_ops.py 3 perturb,sgd
    callgrind_annotate --inclusive=yes callgrind.out.* | grep 'saf::cpu::.*_cpu('

Ops: perturb, asam, restore, sgd, adamw, ema, gsam, rsam (the C++ CPU kernels, ``backend="cpu"``).
"""

import sys

import torch

import saf_kernels.ops as O

SHAPES = ([(64, 3, 7, 7), (64,), (64,)] + [(128, 64, 3, 3), (128,)] * 4 + [(256, 128, 3, 3)] * 3
          + [(512, 256, 3, 3)] * 3 + [(1000, 512), (1000,)])


def main(k: int, ops: list[str]) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    P = [torch.randn(s) for s in SHAPES]
    G = [torch.randn(s) for s in SHAPES]
    S = [torch.empty_like(p) for p in P]
    B = [torch.zeros_like(p) for p in P]
    B2 = [torch.zeros_like(p) for p in P]
    steps = [torch.zeros((), dtype=torch.float32) for _ in P]
    O.sam_perturb_(P, G, S, 0.05, backend="cpu")  # fills the stash for the restores
    calls = {
        "perturb": lambda: O.sam_perturb_(P, G, S, 0.05, backend="cpu"),
        "asam": lambda: O.sam_perturb_(P, G, S, 0.5, adaptive=True, eta=0.01, backend="cpu"),
        "restore": lambda: O.sam_restore_(P, S, backend="cpu"),
        "sgd": lambda: O.sam_restore_sgd_(P, G, S, B, lr=0.1, weight_decay=5e-4, momentum=0.9, backend="cpu"),
        "adamw": lambda: O.sam_restore_adamw_(P, G, S, B, B2, steps, lr=1e-3, weight_decay=0.01, backend="cpu"),
        "ema": lambda: O.ema_update_(B, P, 0.999, backend="cpu"),
        "gsam": lambda: O.gsam_combine_(P, G, B, S, alpha=0.1, backend="cpu"),
        "rsam": lambda: O.rsam_perturb_(P, G, S, 0.05, backend="cpu"),
    }
    for op in ops:
        for _ in range(k):
            calls[op]()
    print(sum(p.numel() for p in P), "elements per call")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2].split(","))

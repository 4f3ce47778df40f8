"""Per-step seeds of the random optimizers (ESAM, R-SAM): a Python counter, no device work.

Each step's Philox key is ``splitmix64(seed + step)``: distinct keys for distinct steps, and a
resumed run (seed and step restored from the state dict) draws exactly the masks / noise it
would have drawn.
"""

from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """Steele, Lea and Flood's SplitMix64 finaliser: a bijection of 64-bit ints that scatters
    neighbouring inputs."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def default_seed() -> int:
    """A seed from torch's default CPU generator, so that ``torch.manual_seed`` fixes it."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def as_signed(x: int) -> int:
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def step_key(seed: int, step: int) -> int:
    """The Philox key of a step, as the signed 64-bit int the ops take."""
    return as_signed(splitmix64((seed + step) & MASK64))


def check_seed(seed, cls: str) -> int:
    if seed is None:
        return default_seed()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{cls}: seed must be an int or None, got {seed!r}")
    return seed & MASK64


def stream_state(opt) -> dict:
    """The checkpoint entries of an optimizer that draws from a seeded stream: seed and step."""
    return {"seed": opt._seed, "step": opt._step}


def load_stream_state(opt, info: dict) -> bool:
    """Restore :func:`stream_state`'s entries if the checkpoint has them (False if not)."""
    if "seed" not in info:
        return False
    opt._seed = int(info["seed"]) & MASK64
    opt._step = int(info["step"])
    return True

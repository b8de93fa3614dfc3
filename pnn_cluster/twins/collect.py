"""Collect calibration samples from a device, with repeats to measure its noise floor.

A device holds one parameter setting per call, so samples come in *groups*:
one parameter setting, a batch of inputs, and ``repeats`` measurements of
that same batch. The spread between repeats is the device's own
repeatability: no twin can predict a single measurement better than that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pnn_cluster.devices.base import Device

__all__ = ["Samples", "collect", "nmse"]


def nmse(pred, target) -> float:
    """Normalised mean squared error: mean((pred - target)^2) / var(target)."""
    p = torch.as_tensor(pred, dtype=torch.float64)
    t = torch.as_tensor(target, dtype=torch.float64)
    return float(((p - t) ** 2).mean() / t.var().clamp_min(1e-30))


@dataclass
class Samples:
    """Measured groups: ``x[g]`` (batch, n_in), ``params[g]`` {name: array}, ``y[g]`` (repeats, batch, n_out)."""

    x: list[np.ndarray]
    params: list[dict[str, np.ndarray]]
    y: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.x)

    @property
    def n_samples(self) -> int:
        return sum(len(x) for x in self.x)

    @property
    def device_samples(self) -> int:
        """Samples the device measured, repeats included."""
        return sum(y.shape[0] * y.shape[1] for y in self.y)

    def split(self, holdout: float = 0.2, seed: int = 0) -> tuple[Samples, Samples]:
        """Split by group (never the same parameter setting on both sides)."""
        n = len(self)
        n_val = max(1, int(round(holdout * n)))
        if n_val >= n:
            raise ValueError(f"cannot hold out {n_val} of {n} groups; collect more groups")
        order = np.random.default_rng(seed).permutation(n)
        val, train = order[:n_val], order[n_val:]
        return self.subset(train), self.subset(val)

    def subset(self, idx) -> Samples:
        return Samples([self.x[i] for i in idx], [self.params[i] for i in idx], [self.y[i] for i in idx])

    def __add__(self, other: Samples) -> Samples:
        return Samples(self.x + other.x, self.params + other.params, self.y + other.y)

    def noise_floor(self) -> float:
        """NMSE of one measurement against the noise-free truth, estimated from repeat pairs.

        For repeats y1, y2 with independent noise, E[(y1 - y2)^2] = 2 sigma^2,
        so the floor is mean((y1 - y2)^2) / 2 / var(y).
        """
        diffs, ys = [], []
        for y in self.y:
            if y.shape[0] < 2:
                continue
            diffs.append(((y[1:] - y[:1]) ** 2).reshape(-1))
            ys.append(y.reshape(-1))
        if not diffs:
            raise ValueError("the noise floor needs repeats >= 2")
        d = np.concatenate(diffs)
        allv = np.concatenate(ys)
        return float(d.mean() / 2.0 / max(allv.var(), 1e-30))


ParamSampler = Callable[[np.random.Generator], Mapping[str, np.ndarray]]
InputSampler = Callable[[np.random.Generator, int], np.ndarray]


def uniform_params(device: Device) -> ParamSampler:
    def sample(rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {p.name: rng.uniform(p.low, p.high, size=p.shape) for p in device.spec.params}

    return sample


def uniform_inputs(device: Device) -> InputSampler:
    port = device.spec.input
    if not (np.isfinite(port.low) and np.isfinite(port.high)):
        raise ValueError(f"{device.spec.name}: input range is unbounded; pass an input sampler to collect()")

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.uniform(port.low, port.high, size=(n, port.size))

    return sample


def collect(
    device: Device,
    groups: int = 40,
    batch: int = 128,
    repeats: int = 2,
    seed: int = 0,
    sample_params: ParamSampler | None = None,
    sample_inputs: InputSampler | None = None,
    progress: bool = True,
    purpose: str | None = None,
) -> Samples:
    """Measure ``groups`` random parameter settings, each on ``batch`` random inputs, ``repeats`` times.

    Inputs and parameters are drawn within the device's limits (uniformly by
    default), so collection never asks the hardware for anything it refuses.
    ``purpose``: the device's noise stream for these samples (:meth:`Device.noise_stream`); the stream in
    use before is taken up again after them, so a check between training steps leaves training's noise
    as it was (a simulation's; real hardware has the noise it has).
    """
    if groups < 1 or batch < 1 or repeats < 1:
        raise ValueError(f"collect: groups, batch and repeats must be >= 1, got {groups}, {batch}, {repeats}")
    before = getattr(device, "noise_purpose", None)
    if purpose is not None:
        device.noise_stream(purpose)
    try:
        return _collect(device, groups, batch, repeats, seed, sample_params, sample_inputs, progress)
    finally:
        if purpose is not None and before is not None:
            device.noise_stream(before)


def _collect(device: Device, groups: int, batch: int, repeats: int, seed: int, sample_params: ParamSampler | None,
             sample_inputs: InputSampler | None, progress: bool) -> Samples:
    rng = np.random.default_rng(seed)
    sample_params = sample_params or uniform_params(device)
    sample_inputs = sample_inputs or uniform_inputs(device)
    out = Samples([], [], [])
    for _ in tqdm(range(groups), desc=f"collect {device.spec.name}", unit="group", disable=not progress,
                  leave=False):
        params = {k: np.asarray(v, dtype=np.float64) for k, v in sample_params(rng).items()}
        x = np.asarray(sample_inputs(rng, batch), dtype=np.float64)
        device.set_params(params)
        ys = np.stack([device.forward(x) for _ in range(repeats)])
        out.x.append(x)
        out.params.append(params)
        out.y.append(ys)
    return out

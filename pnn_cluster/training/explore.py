"""Where a refinement's exploratory device samples are drawn: parameters around the current ones, within the
device's limits, and inputs from the rows training sent; or, to check a refit beyond training's region, over each
parameter's and the input's whole range (see :mod:`~pnn_cluster.training.recalibration`); or, to measure a
reference again, the very setting and inputs measured before."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["AroundParams", "AtSetting", "FromRows", "OverInputs", "OverRange", "TheseRows"]


class AroundParams:
    """Exploratory parameter settings: the current ones plus normal steps of ``spread`` x each range,
    reflected back into the limits (so no value the device refuses is ever asked for)."""

    def __init__(self, center: Mapping[str, np.ndarray], spec: Any, spread: float) -> None:
        self.center = {k: np.asarray(v, dtype=np.float64) for k, v in center.items()}
        self.limits = {p.name: (float(p.low), float(p.high)) for p in spec.params}
        self.spread = spread

    def __call__(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = {}
        for name, c in self.center.items():
            lo, hi = self.limits[name]
            width = hi - lo if math.isfinite(hi - lo) else max(1.0, float(np.abs(c).max(initial=0.0)))
            v = c + self.spread * width * rng.standard_normal(c.shape)
            if math.isfinite(lo):
                v = np.where(v < lo, 2 * lo - v, v)
            if math.isfinite(hi):
                v = np.where(v > hi, 2 * hi - v, v)
            out[name] = np.clip(v, lo, hi)  # a second reflection's remainder; spread <= 1 keeps it rare
        return out


class FromRows:
    """Exploratory inputs: rows training sent to the device lately (the data's own distribution)."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = np.asarray(rows, dtype=np.float64)

    def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.rows[rng.integers(0, len(self.rows), size=n)]


class OverRange:
    """Settings spread over each parameter's whole range, as a first calibration draws them (uniformly within
    the limits). A parameter with an open limit has no range to spread over: it is drawn around its current
    value, as :class:`AroundParams` does with a spread of 1."""

    def __init__(self, center: Mapping[str, np.ndarray], spec: Any) -> None:
        self.limits = {p.name: (float(p.low), float(p.high)) for p in spec.params}
        self.shapes = {p.name: tuple(p.shape) for p in spec.params}
        self.around = AroundParams(center, spec, 1.0)

    def __call__(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        around = None
        out = {}
        for name, (lo, hi) in self.limits.items():
            if math.isfinite(lo) and math.isfinite(hi):
                out[name] = rng.uniform(lo, hi, size=self.shapes[name])
            else:
                around = around or self.around(rng)
                out[name] = around[name]
        return out


class OverInputs:
    """Inputs spread over the device's input range, as a first calibration draws them (uniformly); a device
    whose input range is open is given rows training sent instead (:class:`FromRows`)."""

    def __init__(self, spec: Any, rows: np.ndarray) -> None:
        port = spec.input
        self.low, self.high, self.size = float(port.low), float(port.high), int(port.size)
        self.rows = FromRows(rows)

    def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if math.isfinite(self.low) and math.isfinite(self.high):
            return rng.uniform(self.low, self.high, size=(n, self.size))
        return self.rows(rng, n)


class AtSetting:
    """One parameter setting, every time (a reference measured again)."""

    def __init__(self, params: Mapping[str, np.ndarray]) -> None:
        self.params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}

    def __call__(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.params.items()}


class TheseRows:
    """These input rows, in order (a reference measured again: row for row what was measured before)."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = np.array(rows, dtype=np.float64)

    def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if n != len(self.rows):
            raise ValueError(f"TheseRows: asked for {n} rows; it holds {len(self.rows)}")
        return self.rows.copy()

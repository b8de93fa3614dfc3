"""The operating region of a trained network: where training runs each physical layer, and twins judged there.

PAT evaluates a twin at the inputs a physical layer measured and at the settings training gave that layer,
not at uniform random ones. A network's layers see a small part of their devices' range (rescaled
activations, parameters near their start), where both the twin's error and the device's noise floor can
differ several-fold from their uniform figures. So a twin is judged twice: on uniform held-out settings,
and on the operating region a training run recorded.

A run records, per physical layer, the settings at a sample of its training steps and some of the inputs
the layer measured at each (:class:`~pnn_cluster.training.operating.OperatingRecorder`, from the
measurements PAT makes anyway); :class:`OperatingRegion` holds them and saves them as one ``.npz``.
:func:`measure_region` draws a recorded step's settings together with inputs recorded at that same step
(a layer's inputs depend on the settings of the layers before it, so they are drawn as pairs), measures
them on the device with repeats, and so gives :class:`~pnn_cluster.twins.collect.Samples` whose own
``noise_floor()`` is the region's floor and on which ``evaluate_twin`` is the twin's NMSE where it is used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pnn_cluster.devices.base import Device
from pnn_cluster.devices.spec import DeviceSpec
from pnn_cluster.twins.collect import Samples, collect
from pnn_cluster.twins.fit import evaluate_twin

__all__ = ["LayerRegion", "OperatingRegion", "RegionDraw", "measure_region", "region_figures"]

#: the file's format: bumped when the arrays it holds change meaning
FORMAT = 1


@dataclass
class LayerRegion:
    """One physical layer's recorded operating points: ``params[name]`` (S, *shape) and ``x`` (S, R, n_in),
    row ``s`` of each from training step ``steps[s]``."""

    params: dict[str, np.ndarray]
    x: np.ndarray
    steps: np.ndarray

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x, dtype=np.float64)
        self.steps = np.asarray(self.steps, dtype=np.int64)
        self.params = {k: np.asarray(v, dtype=np.float64) for k, v in self.params.items()}
        if self.x.ndim != 3 or len(self.x) == 0:
            raise ValueError(f"LayerRegion.x must be (steps, rows, n_in) with steps >= 1, got shape {self.x.shape}")
        n = len(self.x)
        if len(self.steps) != n:
            raise ValueError(f"LayerRegion.steps has {len(self.steps)} entries, x has {n} steps")
        for k, v in self.params.items():
            if len(v) != n:
                raise ValueError(f"LayerRegion.params[{k!r}] has {len(v)} settings, x has {n} steps")

    def __len__(self) -> int:
        return len(self.x)

    def check(self, spec: DeviceSpec, layer: str = "") -> None:
        """Raise unless this region fits ``spec``: the same input width and parameter names and shapes."""
        where = f"operating region of {layer or spec.name}"
        if self.x.shape[-1] != spec.input.size:
            raise ValueError(f"{where}: inputs are {self.x.shape[-1]} wide, device {spec.name} takes "
                             f"{spec.input.size}; record the region on a device of the same size")
        want = {p.name: tuple(p.shape) for p in spec.params}
        have = {k: tuple(v.shape[1:]) for k, v in self.params.items()}
        if want != have:
            raise ValueError(f"{where}: parameters {have} do not match device {spec.name}'s {want}")

    def settings(self, s: int) -> dict[str, np.ndarray]:
        return {k: v[s] for k, v in self.params.items()}


@dataclass
class OperatingRegion:
    """Every physical layer's :class:`LayerRegion`, by layer (device) name; saved as one ``.npz``."""

    layers: dict[str, LayerRegion] = field(default_factory=dict)
    #: where it came from (configuration, method, seed, steps): written with the arrays, read back
    meta: dict[str, object] = field(default_factory=dict)

    def __getitem__(self, layer: str) -> LayerRegion:
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(f"the operating region has no layer {layer!r}; it holds {sorted(self.layers)}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        index = {"format": FORMAT, "meta": self.meta, "layers": {}}
        for i, (name, lr) in enumerate(self.layers.items()):
            arrays[f"x{i}"], arrays[f"steps{i}"] = lr.x, lr.steps
            names = list(lr.params)
            for j, p in enumerate(names):
                arrays[f"p{i}_{j}"] = lr.params[p]
            index["layers"][name] = {"i": i, "params": names}
        arrays["index"] = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:  # np.savez would append .npz to a name without it
            np.savez_compressed(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> OperatingRegion:
        with np.load(Path(path), allow_pickle=False) as f:
            if "index" not in f.files:
                raise ValueError(f"{path}: not an operating region (no index); record one with OperatingRecorder")
            index = json.loads(bytes(f["index"]).decode())
            if index.get("format") != FORMAT:
                raise ValueError(f"{path}: operating region format {index.get('format')!r}, this version reads "
                                 f"{FORMAT}")
            layers = {}
            for name, entry in index["layers"].items():
                i = entry["i"]
                params = {p: f[f"p{i}_{j}"] for j, p in enumerate(entry["params"])}
                layers[name] = LayerRegion(params, f[f"x{i}"], f[f"steps{i}"])
        return cls(layers, dict(index.get("meta") or {}))


class RegionDraw:
    """Settings and inputs for :func:`~pnn_cluster.twins.collect.collect` from one layer's region.

    ``params`` picks a recorded step (with ``spread`` > 0 it moves each setting by normal steps of
    ``spread`` x its range, reflected into the limits: near the region rather than in it); ``inputs``
    then draws rows recorded at that same step, since the inputs a layer sees depend on the settings
    training had reached. ``collect`` asks for a group's settings before its inputs, which this relies on.
    """

    def __init__(self, region: LayerRegion, spec: DeviceSpec, spread: float = 0.0) -> None:
        region.check(spec)
        if not 0.0 <= spread <= 1.0:
            raise ValueError(f"RegionDraw: spread must be in [0, 1] (a fraction of each range), got {spread}")
        self.region, self.spread = region, float(spread)
        self.limits = {p.name: (float(p.low), float(p.high)) for p in spec.params}
        self.step = 0

    def params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        self.step = int(rng.integers(len(self.region)))
        out = {}
        for name, c in self.region.settings(self.step).items():
            lo, hi = self.limits[name]
            if self.spread > 0:
                width = hi - lo if math.isfinite(hi - lo) else max(1.0, float(np.abs(c).max(initial=0.0)))
                c = c + self.spread * width * rng.standard_normal(np.shape(c))
                c = np.where(c < lo, 2 * lo - c, c) if math.isfinite(lo) else c
                c = np.where(c > hi, 2 * hi - c, c) if math.isfinite(hi) else c
            out[name] = np.clip(c, lo, hi)
        return out

    def inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        rows = self.region.x[self.step]
        return rows[rng.integers(0, len(rows), size=n)]


def measure_region(device: Device, region: LayerRegion, groups: int = 64, batch: int = 16, repeats: int = 2,
                   seed: int = 0, spread: float = 0.0, progress: bool = False) -> Samples:
    """Measure ``groups`` settings drawn from ``region`` (each on ``batch`` of its inputs, ``repeats`` times)."""
    draw = RegionDraw(region, device.spec, spread)
    return collect(device, groups=groups, batch=batch, repeats=repeats, seed=seed, sample_params=draw.params,
                   sample_inputs=draw.inputs, progress=progress)


def region_figures(twins: Mapping[str, object], samples: Samples) -> dict[str, float]:
    """Each twin's NMSE on the region's samples, by kind, and the region's own ``noise_floor``."""
    out = {"noise_floor": samples.noise_floor(), "device_samples": samples.device_samples}
    for kind, twin in twins.items():
        out[kind] = evaluate_twin(twin, samples)
    return out

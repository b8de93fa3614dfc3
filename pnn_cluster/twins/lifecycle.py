"""The twin after its first fit: check it against the device, detect drift, refine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pnn_cluster.devices.base import Device
from pnn_cluster.twins.collect import Samples, collect
from pnn_cluster.twins.fit import FitResult, evaluate_twin, fit_twin
from pnn_cluster.twins.models import Twin

__all__ = ["DriftReport", "check_drift", "refine"]


@dataclass
class DriftReport:
    nmse: float
    noise_floor: float
    reference_nmse: float
    threshold: float
    samples: Samples

    @property
    def drifted(self) -> bool:
        """The twin is now clearly worse than when it was validated (beyond ``threshold`` times)."""
        return self.nmse > self.threshold * max(self.reference_nmse, self.noise_floor)

    def as_dict(self) -> dict[str, Any]:
        return {"nmse": self.nmse, "noise_floor": self.noise_floor, "reference_nmse": self.reference_nmse,
                "threshold": self.threshold, "drifted": self.drifted}


def check_drift(device: Device, twin: Twin, reference_nmse: float, groups: int = 6, batch: int = 64,
                threshold: float = 2.0, seed: int = 1, progress: bool = False) -> DriftReport:
    """Measure fresh samples and compare the twin's NMSE with its validation NMSE."""
    fresh = collect(device, groups=groups, batch=batch, repeats=2, seed=seed, progress=progress)
    return DriftReport(evaluate_twin(twin, fresh), fresh.noise_floor(), reference_nmse, threshold, fresh)


def refine(twin: Twin, device: Device, samples: Samples | None = None, groups: int = 20, batch: int = 64,
           epochs: int = 20, lr: float | None = None, seed: int = 2, progress: bool = False) -> FitResult:
    """Continue fitting ``twin`` on fresh measurements (a short fit, warm-started)."""
    fresh = samples if samples is not None else collect(device, groups=groups, batch=batch, repeats=2,
                                                        seed=seed, progress=progress)
    train, val = fresh.split(0.25, seed=seed)
    for p in twin.parameters():
        p.requires_grad_(True)
    if hasattr(twin, "model"):
        twin.model.learn_calibration(True)
    result = fit_twin(twin, train, val, epochs=epochs, lr=lr, seed=seed, progress=progress)
    return result

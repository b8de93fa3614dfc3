"""The twin after its first fit, checked offline against fresh measurements of its device.

During training the twin is watched from what PAT measures anyway, and refined online
(:mod:`pnn_cluster.training.recalibration`); this check is for between runs, or after one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pnn_cluster.devices.base import Device
from pnn_cluster.twins.collect import Samples, collect
from pnn_cluster.twins.fit import evaluate_twin
from pnn_cluster.twins.models import Twin

__all__ = ["DriftReport", "check_drift"]


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

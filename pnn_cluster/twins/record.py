"""One device's twin as it was made: the twin, its figures and the held-out samples behind them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TwinFit"]


@dataclass
class TwinFit:
    """What a run records of a twin: how well it describes its device, next to the device's noise floor."""

    device: str
    twin: Any
    kind: str
    nmse_val: float
    noise_floor: float
    nmse_train: float | None = None
    ideal_nmse: float | None = None
    device_samples: int = 0
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)
    val: Any = None  # twins.Samples behind nmse_val (the parity plot's points)
    source: str = "fit"  # fit | ideal | loaded
    #: for ``kind: best``, every kind tried: its figures (``nmse_stop`` chose between them)
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ratio_to_floor(self) -> float:
        return self.nmse_val / self.noise_floor if self.noise_floor > 0 else math.inf

    def metrics(self) -> dict[str, float]:
        out = {"nmse_val": self.nmse_val, "noise_floor": self.noise_floor, "ratio_to_floor": self.ratio_to_floor,
               "device_samples": float(self.device_samples), "fit_seconds": self.seconds,
               "nmse_train": self.nmse_train, "ideal_nmse": self.ideal_nmse}
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}

    def as_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "source": self.source, **self.metrics()}
        if self.candidates:
            out["candidates"] = {k: {m: v for m, v in c.items() if m != "kind"} for k, c in self.candidates.items()}
        return out

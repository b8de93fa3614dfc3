"""Sequential detection of a twin drifting away from its device: a one-sided CUSUM with a stated false-alarm rate.

The observation is what PAT measures anyway: at each step, the twin's error
on the batch the device just measured, as a ratio to the device's noise floor
(``twin NMSE / floor``). With no drift that ratio fluctuates around a level set
by the twin's quality; a drifting device raises it. The detector works on
``z = (log ratio - mu0) / sigma0``: the logarithm makes a batch NMSE (a scaled
chi-square) close to normal, and ``mu0``, ``sigma0`` are the baseline,
estimated (mean, standard deviation) over the first ``warmup`` observations
after a twin takes over: the false-alarm rate is steep in ``sigma0``, so the
warm-up is long enough (100 steps by default) to estimate it within about
7 %. Page's CUSUM ``S = max(0, S + z - k)`` raises an alarm when ``S > h``.

``k`` is half the smallest rise worth detecting quickly: ``rise``, a factor
on the twin's error (2.5: the twin is two and a half times as far from its
device as it was at the baseline), so ``k = log(rise) / (2 sigma0)`` in
baseline standard deviations. A factor rather than a number of standard deviations, because a
batch's NMSE is measured so precisely (thousands of values) that one standard
deviation of its log is a few percent: PAT moving the parameters into a
region where the twin is a little less accurate would then count as drift.
The default 2.5 was chosen on ``hybrid_mnist`` runs of seeds 5-9 (not the
benchmark's): the smallest of 1.5, 1.75, 2, 2.5 and 3 with no alarm on a
device that did not change (training alone moved the analog circuit's twin
error by up to about 2.5x: 1.5 raised 421 false alarms in 11 of 20 device
runs, 2.0 25 in 5), while every bump of a step change was caught within a step.
``h`` is chosen so that the mean number of steps between false alarms with no
drift (the in-control average run length, ``arl0``) is what was asked, using
Siegmund's approximation for normal observations::

    ARL0(h, k) ~= (exp(2 k b) - 2 k b - 1) / (2 k^2),   b = h + 1.166

(D. Siegmund, Sequential Analysis, 1985). The false-alarm rate is about
``1 / arl0`` per step; ``tests/test_drift.py`` checks it by simulation. Each
step's ``z`` is capped at ``k + h``, so that no single step raises an alarm
on its own (a batch's error has heavier tails than a normal's, and a drift
lasts): with normal observations that changes the run length very little,
and only ever lengthens it. The cap is applied to the step's increment (at
most ``h``), not to ``z``: in floating point ``(k + h) - k`` is an ulp over
``h`` for about one ``k`` in sixteen, and a lone spike from a zero statistic
then alarmed (``hybrid_mnist`` seed 1 on 7 December: two of the circuit's
three alarms without drift). ``h`` is at least one baseline standard
deviation (for a very steady series, where ``k`` is large, Siegmund's ``h``
falls to about zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DETECTOR_BOUNDS", "CusumDetector", "cusum_arl0", "cusum_threshold"]

#: Siegmund's correction for the overshoot of a discrete-time CUSUM over its threshold (normal observations)
_OVERSHOOT = 1.166


#: what the detector's settings may be, stated once (a configuration's ``recalibration`` takes these bounds)
DETECTOR_BOUNDS: dict[str, dict[str, float]] = {
    "arl0": {"ge": 10.0, "le": 1e12}, "rise": {"ge": 1.01, "le": 100.0}, "warmup": {"ge": 5, "le": 100_000},
}


def cusum_arl0(h: float, k: float) -> float:
    """Siegmund's approximation of the in-control average run length of a CUSUM (reference ``k``, threshold ``h``)."""
    if k <= 0:
        raise ValueError(f"k: {k!r}; allowed: > 0")
    a = 2.0 * k * (h + _OVERSHOOT)
    return (math.exp(a) - a - 1.0) / (2.0 * k * k)


def cusum_threshold(arl0: float, k: float) -> float:
    """The threshold ``h`` whose in-control average run length is ``arl0`` steps (bisection on Siegmund's formula)."""
    low, high = DETECTOR_BOUNDS["arl0"]["ge"], DETECTOR_BOUNDS["arl0"]["le"]
    if not (math.isfinite(arl0) and low <= arl0 <= high):
        raise ValueError(f"arl0: {arl0!r}; allowed: a number of steps, {low:g}..{high:g}")
    lo, hi = 0.0, 1.0
    while cusum_arl0(hi, k) < arl0:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cusum_arl0(mid, k) < arl0 else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass
class CusumDetector:
    """Watches one twin (one device replica): :meth:`update` with each step's ``twin NMSE / noise floor``.

    ``arl0``: mean steps between false alarms when nothing drifts; ``rise``: the
    smallest growth of the twin's error worth detecting quickly, as a factor;
    ``warmup``: observations that set the baseline (no alarm before). After a
    full recalibration that changes what the twin can reach, :meth:`rebaseline`.
    """

    arl0: float = 10_000.0
    rise: float = 2.5
    warmup: int = 100
    statistic: float = 0.0
    steps: int = 0
    alarms: int = 0
    alarm_step: int | None = None
    _window: list[float] = field(default_factory=list, repr=False)
    mu0: float | None = None
    sigma0: float | None = None

    def __post_init__(self) -> None:
        what = {"arl0": "a number of steps", "rise": "a factor on the twin's error", "warmup": "an integer"}
        for name, b in DETECTOR_BOUNDS.items():
            v = getattr(self, name)
            number = isinstance(v, int) if name == "warmup" else isinstance(v, (int, float)) and math.isfinite(v)
            if isinstance(v, bool) or not number or not b["ge"] <= v <= b["le"]:
                raise ValueError(f"{name}: {v!r}; allowed: {what[name]}, {b['ge']:g}..{b['le']:g}")
        # k and h are in baseline standard deviations: set when the baseline is
        self.k: float | None = None
        self.h: float | None = None

    def _set_threshold(self) -> None:
        self.k = math.log(self.rise) / (2.0 * self.sigma0)
        # at least one standard deviation: for a large k (a very steady series) Siegmund's h falls to about
        # zero, and with each step's z capped at k + h a lasting rise could then never pass it
        self.h = max(cusum_threshold(self.arl0, self.k), 1.0)

    @property
    def ready(self) -> bool:
        """The baseline is set: alarms can be raised."""
        return self.mu0 is not None

    def update(self, ratio: float) -> bool:
        """One step's twin error over the noise floor; True when this step raises an alarm."""
        ratio = float(ratio)
        if not (math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"ratio: {ratio!r}; allowed: a finite positive twin NMSE / noise floor")
        self.steps += 1
        x = math.log(ratio)
        if self.mu0 is None:
            self._window.append(x)
            if len(self._window) >= self.warmup:
                w = np.asarray(self._window)
                self.mu0 = float(w.mean())
                # the sample standard deviation: the CUSUM's false-alarm rate is steep in sigma0, so the most
                # efficient estimate; a floor keeps a constant series from dividing by zero
                self.sigma0 = max(float(w.std(ddof=1)), 1e-6)
                self._window = []
                self._set_threshold()
            return False
        # no single step raises an alarm on its own: a batch's error has heavier tails than a normal's (a
        # glitch, a cosmic-ray count), and a drift lasts; a lone spike lifts the statistic at most to h. The
        # increment is capped, not z at k + h: (k + h) - k can round to h plus an ulp, which is over h
        z = (x - self.mu0) / self.sigma0
        self.statistic = max(0.0, self.statistic + min(z - self.k, self.h))
        if self.statistic > self.h:
            self.alarms += 1
            self.alarm_step = self.steps
            self.statistic = 0.0
            return True
        return False

    def rebaseline(self) -> None:
        """Forget the baseline: a refined twin, or a recalibrated device, sets a new one over the next ``warmup``."""
        self.mu0 = self.sigma0 = self.k = self.h = None
        self._window = []
        self.statistic = 0.0

    def state_dict(self) -> dict:
        """Everything a resumed run needs to go on watching as it was (plain numbers)."""
        return {"arl0": self.arl0, "rise": self.rise, "warmup": self.warmup, "statistic": self.statistic,
                "steps": self.steps, "alarms": self.alarms, "alarm_step": self.alarm_step, "mu0": self.mu0,
                "sigma0": self.sigma0, "window": list(self._window)}

    @classmethod
    def from_state(cls, state: dict) -> CusumDetector:
        det = cls(arl0=state["arl0"], rise=state["rise"], warmup=state["warmup"])
        det.statistic, det.steps, det.alarms = state["statistic"], state["steps"], state["alarms"]
        det.alarm_step, det._window = state["alarm_step"], list(state["window"])
        if state["mu0"] is not None:
            det.mu0, det.sigma0 = state["mu0"], state["sigma0"]
            det._set_threshold()
        return det

"""Twins that stay true during long runs: drift watched from what PAT measures anyway, and what to do about it.

Every PAT step measures ``(input, parameters, output)`` on each device, and
the backward pass evaluates the twin at those very points; the twin's
prediction comes with its VJP at no extra cost. Set beside the measurement it
gives, per device replica and per step, the twin's NMSE on the batch; divided
by the device's noise floor (from its calibration) it is watched by a
:class:`~pnn_cluster.twins.drift.CusumDetector` with a stated false-alarm
rate. What an alarm does is a policy, chosen per device, injected like the
fault policy (:mod:`~pnn_cluster.training.recalibration_policies`: one class
each, which decides; the watch carries the decision out):

- ``none``: nothing is watched (no twin outputs are even asked for);
- ``monitor``: the figures are logged each step (``drift/<device>/...``) and
  an alarm is reported, nothing else changes;
- ``refine``: the twin is refined online. A bounded buffer keeps the
  measurements PAT made (the newest ``buffer_rows`` rows); on an alarm a few
  exploratory groups are measured around the current parameters (within the
  device's limits, and within ``explore_fraction`` of the device samples
  training has used), and a copy of the twin is fitted, warm-started, to a
  recency-weighted draw of the buffer plus those groups, in the twin's actor
  (or a thread) while training goes on: only what drifts moves (the physics
  model's calibration constants; all weights of an MLP twin), so a fit to the
  small region training explores cannot bend the twin away from the rest of
  its range. At the next step boundary where the fit is done, it is swapped
  in, on every copy of the twin at once, if it predicts the newest
  measurements better than the twin in use;
  Once a refit is taken, the detector sets a new baseline (over ``warmup``
  steps), so the next alarm means a rise over what the refit achieves.
  A refit fitted to training's region can leave the twin far off elsewhere
  (a large bump moves the calibration constants further than training's
  region pins down): each accepted one is checked on ``check_groups``
  settings spread over every parameter's whole range, with inputs over the
  input range (as the first calibration drew them, so its NMSE is the
  figure to compare with). Over ``widen_factor`` x that figure (1.5), the
  refinement is widened: up to ``widen_groups`` more such settings are
  measured and the twin refitted to them beside training's measurements,
  accepted only if it predicts the check's settings and the newest
  measurements (held out together) better. Checks and widened refits
  share their own budget (``widen_fraction`` of training's samples on the
  device), and a widened refit is itself checked while the budget lasts;
- ``pause``: the device gets no more work until it is recalibrated in full
  (fresh samples as many as its first calibration, a warm-started fit), then
  training resumes: Bluesky's suspenders are the model. Training waits at the
  step boundary.

Every fit is a version (0: the first calibration); its record (samples, NMSE
and noise floor, the step at which it took over, its parent) goes to
``on_version`` (the MLflow callback stores it with the twin's tensors). The
detectors, versions and sample counts are part of the checkpoint, so a
resumed run goes on watching where it was; the buffer refills.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pnn_cluster.training.backends import Backend, LocalTwinHandle, ThreadBackend
from pnn_cluster.training.explore import AroundParams, AtSetting, FromRows, OverInputs, OverRange, TheseRows
from pnn_cluster.training.recalibration_policies import POLICIES, Action, RecalibrationPolicy, policy_for
from pnn_cluster.training.trainer import Callback
from pnn_cluster.training.workers import TwinWorker
from pnn_cluster.twins.collect import Samples
from pnn_cluster.twins.drift import DETECTOR_BOUNDS, CusumDetector
from pnn_cluster.twins.versions import next_version, twin_digest

__all__ = ["POLICIES", "Recalibration", "RecalibrationWatch", "WatchedReplica", "NoiseModel", "AroundParams",
           "FromRows"]

log = logging.getLogger(__name__)

#: buffered steps a refinement fits at most (each is one parameter setting: one step of the fit per epoch)
MAX_GROUPS = 48
#: steps measured since a change began before a refinement starts from them
MIN_GROUPS = 8
#: inputs per setting a range check or a widened refinement measures at most (the first calibration's batch
#: if smaller): what pins a twin's constants down over the range is the spread of settings, not of inputs
RANGE_BATCH = 16
#: each setting's range, stated once (the configuration's schema takes its bounds from here), in pydantic's terms:
#: ``ge``/``le`` inclusive, ``gt`` exclusive
BOUNDS: dict[str, dict[str, float]] = {
    **DETECTOR_BOUNDS,
    "buffer_rows": {"ge": 1, "le": 10**8}, "half_life_steps": {"gt": 0.0, "le": 1e9},
    "explore_fraction": {"ge": 0.0, "le": 1.0}, "explore_groups": {"ge": 0, "le": 10_000},
    "explore_spread": {"ge": 0.0, "le": 1.0}, "epochs": {"ge": 1, "le": 100_000},
    "widen_factor": {"ge": 1.0, "le": 1e6}, "widen_fraction": {"ge": 0.0, "le": 1.0},
    "check_groups": {"ge": 0, "le": 10_000}, "widen_groups": {"ge": 1, "le": 100_000},
    "reference_rows": {"ge": 0, "le": 1_000_000}, "confirm_share": {"ge": 0.0, "le": 1000.0},
}
#: standard errors by which a reference's change must exceed what its noise alone gives to count
REFERENCE_SIGNIFICANCE = 3.0


@dataclass(frozen=True)
class Recalibration:
    """What a device's twin watch does (``devices.NAME.recalibration`` in a configuration).

    policy: ``none``, ``monitor``, ``refine`` or ``pause`` (see the module's docstring).
    arl0: mean steps between false alarms when nothing drifts (the detector's threshold is set from it).
    rise: the smallest growth of the twin's error worth detecting quickly, as a factor on its baseline.
    warmup: steps that set the baseline of the twin's error after its calibration (no alarm before).
    buffer_rows: measured rows the refinement buffer keeps (the newest).
    half_life_steps: a buffered measurement's weight in a refinement halves every this many steps.
    explore_fraction: exploratory device samples, at most this fraction of the samples training measured
        on the device so far (the rest of a refinement's data is free: training measured it).
    explore_groups, explore_spread: exploratory parameter settings per refinement, drawn around the
        current ones with this standard deviation (a fraction of each parameter's range), within limits.
    epochs: epochs of a refinement's warm-started fit.
    check_groups: settings spread over the whole range on which an accepted refinement is checked (each on
        ``RANGE_BATCH`` inputs, measured once); 0: no check, no widening.
    widen_factor: a checked refinement whose NMSE there is over this many times the first calibration's
        is followed by a widened one.
    widen_groups: settings spread over the whole range a widened refinement measures at most.
    widen_fraction: checks and widened refinements measure at most this fraction of the samples training
        measured on the device so far (a budget of their own, beside ``explore_fraction``'s).
    reference_rows: rows of a reference kept when the detector sets its baseline (that step's parameters and
        inputs, and what the device measured): at an alarm they are measured again, and only a device that
        no longer measures as it did there has drifted; 0: every alarm is taken as drift.
    confirm_share: an alarm is drift when the device's own change at the reference (the power of the
        difference between then and now beyond their noise, over the noise power) accounts for at least this
        share of the rise the detector is set to catch (``(rise - 1)`` x the baseline ratio), and stands
        :data:`REFERENCE_SIGNIFICANCE` standard errors above what noise alone gives. Otherwise the device is
        as it was: training has moved to settings its twin predicts less well (the policy's
        ``on_region_alarm`` decides; a policy that does not refine sets a new baseline there).

    The refinement's defaults (16 groups, 50 epochs) were chosen offline on bumped SHG optics of seeds
    other than the benchmark's: with 8 groups and 10 epochs a refit left a bumped twin's error over the
    whole range 2.0-2.4x its calibration's (the fit had not converged), with 16 and 50 0.92-0.95x.
    The range check's factor (1.5) was set on bench_drift's ``large_step`` under seeds other than the
    benchmark's: on seed 5 the accepted refit checked 3.5x over the range and the widened one 1.4x; on
    seed 100 it checked 1.76x, not widened at a factor of 2, and the twin ended 1.77x, short of margin.
    """

    policy: str = "monitor"
    arl0: float = CusumDetector.arl0
    rise: float = CusumDetector.rise
    warmup: int = CusumDetector.warmup
    buffer_rows: int = 8192
    half_life_steps: float = 50.0
    explore_fraction: float = 0.05
    explore_groups: int = 16
    explore_spread: float = 0.3
    epochs: int = 50
    check_groups: int = 16
    widen_factor: float = 1.5
    widen_groups: int = 128
    widen_fraction: float = 0.05
    reference_rows: int = 64
    confirm_share: float = 0.5

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"recalibration.policy: {self.policy!r} is not allowed; allowed: {', '.join(POLICIES)}")
        CusumDetector(arl0=self.arl0, rise=self.rise, warmup=self.warmup)  # those three, in the detector's words
        for name, b in BOUNDS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not (
                    b.get("ge", -math.inf) <= v <= b.get("le", math.inf) and v > b.get("gt", -math.inf)):
                allowed = " and ".join(f"{op} {b[k]}" for k, op in (("gt", ">"), ("ge", ">="), ("le", "<=")) if k in b)
                raise ValueError(f"recalibration.{name}: {v!r}; allowed: {allowed}")


@dataclass(frozen=True)
class NoiseModel:
    """A device's noise power at an output value ``y``: ``additive + relative * y**2``.

    Measurement noise adds a constant power; shot-to-shot fluctuation of a laser's energy or a drive's
    amplitude scales with the signal. Estimated from a calibration's repeats, it gives the noise floor at
    the very outputs a training step measured: as PAT makes a layer's outputs larger or smaller, the
    twin's error is still compared with the noise those outputs carry, not with the calibration's average.
    """

    additive: float
    relative: float

    @classmethod
    def from_repeats(cls, samples: Samples) -> NoiseModel:
        """Least squares of ``(y1 - y2)**2 / 2`` (the noise power at a point) on ``((y1 + y2) / 2)**2``,
        both coefficients kept >= 0."""
        d, m = [], []
        for y in samples.y:
            if y.shape[0] < 2:
                continue
            d.append(((y[1] - y[0]) ** 2 / 2.0).reshape(-1))
            m.append((((y[1] + y[0]) / 2.0) ** 2).reshape(-1))
        if not d:
            raise ValueError("NoiseModel.from_repeats: needs groups measured at least twice")
        d_, m_ = np.concatenate(d), np.concatenate(m)
        design = np.stack([np.ones_like(m_), m_], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, d_, rcond=None)
        if b < 0:
            a, b = float(d_.mean()), 0.0
        elif a < 0:
            a, b = 0.0, float((d_ * m_).sum() / max(float((m_ * m_).sum()), 1e-300))
        return cls(float(a), float(b))

    def power(self, y: np.ndarray) -> float:
        """Total noise power expected on the outputs ``y`` (summed over every value)."""
        return float(self.additive * y.size + self.relative * float((y * y).sum()))

    def row_powers(self, rows: np.ndarray) -> np.ndarray:
        """The noise power expected on each row of ``rows`` (n, values): :meth:`power` row by row."""
        return self.additive * rows.shape[1] + self.relative * (rows * rows).sum(axis=1)


@dataclass(eq=False)
class WatchedReplica:
    """One device replica's twin under watch.

    replica: the pipeline's :class:`~pnn_cluster.training.pipeline.Replica` (its ``twin`` is the trainer's
        copy; its ``twins``, if any, the copies elsewhere that take the backward passes).
    layer: the physical layer it serves (its current parameters, its spec's limits).
    collect: measures samples on this replica, next to it (``DeviceRef.collect``).
    noise_floor, nmse: the first calibration's figures; output_var: the variance of the outputs it measured,
        which normalises both (a step's ``twin_nmse`` is ``residual power / output_var``, whatever the
        batch's own spread). None: the step's own variance.
    noise: the device's noise at an output value (:class:`NoiseModel`, from the calibration's repeats):
        the ratio watched is the step's residual power over the noise power its outputs carry. None:
        ``twin_nmse / noise_floor``.
    calibration: how the first calibration was made (``groups``, ``batch``, ``repeats``, ``holdout``,
        ``epochs``, ``lr``): a full recalibration repeats it.
    """

    label: str
    replica: Any
    layer: Any
    settings: Recalibration
    collect: Callable[..., Samples]
    noise_floor: float
    nmse: float | None = None
    output_var: float | None = None
    noise: NoiseModel | None = None
    calibration: Mapping[str, Any] = field(default_factory=dict)
    kind: str = ""
    #: the replica's stage pool: with others in it, a pause takes only this replica out
    pool: Any = None
    # what the watch keeps
    detector: CusumDetector = field(init=False)
    #: what ``settings.policy`` names (it decides what an alarm leads to)
    policy: RecalibrationPolicy = field(init=False)
    version: int = 0
    versions: int = 1
    trained_rows: int = 0
    #: exploratory device samples, around the current parameters and over the whole range
    explore_samples: int = 0
    #: those of ``explore_samples`` over the whole range (range checks, widened refinements)
    widen_samples: int = 0
    recalibration_samples: int = 0
    alarm_steps: list[int] = field(default_factory=list)
    #: the last step at which the CUSUM statistic was zero: the estimate of when a change began, once it alarms
    zero_step: int = 0
    #: a refinement waiting for measurements made since the change (the step the change began)
    refine_due: int | None = None
    #: a widened refinement waiting to start (the step the change it answers began)
    widen_due: int | None = None
    #: each range check of an accepted refinement: (step, its NMSE over the range / the first calibration's)
    range_checks: list[tuple[int, float]] = field(default_factory=list)
    #: what the device measured when the detector set its baseline: (step, inputs, parameters, outputs)
    reference: tuple[int, np.ndarray, dict[str, np.ndarray], np.ndarray] | None = None
    #: device samples spent measuring references again
    reference_samples: int = 0
    #: each reference measured again at an alarm: (step, the device's change there over its noise power,
    #: the change that counts as drift, whether it did)
    confirmations: list[tuple[int, float, float, bool]] = field(default_factory=list)
    #: alarms the reference did not confirm (the device measured as before: the twin is off where training is)
    region_steps: list[int] = field(default_factory=list)
    #: the step at which the reference in use showed drift (later alarms against it are drift unmeasured)
    drift_confirmed: int | None = None
    history: list[tuple[int, float]] = field(default_factory=list)
    buffer: collections.deque = field(default_factory=collections.deque)
    buffered_rows: int = 0
    pending: Any = None
    #: the backend that waits on ``pending`` (the pipeline's for a twin copy's call, the watch's own for a thread's)
    waits_on: Backend | None = None
    pending_info: dict[str, Any] = field(default_factory=dict)
    last_warned: int | None = None
    #: out of its pool, recalibrating (policy pause); ``repause``: it was when the run stopped
    paused: bool = False
    repause: bool = False
    # this step's observations: the sum of squared residuals, the measurements (and, to refine, the inputs)
    _sq: float = 0.0
    _ys: list[np.ndarray] = field(default_factory=list)
    _xs: list[np.ndarray] = field(default_factory=list)
    _params: Mapping[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        s = self.settings
        self.detector = CusumDetector(arl0=s.arl0, rise=s.rise, warmup=s.warmup)
        self.policy = policy_for(s.policy)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on watching: the detector, the counts, the error's history and the
        refinement buffer (as tensors: a checkpoint holds tensors and plain containers only). A refinement
        in flight is not kept; the resumed run asks for it again from the same change-point."""
        import torch

        source = self.pending_info.get("source") if self.pending is not None else None
        ref = self.reference
        due = self.pending_info.get("since") if source == "refine" else self.refine_due
        widen_due = self.pending_info.get("since") if source == "widen" else self.widen_due
        return {"detector": self.detector.state_dict(), "version": self.version, "versions": self.versions,
                "trained_rows": self.trained_rows, "explore_samples": self.explore_samples,
                "widen_samples": self.widen_samples, "widen_due": widen_due,
                "range_checks": [[int(step), float(r)] for step, r in self.range_checks],
                "reference": None if ref is None else [
                    ref[0], torch.from_numpy(ref[1]), {k: torch.from_numpy(v) for k, v in ref[2].items()},
                    torch.from_numpy(ref[3])],
                "reference_samples": self.reference_samples, "region_steps": list(self.region_steps),
                "drift_confirmed": self.drift_confirmed,
                "confirmations": [[int(st), float(c), float(n), bool(ok)] for st, c, n, ok in self.confirmations],
                "recalibration_samples": self.recalibration_samples, "alarm_steps": list(self.alarm_steps),
                "noise_floor": _plain(self.noise_floor), "nmse": _plain(self.nmse),
                "output_var": _plain(self.output_var),
                "noise": None if self.noise is None else [float(self.noise.additive), float(self.noise.relative)],
                "zero_step": self.zero_step, "refine_due": due, "paused": self.paused,
                "history": [[int(step), float(r)] for step, r in self.history],
                "buffer": [[step, torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in params.items()},
                            torch.from_numpy(y)] for step, x, params, y in self.buffer]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.detector = CusumDetector.from_state(state["detector"])
        for k in ("version", "versions", "trained_rows", "explore_samples", "recalibration_samples",
                  "noise_floor", "nmse", "output_var"):
            setattr(self, k, state.get(k))
        if state.get("noise") is not None:
            self.noise = NoiseModel(*state["noise"])
        self.alarm_steps = list(state["alarm_steps"])
        # checkpoints written before these were kept resume with an empty buffer and history
        self.zero_step = int(state.get("zero_step", 0))
        self.refine_due = state.get("refine_due")
        self.widen_samples = int(state.get("widen_samples", 0))
        self.widen_due = state.get("widen_due")
        self.range_checks = [(int(step), float(r)) for step, r in state.get("range_checks", [])]
        ref = state.get("reference")
        self.reference = None if ref is None else (
            int(ref[0]), _array(ref[1]), {k: _array(v) for k, v in ref[2].items()}, _array(ref[3]))
        self.reference_samples = int(state.get("reference_samples", 0))
        self.region_steps = [int(st) for st in state.get("region_steps", [])]
        self.drift_confirmed = state.get("drift_confirmed")
        self.confirmations = [(int(st), float(c), float(n), bool(ok))
                              for st, c, n, ok in state.get("confirmations", [])]
        self.history = [(int(step), float(r)) for step, r in state.get("history", [])]
        self.buffer = collections.deque(
            (int(step), _array(x), {k: _array(v) for k, v in params.items()}, _array(y))
            for step, x, params, y in state.get("buffer", []))
        self.buffered_rows = sum(e[3].shape[0] for e in self.buffer)
        self.repause = bool(state.get("paused", False))


def reference_change(y_then: np.ndarray, y_now: np.ndarray, noise: NoiseModel | None,
                     noise_per_value: float) -> tuple[float, float]:
    """How much a device changed between two measurements of the same inputs at the same setting: the
    power of their difference beyond what the noise of both gives, over the noise power of one (``0`` when
    nothing changed, whatever the noise), and its standard error.

    Each measurement carries its noise (``noise`` at its outputs, or ``noise_per_value`` on each value), so
    the difference carries both: ``D = |y_now - y_then|^2 / (noise(y_now) + noise(y_then))`` is about 1 for
    a device that has not changed; a change of power ``delta^2`` per value adds ``delta^2 / (2 sigma^2)``.
    The figure returned is ``2 (D - 1)``, in units of the noise power (what the change adds to a twin's
    error over the floor). Its standard error is estimated from the rows themselves (each row is one
    measurement: noise that moves a row's outputs together, a laser shot's energy or a drive's amplitude,
    makes ``D`` far less certain than its count of values suggests), by the delta method for a ratio."""
    y_then, y_now = np.asarray(y_then, dtype=np.float64), np.asarray(y_now, dtype=np.float64)
    rows_then, rows_now = y_then.reshape(y_then.shape[0], -1), y_now.reshape(y_now.shape[0], -1)
    if noise is not None:
        expected = noise.row_powers(rows_now) + noise.row_powers(rows_then)
    else:
        expected = np.full(rows_now.shape[0], 2.0 * noise_per_value * rows_now.shape[1])
    diff = ((rows_now - rows_then) ** 2).sum(axis=1)
    total = max(float(expected.sum()), 1e-300)
    d = float(diff.sum()) / total
    n = len(diff)
    se = math.sqrt(float(((diff - d * expected) ** 2).sum()) * n / max(n - 1, 1)) / total if n > 1 else math.inf
    return 2.0 * (d - 1.0), 2.0 * se


def _plain(v: float | None) -> float | None:
    return None if v is None else float(v)


def _array(t: Any) -> np.ndarray:
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


class RecalibrationWatch(Callback):
    """Watches every device replica's twin during training, and applies each device's policy.

    As a pipeline observer (``PipelineExecutor.observer``) it is handed each measured micro-batch with the
    twin's prediction at the same points; as a trainer callback (before the MLflow one: it adds its figures
    to the step's metrics) it closes each step: detector, buffer, refinements, swaps.

    report: where progress lines go. on_version: called with each new version's record and twin state.
    backend: the pipeline's backend (waits on a refinement in a replica's twin copy); None: twins on threads.
    What runs on the watch's own threads (a twin worker here, a recalibration out of its pool) is waited on
    through a :class:`~pnn_cluster.training.backends.ThreadBackend` of its own.
    """

    def __init__(self, watched: Sequence[WatchedReplica], report: Callable[[str], None] | None = None,
                 on_version: Callable[[Mapping[str, Any], Mapping[str, Any] | None], None] | None = None,
                 backend: Any = None, seed: int = 0) -> None:
        self.watched = {w.label: w for w in watched if w.policy.watches}
        self.report = report or (lambda line: log.info("%s", line))
        self.on_version = on_version
        self._here = ThreadBackend()
        self.backend = backend if backend is not None else self._here
        self.seed = seed
        self.records: list[dict[str, Any]] = []
        self._local: list[Any] = []  # twin workers on threads, for replicas with no twin copies elsewhere
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None  # recalibrations out of the pool

    # -- the pipeline observer ---------------------------------------------------------------------------

    def observe(self, stage: str, replica: Any, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                y_twin: np.ndarray) -> None:
        """One measured micro-batch (or backward chunk) of ``replica``, beside the twin's prediction."""
        w = self.watched.get(replica.name)
        if w is None:
            return
        y = np.asarray(y, dtype=np.float64)
        r = np.asarray(y_twin, dtype=np.float64) - y
        w._sq += float((r * r).sum())
        w._ys.append(y)
        w.trained_rows += y.shape[0]
        # the inputs and parameters: a refinement fits to them, and a reference keeps them
        w._xs.append(np.array(x, dtype=np.float64))
        w._params = params

    # -- the trainer callback ----------------------------------------------------------------------------

    def on_train_start(self, trainer: Any) -> None:
        # a replica that was out of its pool recalibrating when the run stopped: its recalibration is redone
        for w in self.watched.values():
            if w.repause and w.pending is None:
                w.repause = False
                self._pause(w, trainer.global_step, f"{w.label} was recalibrating when the run stopped")

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        step = trainer.global_step
        for w in self.watched.values():
            self._close_step(w, step, metrics)
            if w.pending is not None:
                self._poll(w, step)
            elif w.refine_due is not None and sum(e[0] > w.refine_due for e in w.buffer) >= MIN_GROUPS:
                self._start_refine(w, step, since=w.refine_due)
                w.refine_due = None
            elif w.widen_due is not None:  # a resumed run: the widened refinement in flight is asked again
                since, w.widen_due = w.widen_due, None
                self._start_widen(w, step, since, check=None)

    def on_train_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        # a refinement still running when training ends is not taken: the twin at the end is the one in use;
        # a replica out of its pool for a recalibration is waited for and comes back with it (the test and
        # the checkpoint see every replica)
        for w in self.watched.values():
            if w.paused and w.pending is not None:
                w.waits_on.wait([w.pending])
                self._poll(w, trainer.global_step)
            w.pending, w.waits_on = None, None

    # -- its state in checkpoints (Stateful: taken when a checkpoint is, not copied every step) --------------

    state_key = "recalibration"

    def state_dict(self) -> dict[str, Any]:
        return {label: w.state_dict() for label, w in self.watched.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for label, s in (state or {}).items():
            if label in self.watched:
                self.watched[label].load_state_dict(s)

    def summary(self) -> dict[str, Any]:
        """Per replica: policy, alarms, versions and the device samples spent beyond training."""
        return {label: {"policy": w.settings.policy, "alarm_steps": list(w.alarm_steps), "version": w.version,
                        "versions": w.versions, "trained_rows": w.trained_rows,
                        "explore_samples": w.explore_samples, "widen_samples": w.widen_samples,
                        "range_checks": list(w.range_checks), "recalibration_samples": w.recalibration_samples,
                        "reference_samples": w.reference_samples, "region_steps": list(w.region_steps),
                        "confirmations": list(w.confirmations),
                        "history": list(w.history)}
                for label, w in self.watched.items()}

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None
        for h in self._local:
            h.close()
        self._local.clear()

    # -- one step --------------------------------------------------------------------------------------

    def _close_step(self, w: WatchedReplica, step: int, metrics: dict[str, float]) -> None:
        if not w._ys:
            return  # this replica measured nothing in this step (another replica of its pool did)
        ys = np.concatenate([y.reshape(y.shape[0], -1) for y in w._ys])
        sq = w._sq
        nmse = sq / ys.size / max(w.output_var or float(ys.var()), 1e-30)
        noise = w.noise.power(ys) if w.noise is not None else 0.0
        # one group per step: the step's micro-batches were measured with the same parameters
        group = (step, np.concatenate(w._xs), {k: np.array(v) for k, v in w._params.items()},
                 np.concatenate(w._ys)) if w._xs else None
        if group is not None and w.policy.keeps_inputs:
            w.buffer.append(group)
            w.buffered_rows += ys.shape[0]
            while w.buffered_rows > w.settings.buffer_rows and len(w.buffer) > 1:
                w.buffered_rows -= w.buffer.popleft()[3].shape[0]
        w._sq, w._ys, w._xs = 0.0, [], []
        if not (math.isfinite(nmse) and nmse > 0 and w.noise_floor > 0):
            return
        ratio = sq / noise if noise > 0 else nmse / w.noise_floor
        was_ready = w.detector.ready
        alarm = w.detector.update(ratio)
        if w.detector.ready and not was_ready and group is not None and w.settings.reference_rows > 0:
            # the baseline is set: what the device measures now, at these settings, is the reference
            n = w.settings.reference_rows
            w.reference = (step, group[1][:n].copy(), group[2], group[3][:n].copy())
            w.drift_confirmed = None
        if w.detector.statistic == 0.0 and not alarm:
            w.zero_step = step
        w.history.append((step, ratio))
        key = f"drift/{w.label}"
        metrics[f"{key}/twin_nmse"] = nmse
        metrics[f"{key}/ratio"] = ratio
        metrics[f"{key}/cusum"] = w.detector.statistic
        if alarm:
            w.alarm_steps.append(step)
            metrics[f"{key}/alarm"] = 1.0
            self._alarm(w, step, ratio, metrics)
        metrics[f"{key}/alarms"] = float(len(w.alarm_steps))
        metrics[f"{key}/region_alarms"] = float(len(w.region_steps))

    def _alarm(self, w: WatchedReplica, step: int, ratio: float, metrics: dict[str, float]) -> None:
        base = math.exp(w.detector.mu0) if w.detector.mu0 is not None else float("nan")
        risen = (f"its error is {ratio:.2f} x the noise floor, {ratio / base:.2f} x its baseline of {base:.2f} "
                 f"(CUSUM alarm {len(w.alarm_steps)})")
        confirmed = self._confirm(w, step, base, metrics)
        if confirmed is False:
            change, needed = w.confirmations[-1][1:3]
            w.region_steps.append(step)
            decision = w.policy.on_region_alarm(w, step)
            line = (f"twin of {w.label} is further from its device at step {step}: {risen}; but the device measures "
                    f"at step {w.reference[0]}'s setting as it did then (a change of {change:.2f} x its noise power; "
                    f"drift is {needed:.2f} or more): training has moved where the twin predicts less well, not "
                    f"drift; {decision.reason}")
            if decision.action is Action.REFINE:
                self.report(f"-- {line}")
                w.refine_due = decision.since
            else:
                if decision.action is Action.WARN:
                    self.report(f"-- warning: {line}")
                    w.last_warned = step
                # the twin's error in this region is the new normal: a baseline (and a reference) set afresh
                w.detector.rebaseline()
                w.reference = None
            return
        what = f"twin of {w.label} has drifted from its device at step {step}: {risen}"
        if confirmed and w.drift_confirmed == step:
            what += (f"; at step {w.reference[0]}'s setting the device changed by {w.confirmations[-1][1]:.2f} x "
                     f"its noise power")
        decision = w.policy.on_alarm(w, step)
        if decision.action is Action.WARN:
            self.report(f"-- warning: {what}; {decision.reason}")
            w.last_warned = step
        elif decision.action is Action.REFINE:
            self.report(f"-- {what}; refining it online from the measurements since step {decision.since}")
            w.refine_due = decision.since
        elif decision.action is Action.PAUSE:
            self._pause(w, step, what)
        else:
            log.debug("%s: alarm at step %d, nothing done: %s", w.label, step, decision.reason)

    def _confirm(self, w: WatchedReplica, step: int, base: float, metrics: dict[str, float]) -> bool | None:
        """Measure the reference again: whether the device itself changed (None: no reference to ask)."""
        ref = w.reference
        if ref is None or w.settings.reference_rows < 1 or not math.isfinite(base):
            return None
        if w.drift_confirmed is not None:
            return True  # a device that changed does not change back unasked: no need to measure it again
        ref_step, x, params, y_then = ref
        fresh = w.collect(groups=1, batch=len(x), repeats=1, seed=self.seed + 7_368_787 + step,
                          sample_params=AtSetting(params), sample_inputs=TheseRows(x), purpose="drift reference")
        w.reference_samples += fresh.device_samples
        y_now = np.asarray(fresh.y[0][0], dtype=np.float64).reshape(y_then.shape)
        change, se = reference_change(y_then, y_now, w.noise, w.noise_floor * (w.output_var or float(y_then.var())))
        needed = max(w.settings.confirm_share * (w.settings.rise - 1.0) * base, REFERENCE_SIGNIFICANCE * se)
        confirmed = bool(change > needed)
        w.confirmations.append((step, change, needed, confirmed))
        if confirmed:
            w.drift_confirmed = step
        metrics[f"drift/{w.label}/reference_change"] = change
        return confirmed

    # -- refinement ------------------------------------------------------------------------------------

    def _handle(self, w: WatchedReplica) -> tuple[Any, Backend]:
        """The twin copy that fits for ``w``, and the backend that waits on its calls: the replica's first
        twin copy and the pipeline's backend, or (no copies elsewhere) a twin worker on a thread here."""
        pool = w.replica.twins
        if pool is not None:
            return pool.handles[0], self.backend
        handle = LocalTwinHandle(TwinWorker.from_twin(w.replica.twin), name=w.label)
        self._local.append(handle)
        return handle, self._here

    def _explore(self, w: WatchedReplica, step: int, groups: int, batch: int) -> Samples | None:
        """A few groups measured around the current parameters, within the sample budget."""
        s = w.settings
        budget = int(s.explore_fraction * w.trained_rows) - (w.explore_samples - w.widen_samples)
        groups = min(groups, budget // batch) if batch > 0 else 0
        if groups < 1:
            return None
        recent = np.concatenate([entry[1] for entry in list(w.buffer)[-8:]])
        # measured once each: the noise floor is the calibration's, and a budget goes further in settings
        fresh = w.collect(groups=groups, batch=batch, repeats=1, seed=self.seed + 7919 * step + len(w.alarm_steps),
                          sample_params=AroundParams(w.layer.params_numpy(), w.layer.spec, s.explore_spread),
                          sample_inputs=FromRows(recent))
        w.explore_samples += fresh.device_samples
        return fresh

    def _start_refine(self, w: WatchedReplica, step: int, since: int) -> None:
        """Refine from what was measured since the change began (what came before describes another device),
        recency-weighted, and a few exploratory groups."""
        s = w.settings
        entries = [e for e in w.buffer if e[0] > since]
        rows = int(np.median([e[1].shape[0] for e in entries]))
        fresh = self._explore(w, step, s.explore_groups, rows)
        train, val = self._from_buffer(w, step, entries)
        if fresh is not None:
            # one exploratory group is held out beside the newest buffered steps
            val, train = val + fresh.subset([0]), train + fresh.subset(range(1, len(fresh)))
        self._submit(w, step, since, "refine", train, val, entries, fresh)

    def _from_buffer(self, w: WatchedReplica, step: int, entries: list) -> tuple[Samples, Samples]:
        """Training's measurements since a change, split for a refit: the newest fifth held out (the refit is
        accepted only if it predicts the device as it is now better than the twin in use does), and of the
        rest at most ``MAX_GROUPS`` steps, the newer the likelier (a fit short enough to take over soon)."""
        if not entries:
            return Samples([], [], []), Samples([], [], [])
        n_val = max(1, len(entries) // 5)
        held, pool = entries[-n_val:], entries[:-n_val]
        pick: Sequence[int] = []
        if pool:
            rng = np.random.default_rng(self.seed + step)
            age = np.array([step - e[0] for e in pool], dtype=np.float64)
            weight = 0.5 ** (age / w.settings.half_life_steps)
            pick = np.sort(rng.choice(len(pool), size=min(len(pool), MAX_GROUPS), replace=False,
                                      p=weight / weight.sum()))
        train = Samples([pool[i][1] for i in pick], [pool[i][2] for i in pick], [pool[i][3][None] for i in pick])
        val = Samples([e[1] for e in held], [e[2] for e in held], [e[3][None] for e in held])
        return train, val

    def _submit(self, w: WatchedReplica, step: int, since: int, source: str, train: Samples, val: Samples,
                entries: list, fresh: Samples | None) -> None:
        handle, w.waits_on = self._handle(w)
        w.pending = handle.submit_refine(train, val, epochs=w.settings.epochs, seed=self.seed + step)
        w.pending_info = {"step": step, "since": since, "t0": time.perf_counter(), "source": source,
                          "fitted_by": handle.name,
                          "samples": {"buffer_rows": int(sum(e[1].shape[0] for e in entries)),
                                      "explore_rows": 0 if fresh is None else fresh.device_samples,
                                      "device_samples": 0 if fresh is None else fresh.device_samples,
                                      "groups": len(train) + len(val)}}

    # -- beyond training's region: range checks and widened refinements ---------------------------------------

    def _over_range(self, w: WatchedReplica, step: int, groups: int, what: str) -> Samples | None:
        """``groups`` settings spread over the whole range, each on ``RANGE_BATCH`` inputs over the input range,
        measured once, within the widening budget (None: not one group fits it)."""
        batch = min(int(w.calibration.get("batch", RANGE_BATCH)), RANGE_BATCH)
        budget = int(w.settings.widen_fraction * w.trained_rows) - w.widen_samples
        groups = min(groups, budget // batch)
        if groups < 1:
            self.report(f"   {w.label}: no {what} at step {step}: its budget is spent ({w.widen_samples} of "
                        f"{int(w.settings.widen_fraction * w.trained_rows)} samples)")
            return None
        recent = (np.concatenate([entry[1] for entry in list(w.buffer)[-8:]]) if w.buffer
                  else np.zeros((1, w.layer.spec.input.size)))
        fresh = w.collect(groups=groups, batch=batch, repeats=1,
                          seed=self.seed + 15_485_863 + 7919 * step + w.widen_samples,
                          sample_params=OverRange(w.layer.params_numpy(), w.layer.spec),
                          sample_inputs=OverInputs(w.layer.spec, recent))
        w.explore_samples += fresh.device_samples
        w.widen_samples += fresh.device_samples
        return fresh

    def _check_range(self, w: WatchedReplica, step: int, since: int) -> None:
        """An accepted refinement measured against the device over the whole range; the policy decides."""
        from pnn_cluster.twins.fit import evaluate_twin

        if w.settings.check_groups < 1 or not (w.nmse is not None and w.nmse > 0):
            return
        check = self._over_range(w, step, w.settings.check_groups, "range check")
        if check is None:
            return
        ratio = float(evaluate_twin(w.replica.twin, check)) / w.nmse
        w.range_checks.append((step, ratio))
        decision = w.policy.on_range_check(w, step, ratio, since)
        self.report(f"   {w.label}: range check at step {step}: {decision.reason} ({check.device_samples} samples)")
        if decision.action is Action.WIDEN:
            self._start_widen(w, step, since, check)

    def _start_widen(self, w: WatchedReplica, step: int, since: int, check: Samples | None) -> None:
        """Refit to settings spread over the whole range beside training's measurements since the change; held
        out together: the range check's settings and the newest buffered steps (the refit must predict them better)."""
        s = w.settings
        entries = [e for e in w.buffer if e[0] > since]
        fresh = self._over_range(w, step, s.widen_groups + (s.check_groups if check is None else 0),
                                 "widened refinement")
        if fresh is None:
            return
        if check is None:  # asked again after a resume: the range check is measured again with the rest
            n = min(max(1, s.check_groups), len(fresh) - 1)
            if n < 1:
                return
            check, fresh = fresh.subset(range(n)), fresh.subset(range(n, len(fresh)))
        train, val = self._from_buffer(w, step, entries)
        self._submit(w, step, since, "widen", train + fresh, val + check, entries, fresh)

    def _poll(self, w: WatchedReplica, step: int) -> None:
        if not w.waits_on.done(w.pending):
            return
        call, backend, info = w.pending, w.waits_on, w.pending_info
        w.pending, w.waits_on, w.pending_info = None, None, {}
        try:
            result = backend.result(call)
        except Exception as exc:  # a refinement that failed leaves the twin in use as it was
            self.report(f"   {w.label}: {info['source']} failed ({type(exc).__name__}: {exc}); the twin in use stays")
            result = None
        if result is not None:
            self._take(w, step, result, info)
        if w.paused:
            w.pool.readmit(w.replica)
            w.paused = False
            self.report(f"   {w.label} back in its pool at step {step}, {time.perf_counter() - info['t0']:.1f} s "
                        f"after it left")

    def _take(self, w: WatchedReplica, step: int, result: Mapping[str, Any], info: Mapping[str, Any]) -> None:
        figures, payload = result["figures"], result["payload"]
        after, before = float(figures["nmse_val"]), float(result["nmse_before"])
        accepted = after < before
        number = next_version(range(w.versions))  # versions 0 .. w.versions - 1 exist
        w.versions = number + 1
        parent = w.version
        if accepted:
            self._swap(w, payload)
            w.version = number
            # from now on, drift is a rise over what this twin achieves (a warm-up long again: no alarm meanwhile)
            w.detector.rebaseline()
        fresh_floor = figures.get("noise_floor")
        floor = float(fresh_floor) if fresh_floor is not None and math.isfinite(fresh_floor) and fresh_floor > 0 \
            else w.noise_floor
        record = {"device": w.label, "version": number, "step": step, "source": info["source"],
                  "kind": payload.get("kind", w.kind), "nmse": after, "nmse_before": before, "noise_floor": floor,
                  "ratio_to_floor": after / floor if floor > 0 else None, "samples": dict(info["samples"]),
                  "parent": parent, "accepted": accepted, "seconds": round(time.perf_counter() - info["t0"], 3),
                  "asked_at_step": info["step"], "fitted_by": info["fitted_by"],
                  "state_hash": twin_digest(payload["state"])}
        self.records.append(record)
        self.report(f"   {w.label}: {info['source']} v{number} {'took over' if accepted else 'not taken'} at step "
                    f"{step} (asked at step {info['step']}): NMSE {after:.3e} on the newest measurements, the twin "
                    f"in use {before:.3e}; {record['samples']['device_samples']} device samples")
        if self.on_version is not None:
            self.on_version(record, payload["state"] if accepted else None)
        if accepted and w.policy.checks_range and info["source"] in ("refine", "widen"):
            self._check_range(w, step, info["since"])

    def _swap(self, w: WatchedReplica, payload: Mapping[str, Any]) -> None:
        """The refined twin replaces the one in use, in the trainer and on every copy (a step boundary: no
        backward pass is in flight)."""
        w.replica.twin.load_state_dict(dict(payload["state"]))
        w.replica.twin.requires_grad_(False)
        if w.replica.twins is not None:
            w.replica.twins.update(payload, twin_digest(payload["state"]))

    # -- full recalibration (policy pause) ----------------------------------------------------------------------

    def _pause(self, w: WatchedReplica, step: int, what: str) -> None:
        """Stop sending work to the device and recalibrate it in full. With other replicas of its pool still
        active only this one leaves the pool (training goes on with the others) and comes back at the first
        step boundary after its recalibration; alone, training waits for it (Bluesky's suspender)."""
        pool = w.pool
        if pool is not None and w.replica.name in pool.retired:
            self.report(f"-- {what}; {w.label} has left its pool ({pool.retired[w.replica.name]}): not recalibrated")
            return
        others = [] if pool is None else [r for r in pool.active if r is not w.replica]
        if not others or w.replica not in pool.active:
            self.report(f"-- {what}; pausing {w.label} to recalibrate it in full")
            info = self._info(w, step)
            result = self._recalibration(w, step, info)
            self._take(w, step, result, info)
            self.report(f"   {w.label} resumed after {time.perf_counter() - info['t0']:.1f} s")
            return
        self.report(f"-- {what}; taking {w.label} out of its pool to recalibrate it in full "
                    f"({len(others)} other replica(s) go on)")
        pool.suspend(w.replica, "recalibrating its twin")
        w.paused = True
        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=len(self.watched),
                                                                  thread_name_prefix="recalibration")
        w.pending_info = self._info(w, step)
        w.pending, w.waits_on = self._threads.submit(self._recalibration, w, step, w.pending_info), self._here

    @staticmethod
    def _info(w: WatchedReplica, step: int) -> dict[str, Any]:
        return {"step": step, "t0": time.perf_counter(), "source": "recalibration", "fitted_by": "",
                "samples": {"buffer_rows": 0, "explore_rows": 0, "device_samples": 0, "groups": 0}}

    def _recalibration(self, w: WatchedReplica, step: int, info: dict[str, Any]) -> dict[str, Any]:
        """A full recalibration, as the first one: fresh samples over the whole range and a fit of every
        weight (in the replica's twin actor, or a thread); ``info`` takes its sample counts. Blocks."""
        from pnn_cluster.twins.fit import fit_splits

        c = w.calibration
        seed = self.seed + 104_729 + 31 * step
        samples = w.collect(groups=c.get("groups", 24), batch=c.get("batch", 128), repeats=c.get("repeats", 2),
                            seed=seed)
        w.recalibration_samples += samples.device_samples
        info["samples"].update(device_samples=samples.device_samples, groups=len(samples))
        fit_on, stop, val = fit_splits(samples, c.get("holdout", 0.2), seed)
        kw = {"epochs": c.get("epochs"), "lr": c.get("lr"), "seed": seed, "stop": stop, "drifting_only": False}
        handle, backend = self._handle(w)
        info["fitted_by"] = handle.name
        call = handle.submit_refine(fit_on, val, **{k: v for k, v in kw.items() if v is not None})
        backend.wait([call], timeout=None)
        return backend.result(call)

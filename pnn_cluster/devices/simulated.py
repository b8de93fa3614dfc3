"""Simulated physical devices: a "real" device with imperfections around a physics model.

Each simulated system supplies an ideal :class:`PhysicsModel` with nominal
calibration constants. The simulated device runs a *true* copy of it whose
constants are off by a fixed miscalibration (the part of the sim-reality gap
a physics twin can learn) and drift slowly as samples are measured, and in
which the physics the model leaves out is switched on (the part it cannot:
each system's ``unmodelled_effects``, at magnitudes set from real setups and
documented with their physical reason); on top of it
come shot-to-shot fluctuation, measurement noise, optional quantisation and a
latency that is spent waiting, as hardware does, not computing.

Everything random is drawn from generators seeded by ``Imperfections.seed``,
so a run is reproducible call for call.

Drift. Every system drifts by default, at a rate set from its physics (each
system's ``lab_drift``, a :class:`LabDrift`), never tuned for a result: the
calibration constants random-walk as samples are measured, the way a setup
wanders with the lab's temperature and its source's ageing. A rate is stated
in lab time, in each constant's natural spread per sqrt(hour), and turned
into the per-sample rate ``Imperfections.drift`` with the sample rate the
system measures at (each system's figures and reasons, and a table of them:
:data:`pnn_cluster.devices.lab.LABS`), with the lab's temperature walking about 1 K per sqrt(hour) (each
``lab_drift.reason`` has the coefficients). The one rate is that of the
constants that move most; the walk moves every constant at it, which
overstates the steadier ones. A run of 70,000 samples on each device
(hybrid_mnist) moves the constants by 0.1 to 0.2 of a spread on the slow
systems and 0.015 on the circuit. The walk models runs of hours; over
days (70,000 samples of the pendula take 65 hours) a lab's air conditioning
bounds its temperature, which a random walk does not, so there it overstates
the drift. ``Imperfections.drift`` sets another rate, 0 none.

Step changes (``Imperfections.steps``): at a given measured-sample count
every calibration constant jumps at once, by ``size`` spreads times a
standard normal draw, as when a fibre is bumped or a cable re-seated. The
device records each jump in ``drift_events`` (its identity has the list,
its health the count).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import time
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from pnn_cluster.devices.base import Device
from pnn_cluster.devices.physics import PhysicsModel
from pnn_cluster.devices.spec import DeviceSpec, LimitError, Timing

__all__ = ["Imperfections", "LabDrift", "SimulatedDevice", "MAX_SIZE", "MAX_SEED"]

#: the largest size option a simulated system accepts (``n_in``, ``n_out``, ``n_pixels``...): 2**16 values
#: per port or parameter vector, wider than any instrument it stands for; the memory a whole run needs at
#: such widths is estimated by the configuration's checks
MAX_SIZE = 65_536
#: seeds of simulated devices (derived seeds included) are integers in 0..MAX_SEED (torch takes 64 bits)
MAX_SEED = 2**63 - 1
#: the measured-sample count a step change may be set at: far beyond any run (a year at a million samples/s
#: is 3e13), small enough to stay exact in a float
MAX_STEP_SAMPLES = 10**15
#: the largest step change, in spreads (as ``gap``)
MAX_STEP_SIZE = 100.0
#: the sample count ``Imperfections.drift`` is stated per
DRIFT_SAMPLES = 10_000


@dataclass(frozen=True)
class LabDrift:
    """Where a system's default drift rate comes from: a rate in lab time and the rate samples are measured at.

    per_sqrt_hour: random-walk step of the calibration constants per sqrt(hour) of lab time, in units of each
        constant's natural spread: the rate of the constants that move most (the walk moves all at it).
    samples_per_s: how many samples the real setup measures per second.
    reason: what physically walks, and what limits the sample rate.
    """

    per_sqrt_hour: float
    samples_per_s: float
    reason: str

    @property
    def drift(self) -> float:
        """The same walk per :data:`DRIFT_SAMPLES` measured samples (``Imperfections.drift``), two digits."""
        hours = DRIFT_SAMPLES / self.samples_per_s / 3600.0
        return float(f"{self.per_sqrt_hour * math.sqrt(hours):.2g}")

    def imperfections(self, **kw: Any) -> Imperfections:
        """A system's default imperfections: :class:`Imperfections`' realistic gap (one spread) with this walk as
        its drift, and ``kw`` for the rest (noise, quantisation, latency)."""
        return Imperfections(drift=self.drift, **kw)


@dataclass(frozen=True)
class Imperfections:
    """How far a simulated device is from its ideal model.

    noise: additive measurement noise, standard deviation as a fraction of the
        device's output scale.
    shot: shot-to-shot fluctuation, a multiplicative factor per sample with this
        standard deviation (laser energy, drive amplitude...).
    gap: size of the fixed miscalibration, in units of each calibration
        constant's natural spread (0: the ideal model is exact).
    drift: random-walk step of the calibration constants per 10,000 measured
        samples, in the same units (each system's default comes from its
        ``lab_drift``).
    steps: step changes, ``(at_samples, size)`` pairs: when the device's
        measured-sample count reaches ``at_samples`` (0: before the first
        sample), every calibration constant jumps by ``size`` spreads times a
        standard normal draw. Given as pairs or as mappings with those keys.
    unmodelled: scale of the physics the model leaves out (each system's
        ``unmodelled_effects``: 1 is the realistic magnitude, 0 turns it off).
    quant_bits: quantise the output to this many bits over the device's output
        range (an 8-bit oscilloscope), or None.
    latency_call_s, latency_sample_s: time a call takes on the hardware.
    lab_clock: measure at the real setup's pace (each system's ``lab_drift.samples_per_s``, the table of
        :mod:`pnn_cluster.devices.lab`) times this factor, on top of the latencies: 1 is the lab's own clock,
        10 ten times faster (a benchmark that must fit a small machine), 0 (the default) no wait at all.
    seed: seeds miscalibration, noise, drift and step changes.
    """

    noise: float = 0.01
    shot: float = 0.01
    gap: float = 1.0
    drift: float = 0.0
    steps: tuple[tuple[int, float], ...] = ()
    unmodelled: float = 1.0
    quant_bits: int | None = None
    latency_call_s: float = 0.0
    latency_sample_s: float = 0.0
    lab_clock: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("noise", "shot", "gap", "drift", "unmodelled", "latency_call_s", "latency_sample_s",
                     "lab_clock"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
                raise ValueError(f"Imperfections.{name} must be a finite number >= 0, got {v!r}")
        object.__setattr__(self, "steps", _checked_steps(self.steps))
        if self.quant_bits is not None and not (2 <= int(self.quant_bits) <= 24):
            raise ValueError(f"Imperfections.quant_bits must be in 2..24 or None, got {self.quant_bits!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) \
                or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"Imperfections.seed must be an integer in 0..2**63-1, got {self.seed!r}")

    @classmethod
    def ideal(cls, seed: int = 0) -> Imperfections:
        """No noise, no gap, no drift or steps, no unmodelled physics: the device is exactly its ideal model."""
        return cls(noise=0.0, shot=0.0, gap=0.0, drift=0.0, steps=(), unmodelled=0.0, quant_bits=None, seed=seed)

    def with_(self, **kw: Any) -> Imperfections:
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; ``Imperfections(**d)`` gives the same imperfections back."""
        d = asdict(self)
        d["steps"] = [{"at_samples": at, "size": size} for at, size in self.steps]
        return d


def _checked_steps(steps: Any) -> tuple[tuple[int, float], ...]:
    """``steps`` as ``((at_samples, size), ...)``, or a ValueError naming the item, the field and what is allowed."""
    if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, (list, tuple)):
        raise ValueError(f"Imperfections.steps must be a list of (at_samples, size) pairs, got {_show(steps)}")
    out = []
    for i, step in enumerate(steps):
        where = f"Imperfections.steps[{i}]"
        if isinstance(step, Mapping):
            if set(step) != {"at_samples", "size"}:
                raise ValueError(f"{where} must have the keys at_samples and size, got {_show(dict(step))}")
            at, size = step["at_samples"], step["size"]
        elif isinstance(step, (list, tuple)) and len(step) == 2:
            at, size = step
        else:
            raise ValueError(f"{where} must be an (at_samples, size) pair, got {_show(step)}")
        if isinstance(at, bool) or not isinstance(at, (int, np.integer)) or not 0 <= at <= MAX_STEP_SAMPLES:
            raise ValueError(f"{where}.at_samples must be an integer from 0 to {MAX_STEP_SAMPLES:,}, "
                             f"got {_show(at)}")
        if not _is_number(size) or not (math.isfinite(size) and 0 <= size <= MAX_STEP_SIZE):
            raise ValueError(f"{where}.size must be a finite number from 0 to {MAX_STEP_SIZE:g} (spreads), "
                             f"got {_show(size)}")
        out.append((int(at), float(size)))
    return tuple(out)


class SimulatedDevice(Device):
    """Base class of the simulated systems.

    Subclasses implement :meth:`build_spec`, :meth:`build_model` and
    :meth:`calibration_spread`; they may override :attr:`output_scale` and
    :attr:`output_range` (used for noise and quantisation) and
    :meth:`fluctuate` for physics-specific noise.
    """

    #: default imperfections of this system when none are given
    default_imperfections = Imperfections()
    #: the physics and sample rate behind the default drift rate (``default_imperfections.drift``)
    lab_drift: LabDrift | None = None
    #: realistic strength of each effect the model leaves out (keys of the model's ``UNMODELLED``)
    unmodelled_effects: dict[str, float] = {}
    #: typical magnitude of the output, the unit of ``Imperfections.noise``
    output_scale: float = 1.0
    #: full-scale range of the detector, for quantisation
    output_range: tuple[float, float] = (-1.0, 1.0)

    def __init__(self, imperfections: Imperfections | None = None, **options: Any) -> None:
        self.check_options(options)
        self.options = dict(options)
        self.imperfections = imperfections or self.default_imperfections
        super().__init__(replace(self.build_spec(**options), timing=self.timing))
        self._ideal = self.build_model(**options)
        scale = self.imperfections.unmodelled
        self._true = self._ideal.with_unmodelled({k: scale * v for k, v in self.unmodelled_effects.items()})
        self._spread = {k: torch.as_tensor(v, dtype=torch.get_default_dtype())
                        for k, v in self.calibration_spread().items()}
        seed = self.imperfections.seed
        gap_rng = torch.Generator().manual_seed(10_007 + seed)
        with torch.no_grad():
            for name, spread in self._spread.items():
                c = self._true.calibration[name]
                z = torch.randn(c.shape, generator=gap_rng, dtype=c.dtype)
                c.add_(self.imperfections.gap * spread * z)
        self._noise_rng = np.random.default_rng(seed)
        #: the purpose whose stream the noise is drawn from now ("default": the device's first stream)
        self.noise_purpose = "default"
        self._noise_streams: dict[str, np.random.Generator] = {"default": self._noise_rng}
        self._drift_rng = torch.Generator().manual_seed(20_011 + seed)
        # a generator of their own: adding a step change leaves the walk's draws as they were
        self._step_rng = torch.Generator().manual_seed(30_011 + seed)
        #: the clock of drift and step changes: samples measured so far
        self._samples_measured = 0
        #: each step change applied: {"samples": count at which it applied, "size": spreads, "kind": "step"}
        self.drift_events: list[dict[str, Any]] = []
        self._step_changes(0)

    @property
    def timing(self) -> Timing:
        """The hardware's time per call and per sample: the latencies, plus the lab's pace with ``lab_clock``."""
        return self.timing_of(self.imperfections)

    @classmethod
    def timing_of(cls, imperfections: Imperfections) -> Timing:
        """How long a call takes: ``latency_call_s`` plus, per sample, ``latency_sample_s`` and, with a
        ``lab_clock``, the real setup's time per sample divided by it."""
        per_sample = imperfections.latency_sample_s
        if imperfections.lab_clock > 0:
            if cls.lab_drift is None:
                raise ValueError(f"Imperfections.lab_clock: {cls.__name__} states no lab sample rate (lab_drift); "
                                 "allowed: 0, or latency_call_s / latency_sample_s")
            per_sample += 1.0 / (cls.lab_drift.samples_per_s * imperfections.lab_clock)
        return Timing(float(imperfections.latency_call_s), float(per_sample))

    # -- options -------------------------------------------------------------------

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        """The options :meth:`build_spec` takes, by name, with their annotated types (its signature decides)."""
        return _option_types(cls)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Refuse, before anything is allocated, an option :meth:`build_spec` does not take or a value it cannot.

        Integer options are sizes (inputs, outputs, pixels, modes...): whole numbers from 1 to
        :data:`MAX_SIZE`; a float, even ``1e11``, is refused rather than truncated. Float options are finite
        numbers. A :class:`LimitError` names the option (``options.n_in``), the value and what is allowed.
        """
        types_ = cls.option_types()
        for name, value in options.items():
            field = f"options.{name}"
            if name not in types_:
                raise LimitError(cls.__name__, field, "unknown option", None, ", ".join(types_) or "none")
            ann = types_[name]
            allowed_types = set(typing.get_args(ann)) if typing.get_origin(ann) in (typing.Union, _UnionType) \
                else {ann}
            if value is None and type(None) in allowed_types:
                continue
            if int in allowed_types:
                allowed = f"an integer from 1 to {MAX_SIZE}"
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    problem = "out of range" if _is_number(value) and not 1 <= value <= MAX_SIZE else \
                        f"not an integer ({type(value).__name__})"
                    raise LimitError(cls.__name__, field, problem, _show(value), allowed)
                if not 1 <= value <= MAX_SIZE:
                    raise LimitError(cls.__name__, field, "out of range", _show(value), allowed)
            elif float in allowed_types:
                if not _is_number(value) or not math.isfinite(value):
                    raise LimitError(cls.__name__, field, f"not a finite number ({type(value).__name__})",
                                     _show(value), "a finite number")

    # -- subclass hooks ------------------------------------------------------------

    def build_spec(self, **options: Any) -> DeviceSpec:  # pragma: no cover
        raise NotImplementedError

    def build_model(self, **options: Any) -> PhysicsModel:  # pragma: no cover
        raise NotImplementedError

    def calibration_spread(self) -> Mapping[str, Any]:
        """Natural spread of each calibration constant (the unit of gap and drift)."""
        raise NotImplementedError  # pragma: no cover

    def fluctuate(self, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Shot-to-shot fluctuation and measurement noise on a clean batch ``y``."""
        imp = self.imperfections
        if imp.shot > 0:
            y = y * (1.0 + imp.shot * rng.standard_normal((y.shape[0], 1)))
        if imp.noise > 0:
            y = y + imp.noise * self.output_scale * rng.standard_normal(y.shape)
        return y

    # -- the device -------------------------------------------------------------------

    def model(self) -> PhysicsModel:
        """The ideal model: what the lab believes the device does (nominal calibration)."""
        return self._ideal.clone()

    def true_model(self) -> PhysicsModel:
        """The simulator's exact noise-free physics, drift included. Simulated devices only."""
        return self._true.clone()

    def measure(self, x: np.ndarray, params: Mapping[str, np.ndarray]) -> np.ndarray:
        t0 = time.perf_counter()
        dtype = torch.get_default_dtype()
        start, n = self._samples_measured, x.shape[0]
        # a step change inside the batch falls between two samples: the ones before see the old constants
        cuts = sorted({at - start for at, _ in self.imperfections.steps if start < at < start + n})
        with torch.no_grad():
            pt = {k: torch.from_numpy(v).to(dtype) for k, v in params.items()}
            pieces = []
            for lo, hi in zip([0, *cuts], [*cuts, n]):
                if lo > 0:
                    self._step_changes(start + lo)
                pieces.append(self._true(torch.from_numpy(x[lo:hi]).to(dtype), pt))
            y = torch.cat(pieces).double().numpy()
        y = self.fluctuate(y, self._noise_rng)
        if self.imperfections.quant_bits:
            y = self._quantise(y, int(self.imperfections.quant_bits))
        self._samples_measured = start + n
        self._drift(n)
        self._step_changes(start + n)
        wait = self.timing.seconds(n) - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)  # the hardware is busy; a real instrument blocks the same way
        return y

    def noise_stream(self, purpose: str) -> None:
        stream = self._noise_streams.get(purpose)
        if stream is None:
            # a stable key per purpose (str hashes vary between processes): the stream is (seed, purpose)'s alone
            key = int.from_bytes(hashlib.blake2b(purpose.encode(), digest_size=8).digest(), "big")
            stream = self._noise_streams[purpose] = np.random.default_rng(
                np.random.SeedSequence([self.imperfections.seed, key]))
        self._noise_rng = stream  # a purpose taken up again continues its stream where it stopped
        self.noise_purpose = purpose

    def _quantise(self, y: np.ndarray, bits: int) -> np.ndarray:
        lo, hi = self.output_range
        levels = 2**bits - 1
        step = (hi - lo) / levels
        # a detector saturates at full scale: that is the measurement, not a clip of our making
        return lo + step * np.clip(np.round((y - lo) / step), 0, levels)

    def _drift(self, n_samples: int) -> None:
        if self.imperfections.drift <= 0:
            return
        scale = self.imperfections.drift * float(np.sqrt(n_samples / 10_000.0))
        with torch.no_grad():
            for name, spread in self._spread.items():
                c = self._true.calibration[name]
                c.add_(scale * spread * torch.randn(c.shape, generator=self._drift_rng, dtype=c.dtype))

    def _step_changes(self, count: int) -> None:
        """Apply the step changes set at ``count`` measured samples (the count reaches each value once)."""
        for at, size in self.imperfections.steps:
            if at != count:
                continue
            with torch.no_grad():
                for name, spread in self._spread.items():
                    c = self._true.calibration[name]
                    c.add_(size * spread * torch.randn(c.shape, generator=self._step_rng, dtype=c.dtype))
            self.drift_events.append({"samples": count, "size": size, "kind": "step"})

    def health(self) -> dict[str, Any]:
        return {**super().health(), "drift_events": len(self.drift_events)}

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "system": self.spec.name,
            "simulated": True,
            "options": dict(self.options),
            "imperfections": self.imperfections.to_dict(),
            "true_calibration": self._true.calibration_values(),
            "unmodelled": dict(self._true.unmodelled),
            "drift_events": [dict(e) for e in self.drift_events],
        }


_UnionType = type(int | None)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _show(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and abs(v) >= 1e6:
        return f"{float(v):g}"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


@functools.cache
def _option_types(cls: type) -> dict[str, Any]:
    fn = cls.build_spec
    hints = typing.get_type_hints(fn)
    params = inspect.signature(fn).parameters.values()
    return {p.name: hints.get(p.name, Any) for p in params
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

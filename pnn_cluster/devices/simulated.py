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
"""

from __future__ import annotations

import functools
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
from pnn_cluster.devices.spec import DeviceSpec, LimitError

__all__ = ["Imperfections", "SimulatedDevice", "MAX_SIZE", "MAX_SEED"]

#: the largest size option a simulated system accepts (``n_in``, ``n_out``, ``n_pixels``...): 2**16 values
#: per port or parameter vector, wider than any instrument it stands for; the memory a whole run needs at
#: such widths is estimated by the configuration's checks
MAX_SIZE = 65_536
#: seeds of simulated devices (derived seeds included) are integers in 0..MAX_SEED (torch takes 64 bits)
MAX_SEED = 2**63 - 1


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
        samples, in the same units.
    unmodelled: scale of the physics the model leaves out (each system's
        ``unmodelled_effects``: 1 is the realistic magnitude, 0 turns it off).
    quant_bits: quantise the output to this many bits over the device's output
        range (an 8-bit oscilloscope), or None.
    latency_call_s, latency_sample_s: time a call takes on the hardware.
    seed: seeds miscalibration, noise and drift.
    """

    noise: float = 0.01
    shot: float = 0.01
    gap: float = 1.0
    drift: float = 0.0
    unmodelled: float = 1.0
    quant_bits: int | None = None
    latency_call_s: float = 0.0
    latency_sample_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("noise", "shot", "gap", "drift", "unmodelled", "latency_call_s", "latency_sample_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
                raise ValueError(f"Imperfections.{name} must be a finite number >= 0, got {v!r}")
        if self.quant_bits is not None and not (2 <= int(self.quant_bits) <= 24):
            raise ValueError(f"Imperfections.quant_bits must be in 2..24 or None, got {self.quant_bits!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) \
                or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"Imperfections.seed must be an integer in 0..2**63-1, got {self.seed!r}")

    @classmethod
    def ideal(cls, seed: int = 0) -> Imperfections:
        """No noise, no gap, no drift, no unmodelled physics: the device is exactly its ideal model."""
        return cls(noise=0.0, shot=0.0, gap=0.0, drift=0.0, unmodelled=0.0, quant_bits=None, seed=seed)

    def with_(self, **kw: Any) -> Imperfections:
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SimulatedDevice(Device):
    """Base class of the simulated systems.

    Subclasses implement :meth:`build_spec`, :meth:`build_model` and
    :meth:`calibration_spread`; they may override :attr:`output_scale` and
    :attr:`output_range` (used for noise and quantisation) and
    :meth:`fluctuate` for physics-specific noise.
    """

    #: default imperfections of this system when none are given
    default_imperfections = Imperfections()
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
        super().__init__(self.build_spec(**options))
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
        self._drift_rng = torch.Generator().manual_seed(20_011 + seed)

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
        with torch.no_grad():
            xt = torch.from_numpy(x).to(dtype)
            pt = {k: torch.from_numpy(v).to(dtype) for k, v in params.items()}
            y = self._true(xt, pt).double().numpy()
        y = self.fluctuate(y, self._noise_rng)
        if self.imperfections.quant_bits:
            y = self._quantise(y, int(self.imperfections.quant_bits))
        self._drift(x.shape[0])
        wait = self.imperfections.latency_call_s + self.imperfections.latency_sample_s * x.shape[0]
        wait -= time.perf_counter() - t0
        if wait > 0:
            time.sleep(wait)  # the hardware is busy; a real instrument blocks the same way
        return y

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

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "system": self.spec.name,
            "simulated": True,
            "options": dict(self.options),
            "imperfections": self.imperfections.to_dict(),
            "true_calibration": self._true.calibration_values(),
            "unmodelled": dict(self._true.unmodelled),
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

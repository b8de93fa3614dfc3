"""Declarative device specifications and the limit checks that protect hardware.

A device declares what it accepts (input port, named parameters) and what it
returns (output port). Every value is checked against that declaration before
it reaches the device: a wrong shape, a NaN or inf, or a value outside the
hard limits raises :class:`LimitError` naming the field, the offending value
and what is allowed. Nothing is ever clipped silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LimitError", "Port", "ParamSpec", "Timing", "DeviceSpec", "UNIFORM"]


class LimitError(ValueError):
    """A value was refused before reaching a device.

    Attributes name what was wrong so that callers (servers, actors, UIs) can
    report it without parsing the message.
    """

    def __init__(self, device: str, field: str, problem: str, value: Any = None, allowed: str = ""):
        self.device = device
        self.field = field
        self.problem = problem
        self.value = value
        self.allowed = allowed
        msg = f"{device}: {field}: {problem}"
        if value is not None:
            msg += f" (got {value})"
        if allowed:
            msg += f"; allowed: {allowed}"
        super().__init__(msg)


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _first_bad(arr: np.ndarray, mask: np.ndarray) -> tuple[tuple[int, ...], float]:
    idx = tuple(int(i) for i in np.argwhere(mask)[0])
    return idx, float(arr[idx])


def _check_values(device: str, fieldname: str, arr: np.ndarray, low: float, high: float, unit: str) -> None:
    """Reject NaN, inf and out-of-range entries, naming the first bad entry."""
    u = f" {unit}" if unit else ""
    finite = np.isfinite(arr)
    if not finite.all():
        idx, val = _first_bad(arr, ~finite)
        n_bad = int((~finite).sum())
        raise LimitError(
            device, f"{fieldname}[{','.join(map(str, idx))}]",
            f"{n_bad} non-finite value(s)", val, "finite numbers",
        )
    bad = (arr < low) | (arr > high)
    if bad.any():
        idx, val = _first_bad(arr, bad)
        n_bad = int(bad.sum())
        raise LimitError(
            device, f"{fieldname}[{','.join(map(str, idx))}]",
            f"{n_bad} value(s) out of range", f"{_fmt(val)}{u}", f"[{_fmt(low)}, {_fmt(high)}]{u}",
        )


@dataclass(frozen=True)
class Port:
    """An input or output of a device: a vector of ``size`` values in ``[low, high]``."""

    size: int
    low: float = -math.inf
    high: float = math.inf
    unit: str = ""
    doc: str = ""

    def __post_init__(self) -> None:
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"Port.size must be a positive integer, got {self.size!r}")
        if not self.low < self.high:
            raise ValueError(f"Port limits must satisfy low < high, got [{self.low}, {self.high}]")


#: the ``init`` that draws each element uniformly within the limits
UNIFORM = "uniform"


@dataclass(frozen=True)
class ParamSpec:
    """A named, trainable device setting with hard limits.

    ``init`` is where a freshly constructed layer starts: a number within the
    limits (broadcast to every element), ``None`` for the middle of the range,
    or ``"uniform"``: each element drawn uniformly within ``[low, high]``.
    Devices with many identical elements (a ring bank, a mesh) need that
    symmetry broken at the start, or every element gets the same gradient and
    they stay identical; the draw is seeded (see :meth:`initial`).
    """

    name: str
    shape: tuple[int, ...]
    low: float
    high: float
    unit: str = ""
    init: float | str | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"ParamSpec.name must be an identifier, got {self.name!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s < 1 for s in self.shape):
            raise ValueError(f"ParamSpec {self.name}: shape must be positive, got {self.shape}")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(
                f"ParamSpec {self.name}: limits must be finite with low < high, got [{self.low}, {self.high}]"
            )
        self._check_init()

    def _check_init(self) -> None:
        init = self.init
        allowed = f"a number in [{self.low}, {self.high}], None (the middle of the range) or {UNIFORM!r}"
        if init is None or (isinstance(init, str) and init == UNIFORM):
            return
        if isinstance(init, (bool, np.bool_)) or not isinstance(init, (int, float, np.integer, np.floating)):
            raise ValueError(f"ParamSpec {self.name}: init {init!r} is not a number or {UNIFORM!r}; "
                             f"allowed: {allowed}")
        if not self.low <= init <= self.high:  # NaN fails this too
            raise ValueError(f"ParamSpec {self.name}: init {init!r} outside [{self.low}, {self.high}]; "
                             f"allowed: {allowed}")
        object.__setattr__(self, "init", float(init))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    def initial(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """The starting value; ``"uniform"`` draws from ``rng``, by default ``np.random.default_rng(0)``.

        The default seed makes a device's starting point reproducible (and the
        same in every process that builds it); pass a generator to vary it.
        """
        if isinstance(self.init, str):  # UNIFORM, the one string __post_init__ lets through
            rng = np.random.default_rng(0) if rng is None else rng
            return rng.uniform(self.low, self.high, self.shape).astype(np.float64)
        v = (self.low + self.high) / 2 if self.init is None else self.init
        return np.full(self.shape, v, dtype=np.float64)


@dataclass(frozen=True)
class Timing:
    """How long the hardware takes to measure: ``call_s`` per call (settling, a trigger, a readout) plus
    ``sample_s`` per sample (an integration, a swing). The pipeline sizes its micro-batches from it: a
    device that takes no time is asked once per batch, a slow one in as many pieces as keep every stage busy.
    """

    call_s: float = 0.0
    sample_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("call_s", "sample_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Timing.{name}: must be a finite number of seconds >= 0, got {v!r}")

    def seconds(self, rows: float) -> float:
        """The hardware's time for one call of ``rows`` samples."""
        return self.call_s + self.sample_s * rows

    def to_dict(self) -> dict[str, float]:
        return {"call_s": float(self.call_s), "sample_s": float(self.sample_s)}


@dataclass(frozen=True)
class DeviceSpec:
    """Everything the engine needs to know about a device, and nothing about how it works.

    ``timing`` (optional) is how long the device takes to measure; None when it is not declared (the pipeline
    then cuts each batch into enough micro-batches to keep every device busy).
    """

    name: str
    input: Port
    output: Port
    params: tuple[ParamSpec, ...] = field(default_factory=tuple)
    max_batch: int = 1_000_000
    timing: Timing | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))
        if self.timing is not None and not isinstance(self.timing, Timing):
            raise ValueError(f"DeviceSpec {self.name}: timing must be a Timing or None, got {self.timing!r}")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"DeviceSpec {self.name}: duplicate parameter names {names}")

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.name}: no parameter {name!r}; parameters are {list(self.param_names)}")

    def initial_params(self, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Every parameter's starting value; the ``"uniform"`` ones draw in turn from one ``rng``.

        One generator for all (by default ``np.random.default_rng(0)``), so two
        uniform parameters of one device do not start equal.
        """
        if rng is None and any(p.init == UNIFORM for p in self.params):
            rng = np.random.default_rng(0)
        return {p.name: p.initial(rng) for p in self.params}

    # -- checks -----------------------------------------------------------------

    def check_input(self, x: Any) -> np.ndarray:
        """Return ``x`` as a float64 array of shape (batch, input.size), or raise LimitError."""
        arr = _as_float_array(self.name, "input", x)
        if arr.ndim != 2 or arr.shape[1] != self.input.size:
            raise LimitError(
                self.name, "input", "wrong shape", tuple(arr.shape), f"(batch, {self.input.size})"
            )
        if arr.shape[0] < 1 or arr.shape[0] > self.max_batch:
            raise LimitError(self.name, "input", "batch size out of range", arr.shape[0], f"1..{self.max_batch}")
        _check_values(self.name, "input", arr, self.input.low, self.input.high, self.input.unit)
        return arr

    def check_params(self, params: Mapping[str, Any], partial: bool = False) -> dict[str, np.ndarray]:
        """Validate a parameter mapping; with ``partial`` only the given names are required."""
        if not isinstance(params, Mapping):
            raise LimitError(self.name, "params", "must be a mapping of name to array", type(params).__name__)
        unknown = sorted(set(params) - set(self.param_names))
        if unknown:
            raise LimitError(self.name, f"params.{unknown[0]}", "unknown parameter", None,
                             f"one of {list(self.param_names)}")
        out: dict[str, np.ndarray] = {}
        for p in self.params:
            if p.name not in params:
                if partial:
                    continue
                raise LimitError(self.name, f"params.{p.name}", "missing", None, f"shape {p.shape}")
            arr = _as_float_array(self.name, f"params.{p.name}", params[p.name])
            if arr.shape != p.shape:
                raise LimitError(self.name, f"params.{p.name}", "wrong shape", tuple(arr.shape), f"{p.shape}")
            _check_values(self.name, f"params.{p.name}", arr, p.low, p.high, p.unit)
            out[p.name] = arr
        return out

    # -- serialisation (JSON-safe, used by servers, snapshots and twin metadata) --

    def to_dict(self) -> dict[str, Any]:
        def port(p: Port) -> dict[str, Any]:
            return {"size": p.size, "low": _json_float(p.low), "high": _json_float(p.high),
                    "unit": p.unit, "doc": p.doc}

        return {
            "name": self.name,
            "input": port(self.input),
            "output": port(self.output),
            "params": [
                {"name": p.name, "shape": list(p.shape), "low": p.low, "high": p.high,
                 "unit": p.unit, "init": p.init, "doc": p.doc}
                for p in self.params
            ],
            "max_batch": self.max_batch,
            "timing": None if self.timing is None else self.timing.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceSpec:
        def port(p: Mapping[str, Any]) -> Port:
            return Port(size=int(p["size"]), low=_from_json_float(p["low"]), high=_from_json_float(p["high"]),
                        unit=p.get("unit", ""), doc=p.get("doc", ""))

        return cls(
            name=d["name"],
            input=port(d["input"]),
            output=port(d["output"]),
            params=tuple(
                ParamSpec(name=p["name"], shape=tuple(p["shape"]), low=float(p["low"]), high=float(p["high"]),
                          unit=p.get("unit", ""), init=p.get("init"), doc=p.get("doc", ""))
                for p in d.get("params", [])
            ),
            max_batch=int(d.get("max_batch", 1_000_000)),
            timing=_timing_from(d.get("timing")),
        )


def _timing_from(t: Any) -> Timing | None:
    if t is None:
        return None
    if not isinstance(t, Mapping) or not set(t) <= {"call_s", "sample_s"}:
        raise ValueError(f"DeviceSpec timing: must be a mapping with call_s and sample_s (seconds), got {t!r}")
    return Timing(**{k: (float(v) if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in t.items()})


def _json_float(v: float) -> float | str:
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _from_json_float(v: float | str) -> float:
    return float(v)


def _as_float_array(device: str, fieldname: str, x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensors, without importing torch here
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise LimitError(device, fieldname, f"not an array ({exc})", type(x).__name__) from None
    if arr.dtype.kind not in "fiub":
        raise LimitError(device, fieldname, "wrong dtype", str(arr.dtype), "real numbers (float or int)")
    return arr.astype(np.float64, copy=False)

"""The device protocol a user implements to bring their own physical system.

A device is one small class::

    class MyDevice(Device):
        spec = DeviceSpec(
            name="my_amp",
            input=Port(size=8, low=0.0, high=1.0, unit="V"),
            output=Port(size=8, unit="V"),
            params=(ParamSpec("gain", shape=(8,), low=0.0, high=2.0, unit="V/V"),),
        )

        def measure(self, x, params):          # batched numpy, already validated
            return np.tanh(params["gain"] * x)

        def model(self):                        # optional: differentiable physics
            return MyPhysicsModel()

The engine only ever calls :meth:`Device.forward` and :meth:`Device.set_params`;
both validate against ``spec`` before :meth:`measure` runs, so a user's
``measure`` never sees an out-of-range, non-finite or mis-shaped value.
Constructors do no I/O; :meth:`connect` does (an actor calls it in its own
process, on the node that has the instrument).

A device whose spec lives at the other end of its connection (a device
server, an instrument that publishes it) says so with ``spec_on_connect =
True``: it may be constructed without a spec, its :meth:`open` calls
:meth:`learn_spec`, and until then ``spec`` and ``params`` raise a
:class:`DeviceError` saying to connect first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from pnn_cluster.devices.spec import DeviceSpec, LimitError

__all__ = ["Device", "DeviceError"]


class DeviceError(RuntimeError):
    """The device itself failed (lost connection, instrument error), as opposed to a refused value."""


class Device:
    """Base class of every physical device, simulated or real.

    ``spec`` is a class attribute of most devices, or given to the
    constructor; a class with ``spec_on_connect = True`` may leave it to
    :meth:`open`, which calls :meth:`learn_spec`.
    """

    #: True when the device may be constructed without a spec and learns it in open()
    spec_on_connect: ClassVar[bool] = False

    def __init__(self, spec: DeviceSpec | None = None) -> None:
        if spec is not None:
            if not isinstance(spec, DeviceSpec):
                raise TypeError(f"{type(self).__name__}: spec must be a DeviceSpec, got {type(spec).__name__}")
            self.spec = spec
        self._lock = threading.Lock()
        self.connected = False
        self.stats = {"calls": 0, "samples": 0, "param_writes": 0, "rejected": 0, "busy_s": 0.0}
        self._params: dict[str, np.ndarray] | None = None
        if self.spec_known:
            self._params = self.spec.initial_params()
        elif not self.spec_on_connect:
            raise TypeError(f"{type(self).__name__} must define a DeviceSpec as `spec` (or pass spec=, or set "
                            "spec_on_connect = True and call learn_spec() in open())")

    # -- the spec ---------------------------------------------------------------------------------
    # A class attribute ``spec`` of a subclass, or one set on the instance, takes the place of this
    # property; only a device that has none yet reaches it.

    @property
    def spec(self) -> DeviceSpec:
        spec = getattr(self, "_spec", None)
        if spec is None:
            raise DeviceError(f"{self!r}: spec is learnt on connect(); call connect() first or pass spec=")
        return spec

    @spec.setter
    def spec(self, spec: DeviceSpec) -> None:
        self._spec = spec

    @property
    def spec_known(self) -> bool:
        """False only for a device that learns its spec on connect and has not connected yet."""
        try:
            return isinstance(self.spec, DeviceSpec)
        except DeviceError:
            return False

    def learn_spec(self, spec: DeviceSpec, params: Mapping[str, Any] | None = None) -> None:
        """Adopt the spec the other end reports, and its current ``params`` (else the spec's initial ones).

        For :meth:`open` of a ``spec_on_connect`` device. A spec already known
        must be the same one: a mis-wired endpoint fails at connect, not
        mid-training.
        """
        if self.spec_known:
            if spec.to_dict() != self.spec.to_dict():
                raise DeviceError(f"{self!r}: the device reports a spec that differs from the one given: "
                                  f"device has {spec.to_dict()}, given {self.spec.to_dict()}")
            return
        checked = spec.initial_params() if params is None else spec.check_params(params)
        self.spec = spec
        self._params = {k: np.array(v, dtype=np.float64) for k, v in checked.items()}

    def __repr__(self) -> str:
        # looked up without the ``spec`` property, whose error message is made of this repr
        spec = getattr(self, "_spec", None) or vars(self).get("spec") or getattr(type(self), "spec", None)
        name = spec.name if isinstance(spec, DeviceSpec) else "spec learnt on connect"
        return f"{type(self).__name__}({name})"

    # -- what a user implements ---------------------------------------------------

    def measure(self, x: np.ndarray, params: Mapping[str, np.ndarray]) -> np.ndarray:
        """Run one batch on the hardware: ``x`` is (batch, input.size), validated."""
        raise NotImplementedError

    def model(self):
        """Optional differentiable model of this device (a :class:`PhysicsModel`), or None."""
        return None

    def open(self) -> None:
        """Open the connection to the instrument (override for real hardware)."""

    def shutdown(self) -> None:
        """Release the instrument (override for real hardware)."""

    def write_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Push validated parameters to hardware (override when the hardware holds them)."""

    def noise_stream(self, purpose: str) -> None:
        """Draw the measurement noise from here on from a stream of its own for ``purpose`` ("calibration",
        "init", "training", "test"); a purpose taken up again continues its stream. A simulation seeds each
        from its seed and the purpose, so that methods compared on one device copy see the same noise in
        training whatever each spent on calibration or on checks between steps; real hardware has the
        noise it has (this does nothing)."""

    def identity(self) -> dict[str, Any]:
        """Who this device is: driver, resource, serial, calibration. Logged with every run."""
        return {"driver": type(self).__module__ + "." + type(self).__qualname__}

    # -- what the engine calls ------------------------------------------------------

    def connect(self) -> Device:
        if not self.connected:
            self.open()
            if not self.spec_known:
                self.shutdown()
                raise DeviceError(f"{self!r}: open() did not learn the spec; a spec_on_connect device calls "
                                  "learn_spec() in open()")
            self.connected = True
        return self

    def close(self) -> None:
        if self.connected:
            self.shutdown()
            self.connected = False

    def __enter__(self) -> Device:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._known_params().items()}

    def _known_params(self) -> dict[str, np.ndarray]:
        if self._params is None:
            raise DeviceError(f"{self!r}: parameters are learnt with the spec on connect(); call connect() first")
        return self._params

    def checked_input(self, x: Any) -> np.ndarray:
        """``x`` validated against the spec; a refusal is counted (health reports it) and raised."""
        try:
            return self.spec.check_input(x)
        except LimitError:
            self.stats["rejected"] += 1
            raise

    def checked_params(self, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """A (partial) parameter mapping validated against the spec; a refusal is counted and raised."""
        try:
            return self.spec.check_params(params, partial=True)
        except LimitError:
            self.stats["rejected"] += 1
            raise

    def set_params(self, params: Mapping[str, Any]) -> None:
        """Validate and write parameters; a partial mapping updates only the named ones."""
        checked = self.checked_params(params)
        with self._lock:
            merged = {**self._known_params(), **checked}
            self.write_params(merged)
            self._params = merged
            self.stats["param_writes"] += 1

    def forward(self, x: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        """Measure a batch. Parameters, when given, are validated and written first."""
        if not self.connected and not self.spec_known:
            self.connect()  # learns the spec that x is checked against
        xa = self.checked_input(x)
        if params is not None:
            self.set_params(params)
        if not self.connected:
            self.connect()
        with self._lock:
            t0 = time.perf_counter()
            y = np.asarray(self.measure(xa, self._known_params()), dtype=np.float64)
            self.stats["busy_s"] += time.perf_counter() - t0
            self.stats["calls"] += 1
            self.stats["samples"] += xa.shape[0]
        if y.shape != (xa.shape[0], self.spec.output.size):
            raise DeviceError(
                f"{self.spec.name}: measure returned shape {y.shape}, spec says "
                f"({xa.shape[0]}, {self.spec.output.size})"
            )
        return y

    def health(self) -> dict[str, Any]:
        name = self.spec.name if self.spec_known else repr(self)
        return {"name": name, "connected": self.connected, **self.stats}

    def snapshot(self) -> dict[str, Any]:
        """A JSON-safe description of the device: spec, limits, identity and current parameters."""
        return {
            "spec": self.spec.to_dict(),
            "identity": self.identity(),
            "params": {k: v.tolist() for k, v in self._known_params().items()},
            "stats": dict(self.stats),
        }

"""How the micro-batch schedule reaches devices and twins: handles that start calls, a backend that waits on them.

The schedule (:mod:`pnn_cluster.training.schedule`) and the twin watch
(:mod:`pnn_cluster.training.recalibration`) never look at what a pending call
is: a :class:`DeviceHandle` or :class:`TwinHandle` starts one and returns it,
and the :class:`Backend` that goes with those handles says whether it is done
(:meth:`Backend.done`), waits for it (:meth:`Backend.wait`) and gives its
reply (:meth:`Backend.result`). Here is the in-process implementation: each
device and twin on its own thread, pending calls are
``concurrent.futures.Future`` s (:class:`ThreadBackend`,
:class:`LocalDeviceHandle`, :class:`LocalTwinHandle`); ``actors.RayBackend``
is the one over device and twin actors, whose pending calls are ObjectRefs.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from torch import nn

from pnn_cluster.devices.base import Device
from pnn_cluster.layers import PhysicalLayer
from pnn_cluster.training.faults import is_device_failure
from pnn_cluster.training.workers import DeviceWorker

__all__ = ["CallTimeout", "DeviceHandle", "Backend", "LocalDeviceHandle", "ThreadBackend", "TwinHandle",
           "LocalTwinHandle"]


class CallTimeout(TimeoutError):
    """A device or twin call took longer than its ``timeout_s``; counted as a device failure."""


class DeviceHandle(Protocol):
    """One replica device as the schedule sees it."""

    name: str

    def submit(self, x: np.ndarray, params: Mapping[str, np.ndarray] | None, version: str) -> Any:
        """Start a forward; returns a pending call for :meth:`Backend.wait` (never blocks on the device)."""

    def true_model(self) -> nn.Module:
        """The simulator's exact physics, for mode 'oracle'."""


class Backend(Protocol):
    """Where the calls of its handles run: it waits on them (device forwards, twin VJPs and refinements alike)
    and makes the handles of devices."""

    def done(self, call: Any) -> bool:
        """Whether a call has finished (never blocks)."""

    def wait(self, calls: Sequence[Any], timeout: float | None = None) -> list[Any]:
        """Block until at least one call has finished, or ``timeout`` seconds; return the finished ones."""

    def result(self, call: Any) -> np.ndarray | None:
        """The reply of a finished call (raises what the device raised); of an unfinished one, once it is."""

    def is_device_failure(self, exc: BaseException) -> bool:
        """True when a retry (on a restarted or another device) may succeed."""

    def handle_for(self, device: Any, name: str) -> DeviceHandle:
        """The handle of a device given as a :class:`~pnn_cluster.devices.base.Device` (or proxy)."""

    def default_handle(self, layer: PhysicalLayer) -> DeviceHandle:
        """The handle of a layer's own device, when no pool was configured for it."""


class LocalDeviceHandle:
    """A device in this process, measured on its own thread (the device serialises its calls)."""

    def __init__(self, device: Device | DeviceWorker, name: str | None = None) -> None:
        self.worker = device if isinstance(device, DeviceWorker) else DeviceWorker(device)
        self.name = name or self.worker.name
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"device-{self.name}")

    def submit(self, x: np.ndarray, params: Mapping[str, np.ndarray] | None, version: str) -> Any:
        return self._thread.submit(self.worker.forward, x, params, version)

    def true_model(self) -> nn.Module:
        return self.worker.true_model()

    def close(self) -> None:
        self._thread.shutdown(wait=True)


class ThreadBackend:
    """Pending calls are ``concurrent.futures.Future`` s."""

    def __init__(self) -> None:
        self._handles: dict[int, tuple[Any, LocalDeviceHandle]] = {}

    def done(self, call: Any) -> bool:
        return call.done()

    def wait(self, calls: Sequence[Any], timeout: float | None = None) -> list[Any]:
        done, _ = concurrent.futures.wait(calls, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        # in the order they were sent, not a set's: the next stage then sees micro-batches in a fixed order
        return [c for c in calls if c in done]

    def result(self, call: Any) -> np.ndarray | None:
        return call.result()

    def is_device_failure(self, exc: BaseException) -> bool:
        return is_device_failure(exc)

    def handle_for(self, device: Any, name: str) -> DeviceHandle:
        # one thread per device, however many pools name it: the device serialises its calls anyway
        known = self._handles.get(id(device))
        if known is None or known[0] is not device:
            known = self._handles[id(device)] = (device, LocalDeviceHandle(device, name=name))
        return known[1]

    def default_handle(self, layer: PhysicalLayer) -> DeviceHandle:
        return self.handle_for(layer.device, layer.name)


class TwinHandle(Protocol):
    """One copy of a twin as the schedule sees it (a twin actor, or a twin worker on a thread)."""

    name: str

    def submit_vjp(self, x: np.ndarray, params: Mapping[str, np.ndarray], grad_y: np.ndarray, need_x: bool,
                   need: Sequence[str] | None, version: str, output: bool = False) -> Any:
        """Start a vector-Jacobian product; a pending call whose result is ``(gx, gp)`` (``(gx, gp, y_twin)``
        with ``output``), or None when this copy does not hold twin state ``version`` (it was restarted)."""

    def submit_refine(self, train: Any, val: Any, **kw: Any) -> Any:
        """Start refining a copy of this twin (:meth:`~pnn_cluster.training.workers.TwinWorker.refine`)
        beside the VJPs; a pending call for :meth:`Backend.wait`."""

    def load(self, payload: Mapping[str, Any]) -> str:
        """Replace this copy's twin state (blocking); returns its version."""

    def fit(self, train: Any, val: Any, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Fit this copy to samples (blocking); returns the fit's figures and the new state."""


class LocalTwinHandle:
    """A :class:`~pnn_cluster.training.workers.TwinWorker` in this process, on its own thread."""

    def __init__(self, worker: Any, name: str = "twin") -> None:
        self.worker = worker
        self.name = name
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"twin-{name}")
        self._refining: concurrent.futures.ThreadPoolExecutor | None = None

    def submit_vjp(self, x, params, grad_y, need_x, need, version, output=False):
        return self._thread.submit(self.worker.vjp, x, params, grad_y, need_x, need, version, output)

    def submit_refine(self, train: Any, val: Any, **kw: Any) -> Any:
        if self._refining is None:  # its own thread: VJPs go on meanwhile
            self._refining = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                   thread_name_prefix=f"refine-{self.name}")
        return self._refining.submit(self.worker.refine, train, val, **kw)

    def load(self, payload: Mapping[str, Any]) -> str:
        return self._thread.submit(self.worker.load, payload).result()

    def fit(self, train: Any, val: Any, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        figures = self._thread.submit(self.worker.fit, train, val, **kw).result()
        return figures, self.worker.payload()

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._refining is not None:
            self._refining.shutdown(wait=True)


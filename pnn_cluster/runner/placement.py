"""Where a run's devices and twins live: an injected placement.

The runner never decides where things run; it asks a :class:`Placement` to
start each device replica and each twin, and gets back what it needs of them:

- a :class:`DeviceRef`: the device as an ordinary
  :class:`~pnn_cluster.devices.base.Device` (for calibration, initialisation,
  evaluation and the run's device snapshot), a pipeline handle (for training),
  and a ``collect`` that measures calibration samples next to the device;
- a :class:`~pnn_cluster.training.pipeline.TwinPool` of twin copies that take
  the backward passes of that replica, or None to differentiate with the twin
  in this process.

:class:`InProcessPlacement` (here) keeps everything in this process: each
device on its own thread, twins in this process. ``actors.RayPlacement`` puts
every device replica in its own device actor on the node that declared its
instrument, and twins in twin actors. Only the command line knows both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from pnn_cluster.devices.base import Device
from pnn_cluster.runner.build import DeviceRecipe
from pnn_cluster.training.pipeline import Backend, DeviceHandle, LocalDeviceHandle, ThreadBackend, TwinPool
from pnn_cluster.training.workers import DeviceWorker

__all__ = ["DeviceRef", "Placement", "InProcessPlacement"]


@dataclass(eq=False)
class DeviceRef:
    """One started device replica, as the runner holds it."""

    recipe: DeviceRecipe
    device: Device
    handle: DeviceHandle
    collect: Callable[..., Any]
    node: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.recipe.label


class Placement(Protocol):
    #: "in-process" or "ray"
    kind: str
    backend: Backend
    #: micro-batches per batch when the configuration gives no size (None: planned from the devices'
    #: declared timings, see PipelineConfig.micro_batches)
    micro_batches: int | None
    #: the same where a device declares no timing (None: enough to fill the pipeline)
    untimed_micro_batches: int | None

    def start_devices(self, recipes: Sequence[DeviceRecipe], twins: bool = False) -> list[DeviceRef]:
        """Start (build and connect) every replica; the spec of each is known when this returns.
        ``twins``: the replicas will need twins elsewhere (start what they need meanwhile)."""

    def start_twins(self, twin: nn.Module, recipe: DeviceRecipe) -> TwinPool | None:
        """Twin copies for one replica (``recipe.placement.twins``), or None to use ``twin`` here."""

    def counts(self) -> dict[str, Any]:
        """``device_actors``, ``twin_actors`` and ``trainer_actor``, as a run reports them, and optionally
        ``instrument_waits`` (seconds each device, by label, waited for an instrument another run held)."""

    def close(self) -> None:
        """Stop what was started (device connections are closed by their owners)."""


class InProcessPlacement:
    """Everything in this process: one thread per device replica, twins next to the trainer."""

    kind = "in-process"
    #: cut as a Ray placement cuts (planned from the devices' declared timings with the same call overhead),
    #: so a seed gives the same run in process and on Ray; devices run on threads of their own, so slow
    #: instruments overlap as actors do
    micro_batches = None
    #: a device that declares no timing: the batch whole (in one interpreter the fill's extra calls cost
    #: more than they overlap: the hybrid stack trained twice as fast whole)
    untimed_micro_batches = 1

    def __init__(self) -> None:
        self.backend = ThreadBackend()
        self._workers: list[DeviceWorker] = []
        self._handles: list[LocalDeviceHandle] = []

    def start_devices(self, recipes: Sequence[DeviceRecipe], twins: bool = False) -> list[DeviceRef]:
        refs = []
        for recipe in recipes:
            worker = DeviceWorker(recipe)
            self._workers.append(worker)
            handle = LocalDeviceHandle(worker, name=recipe.label)
            self._handles.append(handle)
            refs.append(DeviceRef(recipe, worker.device, handle, worker.collect))
        return refs

    def start_twins(self, twin: nn.Module, recipe: DeviceRecipe) -> TwinPool | None:
        return None

    def counts(self) -> dict[str, Any]:
        return {"device_actors": 0, "twin_actors": 0, "trainer_actor": False}

    def close(self) -> None:
        for h in self._handles:
            h.close()
        for w in self._workers:
            w.close()
        self._handles.clear()
        self._workers.clear()

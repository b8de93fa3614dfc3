"""DeviceActor: a device in its own process, on the node that has its instrument."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from actors.cluster import instrument_resource
from pnn_cluster.devices.base import Device
from pnn_cluster.training.workers import DeviceConfig, DeviceWorker, params_version

__all__ = ["RestartPolicy", "DeviceActor", "start_device", "RemoteDevice", "RayDeviceHandle"]


@dataclass(frozen=True)
class RestartPolicy:
    """Ray's restart options for a device actor.

    max_restarts: how often Ray rebuilds a dead device actor (it reconnects the
        instrument in its constructor); -1 for always.
    max_task_retries: how often Ray resends a call that was in flight when the
        actor died, once it is back (-1: until max_restarts is spent). A
        measurement may be repeated, so at-least-once is right here; the
        parameters travel with the retried call or are asked for again.
    """

    max_restarts: int = 3
    max_task_retries: int = -1

    def __post_init__(self) -> None:
        for name in ("max_restarts", "max_task_retries"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < -1:
                raise ValueError(f"RestartPolicy.{name}: must be an integer >= -1 (-1: unlimited), got {v!r}")


class _DeviceActor(DeviceWorker):
    def __init__(self, config: DeviceConfig) -> None:
        # device simulations are small tensors; more threads only contend with the other actors on the node
        torch.set_num_threads(1)
        super().__init__(config)

    def health(self) -> dict[str, Any]:
        return {**super().health(), "node_id": ray.get_runtime_context().get_node_id()}


DeviceActor = ray.remote(_DeviceActor)


def start_device(config: DeviceConfig, restart: RestartPolicy | None = None, name: str | None = None,
                 num_cpus: float = 0, **options: Any):
    """Start the device actor for ``config``, on the node that declared its instrument (if any).

    It asks for no CPU by default: it spends its time waiting on hardware, and
    a CPU held per instrument would cap how many instruments a lab PC can serve.
    """
    if not isinstance(config, DeviceConfig):
        raise TypeError(f"start_device: config must be a DeviceConfig, got {type(config).__name__}")
    restart = restart or RestartPolicy()
    # two calls in the actor at once: one's arguments and reply travel while the other is measured
    # (the worker serialises access to the device itself)
    opts: dict[str, Any] = {"num_cpus": num_cpus, "max_restarts": restart.max_restarts,
                            "max_task_retries": restart.max_task_retries, "max_concurrency": 2}
    if config.instrument is not None:
        opts["resources"] = {**options.pop("resources", {}), **instrument_resource(config.instrument)}
    if name is not None:
        opts["name"] = name
    opts.update(options)
    return DeviceActor.options(**opts).remote(config)


class RayDeviceHandle:
    """The pipeline's view of a device actor: a forward returns an ObjectRef.

    Each call carries a ticket (this handle's stream, a sequence number, and
    the previous call if it is still on its way): the actor takes two calls at
    a time, and the ticket makes it measure them in the order they were sent.
    """

    def __init__(self, actor, name: str = "") -> None:
        self.actor = actor
        self.name = name or "device-actor"
        self._stream = uuid.uuid4().hex[:12]
        self._seq = itertools.count(1)
        self._last: tuple[int, Any] | None = None

    def submit(self, x: np.ndarray, params: Mapping[str, np.ndarray] | None, version: str):
        after = 0
        if self._last is not None:
            done, _ = ray.wait([self._last[1]], timeout=0)  # a local lookup: this process owns the reply
            after = 0 if done else self._last[0]
        seq = next(self._seq)
        ref = self.actor.forward.remote(x, params, version, (self._stream, seq, after))
        self._last = (seq, ref)
        return ref

    def true_model(self):
        return ray.get(self.actor.true_model.remote())


class RemoteDevice(Device):
    """A device actor seen through the ordinary :class:`Device` interface, one round trip per call.

    Calibration, data-dependent initialisation and anything else written for
    in-process devices works through it unchanged; training goes through the
    pipeline (:class:`RayDeviceHandle`) instead, which does not wait per call.
    """

    def __init__(self, actor, spec=None, name: str | None = None) -> None:
        self.actor = actor
        super().__init__(spec if spec is not None else ray.get(actor.spec.remote()))
        self.name = name or self.spec.name
        self.connected = True
        self._written: str | None = None

    def __reduce__(self):
        # the lock and counters are per process; the actor handle is what identifies the device
        return (RemoteDevice, (self.actor, self.spec, self.name))

    def handle(self) -> RayDeviceHandle:
        return RayDeviceHandle(self.actor, self.name)

    def set_params(self, params: Mapping[str, Any]) -> None:
        checked = self.checked_params(params)
        merged = {**self._params, **checked}
        ray.get(self.actor.set_params.remote(merged))
        self._params = merged
        self._written = params_version(merged)
        self.stats["param_writes"] += 1

    def forward(self, x: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        xa = self.checked_input(x)
        if params is not None:
            self.set_params(params)
        y = ray.get(self.actor.forward.remote(xa, None, self._written))
        if y is None:  # the actor restarted, or someone else wrote other parameters: ours go with the call
            y = ray.get(self.actor.forward.remote(xa, self._params, None))
        self.stats["calls"] += 1
        self.stats["samples"] += xa.shape[0]
        # a reply read zero-copy is read-only; callers (torch.from_numpy) expect to own it, as from a local device
        return y if y.flags.writeable else y.copy()

    def model(self):
        return ray.get(self.actor.model.remote())

    def true_model(self):
        return ray.get(self.actor.true_model.remote())

    def identity(self) -> dict[str, Any]:
        return ray.get(self.actor.identity.remote())

    def health(self) -> dict[str, Any]:
        return ray.get(self.actor.health.remote())

"""DeviceActor: a device in its own process, on the node that has its instrument.

:class:`ActorDevice` is its proxy with the ordinary Device interface (one
round trip per call, each bounded by the device's ``timeout_s``);
:class:`RayDeviceHandle` is the pipeline's view of it.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray import exceptions as rex

from actors.leases import lease_board
from pnn_cluster.devices.base import Device, DeviceError
from pnn_cluster.runner.build import DeviceRecipe
from pnn_cluster.training.workers import DeviceWorker, params_version

__all__ = ["RestartPolicy", "DeviceActor", "start_device", "ActorDevice", "RayDeviceHandle"]


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
    def __init__(self, recipe: DeviceRecipe, lease: Mapping[str, Any] | None = None) -> None:
        # device simulations are small tensors; more threads only contend with the other actors on the node
        torch.set_num_threads(1)
        if lease is not None:
            # the instrument's unit is this actor's from the moment it runs: say so before connecting, so a
            # run that waits for it can tell its submitter who holds it (a restart takes it anew)
            ctx = ray.get_runtime_context()
            lease_board().take.remote({**lease, "job": ctx.get_job_id(), "node": ctx.get_node_id(),
                                       "since": time.time(), "released": None})
        super().__init__(recipe)  # builds and connects here, on the node that has the instrument

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def health(self) -> dict[str, Any]:
        return {**super().health(), "node_id": self.node_id()}


DeviceActor = ray.remote(_DeviceActor)


def start_device(recipe: DeviceRecipe, restart: RestartPolicy | None = None, name: str | None = None,
                 num_cpus: float = 0, lease: Mapping[str, Any] | None = None, **options: Any):
    """Start the device actor for ``recipe``, on the node that declared its instrument (if any).

    The recipe's placement adds node labels (``label_selector``) and further
    resources. It asks for no CPU by default: it spends its time waiting on
    hardware, and a CPU held per instrument would cap how many instruments a
    lab PC can serve. ``lease``: the ``instrument``, ``run``, ``device`` and
    ``token`` of the :class:`~pnn_cluster.runner.leases.Lease` it records on the
    cluster's lease board (:mod:`actors.leases`) once it holds its instrument.
    """
    if not isinstance(recipe, DeviceRecipe):
        raise TypeError(f"start_device: recipe must be a DeviceRecipe, got {type(recipe).__name__}")
    restart = restart or RestartPolicy()
    place = recipe.placement
    # two calls in the actor at once: one's arguments and reply travel while the other is measured
    # (the worker serialises access to the device itself)
    opts: dict[str, Any] = {"num_cpus": num_cpus, "max_restarts": restart.max_restarts,
                            "max_task_retries": restart.max_task_retries, "max_concurrency": 2}
    resources = {**place.ray_resources(), **options.pop("resources", {})}
    if resources:
        opts["resources"] = resources
    if place.labels:
        opts["label_selector"] = dict(place.labels)  # nodes that joined with `ray start --labels`
    if name is not None:
        opts["name"] = name
    opts.update(options)
    return DeviceActor.options(**opts).remote(recipe, lease)


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
        self._replied: set[Any] = set()

    def completed(self, ref) -> None:
        """The schedule took this call's reply (so a later call need not wait for it in the actor)."""
        if self._last is not None and ref is self._last[1]:
            self._replied.add(ref)

    def submit(self, x: np.ndarray, params: Mapping[str, np.ndarray] | None, version: str):
        after = 0
        if self._last is not None and self._last[1] not in self._replied:
            # asked here, not with ray.wait: a lookup per call costs as much as the call's own bookkeeping
            after = self._last[0]
        seq = next(self._seq)
        ref = self.actor.forward_packed.remote((x, params, version, (self._stream, seq, after)))
        self._last = (seq, ref)
        self._replied.clear()
        return ref

    def true_model(self):
        return ray.get(self.actor.true_model.remote())


class ActorDevice(Device):
    """A device actor seen through the ordinary :class:`Device` interface, one round trip per call.

    Calibration, data-dependent initialisation and anything else written for
    in-process devices works through it unchanged; training goes through the
    pipeline (:class:`RayDeviceHandle`) instead, which does not wait per call.
    Every call waits at most ``timeout_s``: a hung instrument ends in a
    :class:`~pnn_cluster.devices.base.DeviceError` naming it, never a wait without end.
    """

    def __init__(self, actor, spec=None, name: str | None = None, timeout_s: float | None = 60.0,
                 connect_timeout_s: float = 300.0) -> None:
        self.actor = actor
        self.timeout_s = timeout_s
        if spec is None:
            # the spec is known once the actor has started and connected its instrument: that takes a
            # process start, not one call
            try:
                spec = ray.get(actor.spec.remote(), timeout=connect_timeout_s)
            except rex.GetTimeoutError:
                raise DeviceError(f"device {name or 'actor'}: not connected after {connect_timeout_s:g} s") from None
        super().__init__(spec)
        self.name = name or self.spec.name
        self.connected = True
        self._written: str | None = None

    def __reduce__(self):
        # the lock and counters are per process; the actor handle is what identifies the device
        return (ActorDevice, (self.actor, self.spec, self.name, self.timeout_s))

    def _get(self, ref, what: str, scale: float = 1.0):
        timeout = None if self.timeout_s is None else self.timeout_s * scale
        try:
            return ray.get(ref, timeout=timeout)
        except rex.GetTimeoutError:
            ray.cancel(ref)
            raise DeviceError(f"device {self.name}: {what} got no reply within {timeout:g} s "
                              "(devices.NAME.timeout_s); is the instrument hung?") from None

    def handle(self) -> RayDeviceHandle:
        return RayDeviceHandle(self.actor, self.name)

    def set_params(self, params: Mapping[str, Any]) -> None:
        checked = self.checked_params(params)
        merged = {**self._params, **checked}
        self._get(self.actor.set_params.remote(merged), "a parameter write")
        self._params = merged
        self._written = params_version(merged)
        self.stats["param_writes"] += 1

    def forward(self, x: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        xa = self.checked_input(x)
        if params is not None:
            self.set_params(params)
        y = self._get(self.actor.forward.remote(xa, None, self._written), "a measurement")
        if y is None:  # the actor restarted, or someone else wrote other parameters: ours go with the call
            y = self._get(self.actor.forward.remote(xa, self._params, None), "a measurement")
        self.stats["calls"] += 1
        self.stats["samples"] += xa.shape[0]
        # a reply read zero-copy is read-only; callers (torch.from_numpy) expect to own it, as from a local device
        return y if y.flags.writeable else y.copy()

    def collect(self, **kw: Any):
        """Calibration samples measured in the actor (one round trip for all of them)."""
        calls = kw.get("groups", 40) * kw.get("repeats", 2) + kw.get("groups", 40)
        return self._get(self.actor.collect.remote(**kw), "calibration", scale=max(1, calls))

    def model(self):
        return self._get(self.actor.model.remote(), "model()")

    def noise_stream(self, purpose: str) -> None:
        self._get(self.actor.noise_stream.remote(purpose), "noise_stream()")

    def true_model(self):
        return self._get(self.actor.true_model.remote(), "true_model()")

    def identity(self) -> dict[str, Any]:
        return self._get(self.actor.identity.remote(), "identity()")

    def health(self) -> dict[str, Any]:
        return self._get(self.actor.health.remote(), "health()")

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "identity": self.identity()}

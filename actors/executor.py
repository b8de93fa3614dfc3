"""RayExecutor: the micro-batch pipeline over device actors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
from ray import exceptions as rex

from actors.device import ActorDevice, RayDeviceHandle
from pnn_cluster.devices.spec import LimitError
from pnn_cluster.layers import PhysicalLayer
from pnn_cluster.training.faults import FaultPolicy, is_device_failure
from pnn_cluster.training.pipeline import PipelineConfig, PipelineExecutor, Replica

__all__ = ["RayBackend", "RayExecutor"]

#: the actor (or its node, or the object holding its reply) went away; Ray restarts it or it is gone for good
_LOST = tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                        "WorkerCrashedError", "ObjectLostError", "OwnerDiedError",
                                        "NodeDiedError") if hasattr(rex, n))


class RayBackend:
    """Pending calls are ObjectRefs; one ``ray.wait`` covers every stage's calls at once."""

    def done(self, call: Any) -> bool:
        ready, _ = ray.wait([call], num_returns=1, timeout=0)
        return bool(ready)

    def wait(self, calls: Sequence[Any], timeout: float | None = None) -> list[Any]:
        calls = list(calls)
        # every reply already here, in one look; only when there is none, block for the first
        ready, _ = ray.wait(calls, num_returns=len(calls), timeout=0)
        if not ready:
            ready, _ = ray.wait(calls, num_returns=1, timeout=timeout)
        return ready

    def result(self, call: Any) -> np.ndarray | None:
        try:
            return ray.get(call)
        except rex.RayTaskError as exc:
            # the device's own error (DeviceError, LimitError...), with the remote traceback chained to it
            if isinstance(exc.cause, Exception):
                raise exc.cause from exc
            raise

    def is_device_failure(self, exc: BaseException) -> bool:
        if isinstance(exc, LimitError):  # a RayTaskError raised by a refusal is a LimitError too
            return False
        return isinstance(exc, _LOST) or is_device_failure(exc)

    def handle_for(self, device: Any, name: str) -> RayDeviceHandle:
        if isinstance(device, ActorDevice):
            return RayDeviceHandle(device.actor, name)
        if isinstance(device, RayDeviceHandle):
            return device
        raise TypeError(
            f"RayExecutor: device {name!r} ({type(device).__name__}) lives in this process; start it as a "
            "device actor (actors.start_device) and give its layer an ActorDevice, or use the in-process executor"
        )

    def default_handle(self, layer: PhysicalLayer) -> RayDeviceHandle:
        return self.handle_for(layer.device, layer.name)


class RayExecutor(PipelineExecutor):
    """The Trainer's executor on a Ray cluster: micro-batches pipelined over device actors.

    A physical layer's own device must be an :class:`ActorDevice`; ``pools``
    adds replicas (``{layer name: [Replica(RayDeviceHandle(actor), twin=...), ...]}``).
    """

    def __init__(self, pools: Mapping[str, Sequence[Replica]] | None = None, config: PipelineConfig | None = None,
                 policy: FaultPolicy | None = None) -> None:
        super().__init__(RayBackend(), pools=pools, config=config, policy=policy)

"""RayPlacement: every device replica in its own device actor, on its instrument's node; twins in twin actors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import ray
from torch import nn

from actors.device import ActorDevice, RayDeviceHandle, RestartPolicy, start_device
from actors.executor import RayBackend
from actors.twin import RayTwinHandle, start_twin
from pnn_cluster.devices.base import DeviceError
from pnn_cluster.runner.build import DeviceRecipe
from pnn_cluster.runner.placement import DeviceRef
from pnn_cluster.training.pipeline import TwinPool
from pnn_cluster.training.workers import twin_payload
from pnn_cluster.twins.versions import twin_digest

__all__ = ["RayPlacement"]


class RayPlacement:
    """The runner's placement on a Ray cluster (this process must be connected to it).

    Device actors are started all at once and connect in parallel, each on the
    node that declared its instrument; the spec of a device that learns it on
    connect is read from the actor after it connected. Each replica gets
    ``placement.twins.actors`` twin actors with the CPUs and GPUs asked for.
    """

    kind = "ray"
    micro_batches = None  # just enough micro-batches to keep every device actor busy

    def __init__(self, restart: RestartPolicy | None = None, connect_timeout_s: float = 300.0) -> None:
        self.backend = RayBackend()
        self.restart = restart
        self.connect_timeout_s = connect_timeout_s
        self._devices: list[Any] = []
        self._twins: list[Any] = []
        self._blank: dict[str, list[Any]] = {}

    def start_devices(self, recipes: Sequence[DeviceRecipe], twins: bool = False) -> list[DeviceRef]:
        declared = ray.cluster_resources()
        for r in recipes:
            missing = [k for k in r.placement.ray_resources() if k not in declared]
            if missing:  # a lab's instruments do not come and go: say so now rather than wait for a node
                wanted = json.dumps({k: 1 for k in missing})
                raise DeviceError(f"device {r.label}: no node of the cluster declared {', '.join(missing)}; the PC "
                                  f"that has it joins with `ray start --address HEAD:6379 --resources '{wanted}'` "
                                  f"(or drop devices.{r.name}.placement to run it anywhere)")
        actors = [start_device(r, self.restart) for r in recipes]
        self._devices += actors
        if twins:
            # the twin actors' processes start now, while the devices connect; each gets its twin later
            for r in recipes:
                tp = r.placement.twins
                blank = [start_twin(None, num_cpus=tp.num_cpus, num_gpus=tp.num_gpus) for _ in range(tp.actors)]
                self._blank[r.label] = blank
                self._twins += blank
        # the constructor connects; asking for the spec waits for that, on every device at once
        specs = [a.spec.remote() for a in actors]
        nodes = [a.node_id.remote() for a in actors]
        ready, waiting = ray.wait(specs, num_returns=len(specs), timeout=self.connect_timeout_s)
        if waiting:
            late = [r.label for r, ref in zip(recipes, specs) if ref in waiting]
            wanted = {r.label: r.placement.ray_resources() for r, ref in zip(recipes, specs) if ref in waiting}
            raise DeviceError(f"device actor(s) {', '.join(late)} not connected after {self.connect_timeout_s:g} s; "
                              f"is a node with {wanted} in the cluster (`ray status`), and its instrument on?")
        refs = []
        for recipe, actor, spec, node in zip(recipes, actors, ray.get(specs), ray.get(nodes)):
            device = ActorDevice(actor, spec, name=recipe.label, timeout_s=recipe.timeout_s)
            refs.append(DeviceRef(recipe, device, RayDeviceHandle(actor, recipe.label), device.collect, node=node))
        return refs

    def start_twins(self, twin: nn.Module, recipe: DeviceRecipe) -> TwinPool | None:
        tp = recipe.placement.twins
        payload = twin_payload(twin)
        actors = self._blank.pop(recipe.label, None)
        if actors:
            ray.get([a.load.remote(payload) for a in actors])
        else:
            actors = [start_twin(twin, num_cpus=tp.num_cpus, num_gpus=tp.num_gpus) for _ in range(tp.actors)]
            self._twins += actors
        handles = [RayTwinHandle(a, f"{recipe.label}/twin{j}") for j, a in enumerate(actors)]
        return TwinPool(handles, payload, twin_digest(payload["state"]))

    def counts(self) -> dict[str, Any]:
        in_actor = ray.get_runtime_context().get_actor_id() is not None
        return {"device_actors": len(self._devices), "twin_actors": len(self._twins), "trainer_actor": in_actor}

    def close(self) -> None:
        for a in self._devices + self._twins:
            ray.kill(a, no_restart=True)
        self._devices.clear()
        self._twins.clear()

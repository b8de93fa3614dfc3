"""TwinActor: a copy of a twin in its own process (forward, vector-Jacobian product at measured inputs, fit).

:class:`RayTwinHandle` is the pipeline's view of one: a VJP returns an
ObjectRef the schedule waits on together with the device calls, so the
backward pass of one micro-batch runs while the next is being measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from pnn_cluster.training.workers import TwinWorker, twin_payload

__all__ = ["TwinActor", "start_twin", "RayTwinHandle"]


class _TwinActor(TwinWorker):
    def __init__(self, *args: Any, **kw: Any) -> None:
        torch.set_num_threads(1)
        super().__init__(*args, **kw)

    @ray.method(concurrency_group="refine")
    def refine(self, train: Any, val: Any, **kw: Any) -> dict[str, Any]:
        # its own concurrency group: a refinement of a copy runs while this twin goes on serving VJPs,
        # which stay one at a time in the default group (they and load() share the twin)
        return super().refine(train, val, **kw)


TwinActor = ray.remote(concurrency_groups={"refine": 1})(_TwinActor)


def start_twin(twin: torch.nn.Module | None, num_cpus: float = 0, num_gpus: float = 0, max_restarts: int = 3,
               **options: Any):
    """A twin actor rebuilt from ``twin``'s kind, config and tensors (the module itself is not shipped);
    with ``twin=None`` a blank one, whose process starts now and which gets its twin by ``load``.

    A restart rebuilds it from these arguments, that is as it was first sent;
    the :class:`~pnn_cluster.training.pipeline.TwinPool` that uses it tells by
    the state's version and sends it the latest before asking again.
    """
    opts = {"num_cpus": num_cpus, "max_restarts": max_restarts, "max_task_retries": -1, **options}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    if twin is None:
        return TwinActor.options(**opts).remote()
    p = twin_payload(twin)
    return TwinActor.options(**opts).remote(p["kind"], p["spec"], p["model"], p["config"], p["state"], p["dtype"])


class RayTwinHandle:
    """One twin actor as the schedule sees it."""

    def __init__(self, actor, name: str = "twin") -> None:
        self.actor = actor
        self.name = name

    def submit_vjp(self, x, params: Mapping[str, Any], grad_y, need_x: bool, need: Sequence[str] | None,
                   version: str, output: bool = False):
        return self.actor.vjp_packed.remote((x, dict(params), grad_y, need_x, None if need is None else list(need),
                                             version, output))

    def submit_refine(self, train: Any, val: Any, **kw: Any):
        return self.actor.refine.remote(train, val, **kw)

    def load(self, payload: Mapping[str, Any]) -> str:
        return ray.get(self.actor.load.remote(dict(payload)))

    def fit(self, train: Any, val: Any, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        figures = ray.get(self.actor.fit.remote(train, val, **kw))
        return figures, ray.get(self.actor.payload.remote())

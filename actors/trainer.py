"""TrainerActor: owns the model and the optimizer and runs the loop, next to the device actors.

:func:`run_method_distributed` is what ``pnn-cluster demo`` runs by default:
it starts one device actor per physical layer of the task (the same
simulated copies, seeds and imperfections as the in-process engine), drives
them through a :class:`~actors.executor.RayExecutor` (from this process, or
from a trainer actor), and tears them down afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from actors.cluster import connect
from actors.device import RemoteDevice, RestartPolicy, start_device
from actors.executor import RayExecutor
from pnn_cluster.data import Dataset
from pnn_cluster.training.faults import FaultPolicy
from pnn_cluster.training.pipeline import PipelineConfig
from pnn_cluster.training.workers import DeviceConfig, TrainerWorker

__all__ = ["TrainerActor", "start_trainer", "device_configs", "run_method_distributed"]


class _TrainerActor(TrainerWorker):
    def __init__(self, device_actors: Sequence[Any], replicas: Mapping[str, Sequence[Any]] | None = None,
                 config: PipelineConfig | None = None, policy: FaultPolicy | None = None,
                 checkpoint: str | os.PathLike | None = None, default_dtype: str = "float32",
                 calib_groups: int = 40) -> None:
        torch.set_num_threads(1)
        torch.set_default_dtype(getattr(torch, default_dtype))
        devices = [RemoteDevice(a) for a in device_actors]
        extra = {name: [RemoteDevice(a) for a in actors] for name, actors in (replicas or {}).items()}
        super().__init__(devices, RayExecutor(config=config, policy=policy), checkpoint=checkpoint, replicas=extra,
                         calib_groups=calib_groups)

    def run_method(self, task, method: str, **kw: Any):
        data = kw.get("data")
        if data is not None:
            # arrays that arrived zero-copy are read-only views; the trainer owns its data
            kw["data"] = Dataset(data.name, data.x_train.copy(), data.y_train.copy(), data.x_test.copy(),
                                 data.y_test.copy())
        return super().run_method(task, method, **kw)

    def executor_stats(self) -> dict[str, int]:
        return dict(self.executor.stats)


TrainerActor = ray.remote(_TrainerActor)


def start_trainer(device_actors: Sequence[Any], replicas: Mapping[str, Sequence[Any]] | None = None,
                  config: PipelineConfig | None = None, policy: FaultPolicy | None = None,
                  checkpoint: str | os.PathLike | None = None, num_cpus: float = 1, **options: Any):
    """A trainer actor driving ``device_actors`` (one per physical layer, in order).

    It is not restarted by default: a trainer rebuilt from its constructor
    would start the run over; resume from the checkpoint instead.
    """
    dtype = str(torch.get_default_dtype()).removeprefix("torch.")
    opts = {"num_cpus": num_cpus, "max_restarts": 0, **options}
    return TrainerActor.options(**opts).remote(list(device_actors), replicas, config, policy,
                                               None if checkpoint is None else str(checkpoint), dtype)


def device_configs(task, gap: float | None = None, seed: int = 0) -> list[DeviceConfig]:
    """The task's devices as configs: the same copies the in-process engine builds, to be built in actors."""
    from pnn_cluster.experiments import TASKS, build_devices

    spec = TASKS[task] if isinstance(task, str) else task
    # building simulated devices does no I/O; it is the one place that knows each copy's seed and imperfections
    local = build_devices(spec, gap=gap, seed=seed)
    layers = [ls for ls in spec.layers if ls.kind == "physical"]
    return [DeviceConfig(ls.system, ls.opts, dev.imperfections, name=f"{ls.system}{i}")
            for i, (ls, dev) in enumerate(zip(layers, local))]


def run_method_distributed(task, method: str, address: str | None = None, gap: float | None = None,
                           seed: int = 0, restart: RestartPolicy | None = None,
                           config: PipelineConfig | None = None, policy: FaultPolicy | None = None,
                           in_actor: bool = False, **kw: Any):
    """:func:`~pnn_cluster.experiments.run_method` with every device in its own actor.

    Joins the cluster at ``address`` (or ``RAY_ADDRESS``), else starts a local
    Ray. The loop runs here, where ``callbacks`` and progress bars are, unless
    ``in_actor``: then a trainer actor runs it next to the devices (callbacks
    would have to run in that process, so none may be given).
    """
    if in_actor and kw.get("callbacks"):
        raise ValueError("run_method_distributed: callbacks run in the trainer's process; with in_actor=True "
                         f"pass none (got {len(kw['callbacks'])})")
    connect(address)
    actors = [start_device(c, restart) for c in device_configs(task, gap=gap, seed=seed)]
    try:
        if not in_actor:
            worker = TrainerWorker([RemoteDevice(a) for a in actors], RayExecutor(config=config, policy=policy))
            return worker.run_method(task, method, gap=gap, seed=seed, **kw)
        kw.pop("progress", None)  # bars from another process only garble the driver's output
        kw.pop("callbacks", None)
        trainer = start_trainer(actors, config=config, policy=policy)
        try:
            return ray.get(trainer.run_method.remote(task, method, gap=gap, seed=seed, **kw))
        finally:
            ray.kill(trainer, no_restart=True)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)

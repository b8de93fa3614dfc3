"""TrainerActor: the runner's :class:`~pnn_cluster.runner.ExperimentRun` in its own actor, next to the devices.

It holds the model, the optimizer and the loop, starts the device and twin
actors (:class:`~actors.placement.RayPlacement`), and tracks the run in MLflow
from where it runs. It serves several calls at once, so the driver can read
its progress (:meth:`events`) and ask it to stop while ``run`` goes on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ray
import torch

from actors.placement import RayPlacement
from pnn_cluster.config import ExperimentConfig
from pnn_cluster.runner.run import ExperimentRun, RunResult

__all__ = ["TrainerActor", "start_trainer"]


class _TrainerActor:
    def __init__(self, config: ExperimentConfig, tracking: Mapping[str, Any] | None = None,
                 resume: Mapping[str, Any] | None = None, keep_checkpoint: bool = False,
                 default_dtype: str = "float32", checkpoint_path: str | None = None) -> None:
        torch.set_num_threads(1)
        torch.set_default_dtype(getattr(torch, default_dtype))
        # what a device waiting for another run's instrument says goes to the run's own progress lines,
        # which the submitter streams
        who = ((tracking or {}).get("tags") or {}).get("pnn.submitter")  # the MLflow tag `pnn-cluster submit` gives
        self.placement = RayPlacement(report=lambda line: self.experiment.report(line), run=config.name,
                                      submitter=who)
        self.experiment = ExperimentRun(config, self.placement, tracking=tracking, resume=resume, echo=False,
                                        keep_checkpoint=keep_checkpoint, checkpoint_path=checkpoint_path)

    def run(self) -> RunResult:
        return self.experiment.run()

    def evaluate(self, split: str = "test") -> dict[str, Any]:
        return self.experiment.evaluate(split)

    def events(self, since: int = 0) -> list[str]:
        return self.experiment.events(since)

    def stop(self) -> None:
        self.placement.cancel()  # a run still waiting for an instrument stops waiting
        self.experiment.stop()

    def status(self) -> dict[str, Any]:
        return self.experiment.status()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


TrainerActor = ray.remote(_TrainerActor)


def start_trainer(config: ExperimentConfig, tracking: Mapping[str, Any] | None = None,
                  resume: Mapping[str, Any] | None = None, keep_checkpoint: bool = False,
                  checkpoint_path: str | None = None, **options: Any):
    """A trainer actor for ``config``, placed as ``cluster.trainer`` says.

    It is not restarted: a trainer rebuilt from its constructor would start the
    run over; ``train --resume RUN_ID`` continues from the checkpoint instead.
    """
    place = config.cluster.trainer
    opts: dict[str, Any] = {"num_cpus": place.num_cpus, "max_restarts": 0, "max_concurrency": 4}
    if place.num_gpus:
        opts["num_gpus"] = place.num_gpus
    if place.resources:
        opts["resources"] = dict(place.resources)
    if place.labels:
        opts["label_selector"] = dict(place.labels)
    opts.update(options)
    dtype = str(torch.get_default_dtype()).removeprefix("torch.")
    return TrainerActor.options(**opts).remote(config, tracking, resume, keep_checkpoint, dtype, checkpoint_path)

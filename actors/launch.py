"""RayLauncher: a whole run in a trainer actor, its progress streamed to this process.

Registered as the ``ray`` entry point of ``pnn_cluster.launchers`` (pyproject.toml);
``pnn-cluster train``/``demo``/``evaluate`` use it unless ``--in-process``. The
driver process only submits, prints what the trainer reports, and forwards a
stop (Ctrl-C, or the SIGTERM of ``ray job stop``) so the trainer keeps its
checkpoint and marks its MLflow run before it ends.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import ray

from actors.cluster import connect
from actors.trainer import start_trainer
from pnn_cluster.config import ExperimentConfig
from pnn_cluster.runner.launch import stop_on_signals
from pnn_cluster.runner.run import RunResult

__all__ = ["RayLauncher"]


class RayLauncher:
    kind = "ray"

    def __init__(self, address: str | None = None, poll_s: float = 0.25, out=None) -> None:
        self.address = address
        self.poll_s = poll_s
        self.out = out

    def _connect(self, config: ExperimentConfig) -> str:
        return connect(self.address or config.cluster.address, namespace=config.cluster.namespace)

    def _stream(self, actor, ref) -> Any:
        seen = 0
        out = self.out or sys.stdout
        stopping = []

        def stop() -> None:
            stopping.append(True)
            actor.stop.remote()

        with stop_on_signals(stop):
            while True:
                done, _ = ray.wait([ref], timeout=self.poll_s)
                lines = ray.get(actor.events.remote(seen))
                seen += len(lines)
                for line in lines:
                    print(line, file=out, flush=True)
                if done:
                    return ray.get(ref)

    def run(self, config: ExperimentConfig, tracking: Mapping[str, Any] | None = None,
            resume: Mapping[str, Any] | None = None, keep_checkpoint: bool = False,
            progress: bool = False, checkpoint_path: str | None = None) -> RunResult:
        where = self._connect(config)
        print(f"-- Ray ({where}): the loop runs in a trainer actor", flush=True)
        actor = start_trainer(config, tracking, resume, keep_checkpoint, checkpoint_path=checkpoint_path)
        try:
            return self._stream(actor, actor.run.remote())
        finally:
            ray.kill(actor, no_restart=True)

    def evaluate(self, config: ExperimentConfig, checkpoint: Mapping[str, Any], split: str = "test"
                 ) -> dict[str, Any]:
        self._connect(config)
        actor = start_trainer(config, resume=checkpoint)
        try:
            return ray.get(actor.evaluate.remote(split))
        finally:
            ray.kill(actor, no_restart=True)

"""Launchers: where a whole run happens, chosen by the command line.

An :class:`InProcessLauncher` runs the :class:`~pnn_cluster.runner.run.ExperimentRun`
here, with every device in this process. The Ray launcher (``actors.RayLauncher``)
runs it in a trainer actor with every device in its own device actor and
streams its progress back. The library never imports ``actors``: the Ray
launcher is found through the ``pnn_cluster.launchers`` entry point that
``actors`` declares (see pyproject.toml), so a lab can plug in a launcher of
its own the same way.

Stopping: the first Ctrl-C (or SIGTERM, which ``ray job stop`` sends) asks
the run to stop after the current step, keep that step's checkpoint and mark
its MLflow run KILLED; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol

from pnn_cluster.config import ExperimentConfig
from pnn_cluster.runner.placement import InProcessPlacement
from pnn_cluster.runner.run import ExperimentRun, RunResult

__all__ = ["Launcher", "InProcessLauncher", "get_launcher", "LAUNCHER_GROUP", "stop_on_signals"]

LAUNCHER_GROUP = "pnn_cluster.launchers"


class Launcher(Protocol):
    kind: str

    def run(self, config: ExperimentConfig, tracking: Mapping[str, Any] | None = None,
            resume: Mapping[str, Any] | None = None, keep_checkpoint: bool = False,
            progress: bool = False, checkpoint_path: str | None = None) -> RunResult: ...

    def evaluate(self, config: ExperimentConfig, checkpoint: Mapping[str, Any], split: str = "test"
                 ) -> dict[str, Any]: ...


@contextlib.contextmanager
def stop_on_signals(stop) -> Iterator[None]:
    """The first SIGINT/SIGTERM calls ``stop()``; a second SIGINT raises KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    asked = threading.Event()

    def handler(signum, frame):
        if asked.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked.set()
        print("\nstopping after the current step (Ctrl-C again to interrupt at once) ...", flush=True)
        stop()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class InProcessLauncher:
    """Everything in this process."""

    kind = "in-process"

    def run(self, config: ExperimentConfig, tracking: Mapping[str, Any] | None = None,
            resume: Mapping[str, Any] | None = None, keep_checkpoint: bool = False,
            progress: bool = False, checkpoint_path: str | None = None) -> RunResult:
        run = ExperimentRun(config, InProcessPlacement(), tracking=tracking, resume=resume, progress=progress,
                            keep_checkpoint=keep_checkpoint, checkpoint_path=checkpoint_path)
        with stop_on_signals(run.stop):
            return run.run()

    def evaluate(self, config: ExperimentConfig, checkpoint: Mapping[str, Any], split: str = "test"
                 ) -> dict[str, Any]:
        return ExperimentRun(config, InProcessPlacement(), resume=checkpoint, echo=False).evaluate(split)


def get_launcher(kind: str = "in-process", **options: Any) -> Launcher:
    """``in-process``, or a launcher registered under the ``pnn_cluster.launchers`` entry point (``ray``)."""
    if kind == "in-process":
        return InProcessLauncher()
    found = {ep.name: ep for ep in entry_points(group=LAUNCHER_GROUP)}
    if kind not in found:
        allowed = ", ".join(["in-process", *sorted(found)])
        raise ValueError(f"launcher {kind!r} is not installed (allowed: {allowed}); `pip install -e .` registers "
                         "the Ray launcher of actors/")
    return found[kind].load()(**options)

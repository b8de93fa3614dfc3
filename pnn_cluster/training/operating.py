"""Recording where training runs each physical layer, from the measurements PAT makes anyway.

Every training step measures each physical layer at its current settings on the inputs the layers
before it produced; the pipeline hands those measurements to its ``observer`` (what drift watching
reads). :class:`OperatingRecorder` is a trainer callback that stands in as that observer, passes every
measurement on to the observer already there, and keeps, for a sample of the steps, each layer's settings
and a few of its measured input rows: the layer's operating region
(:class:`~pnn_cluster.twins.operating.OperatingRegion`). It measures nothing itself, so a run with it
uses the same device samples and noise as one without.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pnn_cluster.twins.operating import LayerRegion, OperatingRegion

__all__ = ["OperatingRecorder"]


class OperatingRecorder:
    """Keeps ``rows`` input rows and the settings of each physical layer at every ``every``-th training step,
    at most ``max_steps`` steps per layer (a uniform reservoir over the steps seen); ``path``: saved there
    as ``.npz`` when training ends. ``skip_fraction`` of the first steps are not kept (the region of a
    trained network, not of its first steps); it needs the run's planned steps, known at the start."""

    def __init__(self, every: int = 1, rows: int = 32, max_steps: int = 256, skip_fraction: float = 0.0,
                 path: str | Path | None = None, seed: int = 0, meta: Mapping[str, Any] | None = None,
                 on_end: Callable[[OperatingRegion], Any] | None = None) -> None:
        if every < 1 or rows < 1 or max_steps < 1:
            raise ValueError(f"OperatingRecorder: every, rows and max_steps must be >= 1, got {every}, {rows}, "
                             f"{max_steps}")
        if not 0.0 <= skip_fraction < 1.0:
            raise ValueError(f"OperatingRecorder: skip_fraction must be in [0, 1), got {skip_fraction}")
        self.every, self.rows, self.max_steps, self.skip_fraction = every, rows, max_steps, skip_fraction
        self.path = Path(path) if path is not None else None
        #: handed the region when training ends (a run logs it as an MLflow artifact)
        self.on_end = on_end
        self.meta = dict(meta or {})
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._forward: Any = None
        self._executor: Any = None
        self._step = 0
        self._first = 0
        #: layer -> kept steps: step -> (settings, [input rows]); and how many steps each layer offered
        self._kept: dict[str, dict[int, tuple[dict[str, np.ndarray], list[np.ndarray]]]] = {}
        self._offered: dict[str, int] = {}

    # -- the observer --------------------------------------------------------------------------

    def observe(self, stage: str, replica: Any, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                y_twin: np.ndarray) -> None:
        if self._forward is not None:
            self._forward.observe(stage, replica, params, x, y, y_twin)
        step = self._step
        if step < self._first or step % self.every:
            return
        with self._lock:
            kept = self._kept.setdefault(stage, {})
            if step not in kept:
                if not self._admit(stage, kept):
                    return
                kept[step] = ({k: np.array(v, dtype=np.float64) for k, v in params.items()}, [])
            rows = kept[step][1]
            have = sum(len(r) for r in rows)
            if have < self.rows:
                x = np.asarray(x, dtype=np.float64)
                take = self._rng.permutation(len(x))[: self.rows - have]
                rows.append(x[take])

    def _admit(self, stage: str, kept: dict) -> bool:
        """Reservoir sampling over the steps a layer offers: each kept with the same chance."""
        seen = self._offered[stage] = self._offered.get(stage, 0) + 1
        if len(kept) < self.max_steps:
            return True
        j = int(self._rng.integers(seen))
        if j >= self.max_steps:
            return False
        del kept[sorted(kept)[j]]
        return True

    # -- trainer hooks -------------------------------------------------------------------------

    def on_train_start(self, trainer: Any) -> None:
        ex = trainer.executor
        if not hasattr(ex, "observer"):
            raise TypeError(f"OperatingRecorder needs an executor that hands on its measurements (an observer); "
                            f"{type(ex).__name__} has none")
        self._executor, self._forward = ex, ex.observer
        ex.observer = self
        self._step = trainer.global_step
        total = trainer.config.epochs * trainer.steps_per_epoch
        self._first = int(self.skip_fraction * total)

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self._step = trainer.global_step

    def on_epoch_end(self, trainer: Any, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if self._executor is not None and self._executor.observer is self:
            self._executor.observer = self._forward
        self._executor = None
        if self.path is not None and self._kept:
            self.region().save(self.path)
        if self.on_end is not None and self._kept:
            self.on_end(self.region())

    def on_test_end(self, trainer: Any, result: dict[str, Any]) -> None: ...

    # -- what was recorded ---------------------------------------------------------------------

    def region(self) -> OperatingRegion:
        """The recorded region; each kept step with exactly ``rows`` input rows (repeated when fewer arrived)."""
        layers = {}
        with self._lock:
            for stage, kept in self._kept.items():
                steps = sorted(s for s, (_, rows) in kept.items() if rows)
                if not steps:
                    continue
                xs = []
                for s in steps:
                    rows = np.concatenate(kept[s][1])
                    xs.append(rows[np.arange(self.rows) % len(rows)])
                names = list(kept[steps[0]][0])
                params = {n: np.stack([kept[s][0][n] for s in steps]) for n in names}
                layers[stage] = LayerRegion(params, np.stack(xs), np.asarray(steps))
        return OperatingRegion(layers, {**self.meta, "every": self.every, "rows": self.rows})

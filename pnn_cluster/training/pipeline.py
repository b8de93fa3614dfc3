"""The micro-batch pipeline: every physical device busy, one optimizer step per batch.

A batch is split into micro-batches. Each physical layer of the stack is a
*stage* with a pool of one or more *replica* devices (physical copies, each
with its own imperfections and its own twin). Micro-batch k+1 is measured on
stage s while k is measured on stage s+1; digital layers run here, in the
trainer, between measurements::

    micro-batch: digital -> [stage 0: replica r0] -> digital -> [stage 1: replica r1] -> output
                                 ^ k+1 measured here while k is on stage 1
    then, for the batch: loss -> backward (twins at the measured inputs)

- A micro-batch goes to whichever replica of its stage is free, and its
  backward pass uses the twin of the replica that measured it, evaluated at
  the input that replica measured (:func:`~pnn_cluster.pat.pat_apply`).
- The backward pass runs once all of a batch is measured, over the whole
  batch (or ``backward_batch`` rows at a time): the digital layers are run
  again with autograd on the measured values, and each stage's twins are
  asked once per replica rather than once per micro-batch (a twin that
  integrates an ODE costs the same for 8 rows as for 64). The gradients of
  all micro-batches and replicas add up in ``.grad``; the trainer makes one
  optimizer step from them.
- Parameters travel with the first forward a replica gets in a step, so each
  device is written once per step and no call is spent on the write alone.
  Each call carries a content hash of the parameters it is meant for (see
  :class:`~pnn_cluster.training.workers.DeviceWorker`); a device that does not
  hold them answers ``None`` and gets them again.
- With twins elsewhere (a :class:`TwinPool` per replica: twin actors, or twin
  workers on threads), the backward pass streams instead: as soon as a
  micro-batch's measurement is done, its loss is taken and its vector-Jacobian
  products are sent to the twins of the replicas that measured it, stage by
  stage from the last, while the next micro-batches are still being measured.
  The gradients are summed in micro-batch order, so a rerun gives the same
  step whatever order the replies came in.
- Failed measurements are retried under a :class:`~pnn_cluster.training.faults.FaultPolicy`;
  a call that takes longer than its replica's ``timeout_s`` counts as a failure
  (a hung instrument ends in a retry or a clear error, never a wait without end).

The schedule is written against two small interfaces, so it runs the same
in-process and on Ray: a :class:`DeviceHandle` submits a forward and returns
a pending call; a :class:`Backend` waits for pending calls. The in-process
implementation (:class:`ThreadBackend`, :class:`LocalDeviceHandle`) runs each
device on its own thread, which is enough for devices that spend their time
waiting on hardware; ``actors.RayExecutor`` uses device actors.

This module holds the configuration and the executor; the rest lives by job
(and every name above is importable from here too):
:mod:`~pnn_cluster.training.backends` (handles and backends),
:mod:`~pnn_cluster.training.pools` (replicas, stage and twin pools) and
:mod:`~pnn_cluster.training.schedule` (one batch's event loop and backward passes).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pnn_cluster.devices.spec import Timing
from pnn_cluster.layers import PhysicalLayer
from pnn_cluster.training.backends import (
    Backend,
    CallTimeout,
    DeviceHandle,
    LocalDeviceHandle,
    LocalTwinHandle,
    ThreadBackend,
    TwinHandle,
)
from pnn_cluster.training.faults import FaultPolicy
from pnn_cluster.training.pools import Replica, StagePool, TwinPool
from pnn_cluster.training.schedule import BatchRun
from pnn_cluster.training.trainer import StepResult, split_micro

__all__ = ["DeviceHandle", "Backend", "LocalDeviceHandle", "ThreadBackend", "Replica", "StagePool",
           "PipelineConfig", "PipelineExecutor", "SCHEDULES", "BACKWARDS", "TwinHandle", "LocalTwinHandle",
           "TwinPool", "CallTimeout", "planned_micro_batches"]

SCHEDULES = ("pipelined", "sequential")
BACKWARDS = ("auto", "batch", "stream")


@dataclass
class PipelineConfig:
    """How batches are cut and scheduled.

    schedule: ``pipelined`` keeps every stage busy; ``sequential`` runs one
        micro-batch at a time through the whole stack (the reference order).
    micro_batches: when neither the trainer nor ``micro_batch`` gives a size,
        each batch is split into this many micro-batches. None: as many as
        make the step quickest, judged from each device's declared
        :class:`~pnn_cluster.devices.spec.Timing` and ``call_overhead_s``
        (:func:`planned_micro_batches`): devices that take no time get the
        batch whole, slow ones pieces small enough to keep every stage busy.
        Where a device declares no timing: ``untimed_micro_batches``, or when
        that is None ``2 x (stages + replicas of the largest pool - 1)``,
        enough to keep every device busy.
    untimed_micro_batches: the count when ``micro_batches`` is None and some
        device declares no timing (None: the fill above).
    call_overhead_s: what one call costs beyond the device's own time (a
        round trip to its actor, the trainer's share of the work around it);
        the 3 ms default is an actor round trip measured on a 2-core machine.
    micro_batch: micro-batch size when the trainer gives none.
    depth: calls queued on one replica, so a device never idles for a round trip.
    eval_micro_batch: micro-batch size for evaluation (default: as training).
    backward_batch: rows per backward pass, in whole micro-batches (None: the
        whole batch at once); bounds the memory of the autograd graph.
    backward: ``batch`` (one backward pass once the batch is measured),
        ``stream`` (each micro-batch's backward as soon as it is measured, its
        VJPs sent to twin pools) or ``auto`` (stream when every replica has one).
    """

    schedule: str = "pipelined"
    micro_batches: int | None = None
    micro_batch: int | None = None
    untimed_micro_batches: int | None = None
    depth: int = 2
    eval_micro_batch: int | None = None
    backward_batch: int | None = None
    backward: str = "auto"
    call_overhead_s: float = 0.003

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"PipelineConfig.schedule: {self.schedule!r} is not allowed; allowed: {SCHEDULES}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"PipelineConfig.backward: {self.backward!r} is not allowed; allowed: {BACKWARDS}")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"PipelineConfig.depth: must be an integer >= 1, got {self.depth!r}")
        if isinstance(self.call_overhead_s, bool) or not isinstance(self.call_overhead_s, (int, float)) \
                or not 0 <= self.call_overhead_s < 60:
            raise ValueError(f"PipelineConfig.call_overhead_s: must be a number of seconds in [0, 60), "
                             f"got {self.call_overhead_s!r}")
        for name in ("micro_batches", "micro_batch", "untimed_micro_batches", "eval_micro_batch", "backward_batch"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"PipelineConfig.{name}: must be None or an integer >= 1, got {v!r}")

    def size(self, n: int, given: int | None, evaluating: bool = False, fill: int = 8) -> int:
        """Rows per micro-batch; ``fill``: micro-batches that keep every device busy (for ``micro_batches=None``)."""
        size = given or (self.eval_micro_batch if evaluating else None) or self.micro_batch
        return size or max(1, -(-n // (self.micro_batches or fill)))


#: the most micro-batches :func:`planned_micro_batches` cuts a batch into
MAX_PLANNED = 256


def planned_micro_batches(n: int, stages: Sequence[tuple[Timing, int]], overhead_s: float) -> int:
    """The micro-batch count that makes a batch of ``n`` rows quickest through ``stages``.

    Each stage is ``(timing, replicas)``. A micro-batch of ``n/m`` rows holds a replica for
    ``t = timing.seconds(n/m) + overhead_s``; with ``m`` micro-batches the batch takes the first
    one's way through every stage plus the bottleneck stage's remaining rounds,
    ``sum_s t_s + max_s (ceil(m / replicas_s) - 1) t_s``. The smallest ``m`` of the least time wins, so
    a stack of devices that take no time is asked once per batch. Deterministic: the same declared
    timings give the same cut, and so the same run.
    """
    if not stages or n <= 1:
        return 1
    best_m, best_t = 1, math.inf
    for m in range(1, min(n, MAX_PLANNED) + 1):
        rows = n / m
        ts = [(timing.seconds(rows) + overhead_s, max(1, k)) for timing, k in stages]
        t = sum(x for x, _ in ts) + max((math.ceil(m / k) - 1) * x for x, k in ts)
        if t < best_t * (1 - 1e-9):
            best_m, best_t = m, t
    return best_m


class PipelineExecutor:
    """An :class:`~pnn_cluster.training.trainer.Executor` that pipelines micro-batches over device pools.

    ``pools`` maps a physical layer's name to its replicas; a layer not named
    there gets one replica, its own device (``backend.default_handle``).
    ``observer`` (optional) is handed, in training steps, every measured
    micro-batch beside its twin's prediction at the same points
    (``observe(stage, replica, params, x, y, y_twin)``): what drift watching
    needs, at no extra device call and no extra twin pass.
    """

    def __init__(self, backend: Backend | None = None, pools: Mapping[str, Sequence[Replica]] | None = None,
                 config: PipelineConfig | None = None, policy: FaultPolicy | None = None,
                 observer: Any = None) -> None:
        self.backend = backend or ThreadBackend()
        self.observer = observer
        self.config = config or PipelineConfig()
        self.policy = policy or FaultPolicy()
        self._configured = {name: list(reps) for name, reps in (pools or {}).items()}
        self._pools: dict[int, StagePool] = {}
        self.stats = collections.Counter()

    # -- pools -----------------------------------------------------------------------------

    def set_pool(self, layer_name: str, replicas: Sequence[Replica]) -> None:
        """Give a physical layer these replicas (from its next step on)."""
        if not replicas:
            raise ValueError(f"PipelineExecutor.set_pool: layer {layer_name!r} needs at least one replica")
        self._configured[layer_name] = list(replicas)
        self._pools = {k: p for k, p in self._pools.items() if p.name != layer_name}

    def pool(self, layer: PhysicalLayer) -> StagePool:
        pool = self._pools.get(id(layer))
        if pool is None or pool.layer is not layer:
            reps = self._configured.get(layer.name)
            if reps is None:
                reps = [Replica(self.backend.default_handle(layer), name=layer.name)]
            pool = self._pools[id(layer)] = StagePool(layer, reps)
        return pool

    def _plan(self, model: nn.Module) -> list[nn.Module]:
        if not isinstance(model, nn.Sequential):
            raise TypeError(f"PipelineExecutor: the model must be a Stack (nn.Sequential), got {type(model).__name__}")
        plan = list(model)
        names = set()
        for i, m in enumerate(plan):
            if isinstance(m, PhysicalLayer):
                names.add(m.name)
                continue
            nested = [x for x in m.modules() if isinstance(x, PhysicalLayer)]
            if nested:
                raise ValueError(f"PipelineExecutor: physical layer {nested[0].name!r} is nested inside layer {i} "
                                 f"({type(m).__name__}); put physical layers at the top level of the Stack")
        unknown = sorted(set(self._configured) - names)
        if unknown:
            raise ValueError(f"PipelineExecutor.pools: no physical layer named {unknown[0]!r}; "
                             f"layers are {sorted(names)}")
        return plan

    # -- the Executor protocol -------------------------------------------------------------

    def _fill(self, model: nn.Module, n: int) -> int:
        """Micro-batches for a batch of ``n`` (when the configuration gives none): planned from the devices'
        declared timings (:func:`planned_micro_batches`), else ``untimed_micro_batches`` or
        2 x (stages + largest pool - 1)."""
        if self.config.micro_batches is not None:
            return self.config.micro_batches
        layers = [m for m in model if isinstance(m, PhysicalLayer) and m.mode != "in_silico"] \
            if isinstance(model, nn.Sequential) else []
        if not layers:
            return 1
        timings = [getattr(m.device.spec, "timing", None) if m.device.spec_known else None for m in layers]
        if all(t is not None for t in timings):
            stages = [(t, len(self.pool(m).active)) for t, m in zip(timings, layers)]
            fill = planned_micro_batches(n, stages, self.config.call_overhead_s)
        elif self.config.untimed_micro_batches is not None:
            fill = self.config.untimed_micro_batches
        else:
            widest = max(len(self.pool(m).active) for m in layers)
            fill = 2 * (len(layers) + widest - 1)
        return fill

    def forward_backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn,
                         micro_batch: int | None) -> StepResult:
        n = x.shape[0]
        size = self.config.size(n, micro_batch, fill=self._fill(model, n))
        micro = split_micro(n, size)
        run = BatchRun(self, model, x, micro, target=y, loss_fn=loss_fn)
        run.go()
        self.stats["steps"] += 1
        self.stats["micro_batches"] += len(micro)
        return StepResult(run.loss, run.correct, n, run.device_samples)

    def evaluate(self, model: nn.Module, x: torch.Tensor, micro_batch: int | None = None) -> torch.Tensor:
        size = self.config.size(x.shape[0], self.config.eval_micro_batch or micro_batch, evaluating=True,
                                fill=self._fill(model, x.shape[0]))
        run = BatchRun(self, model, x, split_micro(x.shape[0], size))
        run.go()
        return torch.cat(run.outputs)

    def close(self) -> None:
        """Release what the handles hold in this process (threads of in-process devices)."""
        for pool in self._pools.values():
            for rep in pool.replicas:
                close = getattr(rep.handle, "close", None)
                if close is not None:
                    close()

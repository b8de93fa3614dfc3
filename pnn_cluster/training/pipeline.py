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
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pnn_cluster.devices.base import Device
from pnn_cluster.layers import PhysicalLayer
from pnn_cluster.pat import pat_apply, twin_vjp
from pnn_cluster.training.faults import FaultPolicy, NoReplicaLeft, describe, is_device_failure
from pnn_cluster.training.trainer import StepResult, split_micro
from pnn_cluster.training.workers import DeviceWorker, params_version, twin_version

__all__ = ["DeviceHandle", "Backend", "LocalDeviceHandle", "ThreadBackend", "Replica", "StagePool",
           "PipelineConfig", "PipelineExecutor", "SCHEDULES", "BACKWARDS", "TwinHandle", "LocalTwinHandle",
           "TwinPool", "CallTimeout"]

SCHEDULES = ("pipelined", "sequential")
BACKWARDS = ("auto", "batch", "stream")


class CallTimeout(TimeoutError):
    """A device or twin call took longer than its ``timeout_s``; counted as a device failure."""


class DeviceHandle(Protocol):
    """One replica device as the schedule sees it."""

    name: str

    def submit(self, x: np.ndarray, params: Mapping[str, np.ndarray] | None, version: str) -> Any:
        """Start a forward; returns a pending call for :meth:`Backend.wait` (never blocks on the device)."""

    def true_model(self) -> nn.Module:
        """The simulator's exact physics, for mode 'oracle'."""


class Backend(Protocol):
    def wait(self, calls: Sequence[Any], timeout: float | None = None) -> list[Any]:
        """Block until at least one call has finished, or ``timeout`` seconds; return the finished ones."""

    def result(self, call: Any) -> np.ndarray | None:
        """The reply of a finished call (raises what the device raised)."""

    def is_device_failure(self, exc: BaseException) -> bool:
        """True when a retry (on a restarted or another device) may succeed."""

    def handle_for(self, device: Any, name: str) -> DeviceHandle:
        """The handle of a device given as a :class:`~pnn_cluster.devices.base.Device` (or proxy)."""

    def default_handle(self, layer: PhysicalLayer) -> DeviceHandle:
        """The handle of a layer's own device, when no pool was configured for it."""


class LocalDeviceHandle:
    """A device in this process, measured on its own thread (the device serialises its calls)."""

    def __init__(self, device: Device | DeviceWorker, name: str | None = None) -> None:
        self.worker = device if isinstance(device, DeviceWorker) else DeviceWorker(device)
        self.name = name or self.worker.name
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"device-{self.name}")

    def submit(self, x: np.ndarray, params: Mapping[str, np.ndarray] | None, version: str) -> Any:
        return self._thread.submit(self.worker.forward, x, params, version)

    def true_model(self) -> nn.Module:
        return self.worker.true_model()

    def close(self) -> None:
        self._thread.shutdown(wait=True)


class ThreadBackend:
    """Pending calls are ``concurrent.futures.Future`` s."""

    def __init__(self) -> None:
        self._handles: dict[int, tuple[Any, LocalDeviceHandle]] = {}

    def wait(self, calls: Sequence[Any], timeout: float | None = None) -> list[Any]:
        done, _ = concurrent.futures.wait(calls, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        # in the order they were sent, not a set's: the next stage then sees micro-batches in a fixed order
        return [c for c in calls if c in done]

    def result(self, call: Any) -> np.ndarray | None:
        return call.result()

    def is_device_failure(self, exc: BaseException) -> bool:
        return is_device_failure(exc)

    def handle_for(self, device: Any, name: str) -> DeviceHandle:
        # one thread per device, however many pools name it: the device serialises its calls anyway
        known = self._handles.get(id(device))
        if known is None or known[0] is not device:
            known = self._handles[id(device)] = (device, LocalDeviceHandle(device, name=name))
        return known[1]

    def default_handle(self, layer: PhysicalLayer) -> DeviceHandle:
        return self.handle_for(layer.device, layer.name)


class TwinHandle(Protocol):
    """One copy of a twin as the schedule sees it (a twin actor, or a twin worker on a thread)."""

    name: str

    def submit_vjp(self, x: np.ndarray, params: Mapping[str, np.ndarray], grad_y: np.ndarray, need_x: bool,
                   need: Sequence[str] | None, version: str, output: bool = False) -> Any:
        """Start a vector-Jacobian product; a pending call whose result is ``(gx, gp)`` (``(gx, gp, y_twin)``
        with ``output``), or None when this copy does not hold twin state ``version`` (it was restarted)."""

    def submit_refine(self, train: Any, val: Any, **kw: Any) -> Any:
        """Start refining a copy of this twin (:meth:`~pnn_cluster.training.workers.TwinWorker.refine`)
        beside the VJPs; a pending call for :meth:`Backend.wait`."""

    def load(self, payload: Mapping[str, Any]) -> str:
        """Replace this copy's twin state (blocking); returns its version."""

    def fit(self, train: Any, val: Any, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Fit this copy to samples (blocking); returns the fit's figures and the new state."""


class LocalTwinHandle:
    """A :class:`~pnn_cluster.training.workers.TwinWorker` in this process, on its own thread."""

    def __init__(self, worker: Any, name: str = "twin") -> None:
        self.worker = worker
        self.name = name
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"twin-{name}")
        self._refining: concurrent.futures.ThreadPoolExecutor | None = None

    def submit_vjp(self, x, params, grad_y, need_x, need, version, output=False):
        return self._thread.submit(self.worker.vjp, x, params, grad_y, need_x, need, version, output)

    def submit_refine(self, train: Any, val: Any, **kw: Any) -> Any:
        if self._refining is None:  # its own thread: VJPs go on meanwhile
            self._refining = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                   thread_name_prefix=f"refine-{self.name}")
        return self._refining.submit(self.worker.refine, train, val, **kw)

    def load(self, payload: Mapping[str, Any]) -> str:
        return self._thread.submit(self.worker.load, payload).result()

    def fit(self, train: Any, val: Any, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        figures = self._thread.submit(self.worker.fit, train, val, **kw).result()
        return figures, self.worker.payload()

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._refining is not None:
            self._refining.shutdown(wait=True)


class TwinPool:
    """The copies of one replica's twin: backward passes go to the least busy copy.

    ``payload`` is the twin's latest state (kind, config, tensors) and
    ``version`` its hash. Every call names the version it expects; a copy that
    was restarted from older state answers None, gets the latest state and is
    asked again, so a restarted twin never differentiates with a stale twin.
    """

    def __init__(self, handles: Sequence[TwinHandle], payload: Mapping[str, Any], version: str,
                 timeout_s: float | None = None) -> None:
        if not handles:
            raise ValueError("TwinPool: needs at least one twin handle")
        self.handles = list(handles)
        self.payload = dict(payload)
        self.version = version
        self.timeout_s = timeout_s
        self.busy = collections.Counter()
        self.reloads = 0
        #: how many times each copy was given the state since this pool started (see :meth:`restore`)
        self.loads = collections.Counter()

    def pick(self) -> TwinHandle:
        return min(self.handles, key=lambda h: self.busy[id(h)])

    def update(self, payload: Mapping[str, Any], version: str) -> None:
        """A refit: every copy takes the new state (at a step boundary)."""
        self.payload, self.version = dict(payload), version
        for h in self.handles:
            h.load(self.payload)
            self.loads[id(h)] += 1

    def restore(self, handle: TwinHandle, loads_when_sent: int | None = None) -> bool:
        """Give a copy that answered None the latest state; returns whether it was sent.

        Calls queued on a restarted copy all answer None; the first one's restore covers
        the others (``loads_when_sent``: :attr:`loads` of the copy when the call was sent),
        so the state travels once, not once per queued call.
        """
        if loads_when_sent is not None and self.loads[id(handle)] != loads_when_sent:
            return False
        self.reloads += 1
        self.loads[id(handle)] += 1
        handle.load(self.payload)
        return True

    def refit(self, train: Any, val: Any, **kw: Any) -> dict[str, Any]:
        """Fit in the first copy (next to its data, off the trainer), then every other copy takes the result."""
        figures, payload = self.handles[0].fit(train, val, **kw)
        self.payload = dict(payload)
        self.version = twin_version(payload["state"])
        for h in self.handles[1:]:
            h.load(self.payload)
            self.loads[id(h)] += 1
        return figures


@dataclass(eq=False)
class Replica:
    """One device of a stage, with the twin that differentiates what it measures.

    twin: this copy's twin; None uses the layer's own twin.
    twins: this copy's twin copies elsewhere (twin actors): backward passes stream to them.
    timeout_s: the longest one call to this device may take (None: no limit).
    """

    handle: DeviceHandle
    twin: Callable | None = None
    name: str = ""
    twins: TwinPool | None = None
    timeout_s: float | None = None
    # scheduling state, owned by the pipeline
    sent_version: str | None = field(default=None, init=False, repr=False)
    in_flight: int = field(default=0, init=False, repr=False)
    failures: int = field(default=0, init=False, repr=False)
    measured: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not callable(getattr(self.handle, "submit", None)):
            raise TypeError(f"Replica.handle: needs a submit(x, params, version) method, got "
                            f"{type(self.handle).__name__}")
        self.name = self.name or getattr(self.handle, "name", "") or "replica"


class StagePool:
    """The replicas of one physical layer; a replica that keeps failing leaves it (``retire``), one that is
    being recalibrated leaves it for a while (``suspend``, ``readmit``)."""

    def __init__(self, layer: PhysicalLayer, replicas: Sequence[Replica]) -> None:
        if not replicas:
            raise ValueError(f"stage {layer.name}: a pool needs at least one replica")
        self.layer = layer
        self.name = layer.name
        self.replicas: list[Replica] = list(replicas)
        self.active: list[Replica] = list(replicas)
        self.retired: dict[str, str] = {}
        self.suspended: dict[str, str] = {}
        self._turn = itertools.count()

    def pick(self, depth: int) -> Replica | None:
        """The least busy replica with room for another call; ties go round the pool."""
        n = len(self.active)
        if n == 0:
            return None
        start = next(self._turn) % n
        best = None
        for i in range(n):
            r = self.active[(start + i) % n]
            if r.in_flight < depth and (best is None or r.in_flight < best.in_flight):
                best = r
        return best

    def retire(self, replica: Replica, exc: BaseException) -> None:
        if replica in self.active:
            self.active.remove(replica)
            self.retired[replica.name] = describe(exc)

    def suspend(self, replica: Replica, reason: str) -> None:
        """No more work to ``replica`` until :meth:`readmit` (call at a step boundary: nothing in flight)."""
        if replica not in self.active:
            raise ValueError(f"stage {self.name}: replica {replica.name!r} is not active; active: "
                             f"{[r.name for r in self.active]}")
        self.active.remove(replica)
        self.suspended[replica.name] = reason

    def readmit(self, replica: Replica) -> None:
        """``replica`` takes work again, in its place in the pool."""
        if self.suspended.pop(replica.name, None) is not None and replica not in self.active:
            self.active = [r for r in self.replicas if r in self.active or r is replica]


@dataclass
class PipelineConfig:
    """How batches are cut and scheduled.

    schedule: ``pipelined`` keeps every stage busy; ``sequential`` runs one
        micro-batch at a time through the whole stack (the reference order).
    micro_batches: when neither the trainer nor ``micro_batch`` gives a size,
        each batch is split into this many micro-batches; None: just enough
        to keep every device busy, ``2 x (stages + replicas of the largest
        pool - 1)`` (a single device gets 2: splitting further only adds
        calls, and each call costs a round trip).
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
    depth: int = 2
    eval_micro_batch: int | None = None
    backward_batch: int | None = None
    backward: str = "auto"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"PipelineConfig.schedule: {self.schedule!r} is not allowed; allowed: {SCHEDULES}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"PipelineConfig.backward: {self.backward!r} is not allowed; allowed: {BACKWARDS}")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"PipelineConfig.depth: must be an integer >= 1, got {self.depth!r}")
        for name in ("micro_batches", "micro_batch", "eval_micro_batch", "backward_batch"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"PipelineConfig.{name}: must be None or an integer >= 1, got {v!r}")

    def size(self, n: int, given: int | None, evaluating: bool = False, fill: int = 8) -> int:
        """Rows per micro-batch; ``fill``: micro-batches that keep every device busy (for ``micro_batches=None``)."""
        size = given or (self.eval_micro_batch if evaluating else None) or self.micro_batch
        return size or max(1, -(-n // (self.micro_batches or fill)))


@dataclass(eq=False)
class _Micro:
    index: int
    rows: slice
    h: torch.Tensor | None
    pos: int = 0
    x_sent: np.ndarray | None = None
    attempts: collections.Counter = field(default_factory=collections.Counter)
    #: stage position -> (input sent, measurement, replica that measured it)
    measured: dict[int, tuple[np.ndarray, np.ndarray, Replica]] = field(default_factory=dict)
    #: streamed backward: gradient of each parameter from this micro-batch
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    #: stage position -> the dtype its measurement took on in the stack (that of the values sent)
    dtypes: dict[int, torch.dtype] = field(default_factory=dict)
    backward_done: bool = False


class _Stage:
    """One physical layer during one call: its pool and the parameters of this step."""

    def __init__(self, pool: StagePool) -> None:
        layer = pool.layer
        self.pool = pool
        self.layer = layer
        self.params_np = layer.params_numpy()
        self.version = params_version(self.params_np)
        self.params = dict(layer.theta.items())
        self.trainable = any(p.requires_grad for p in self.params.values())
        self._oracles: dict[int, nn.Module] = {}

    def vjp_at(self, rep: Replica, x_measured: torch.Tensor, y_measured: torch.Tensor | None = None,
               observer: Any = None) -> Callable:
        """``rep``'s vector-Jacobian product, evaluated at the input it measured.

        With an ``observer`` (mode 'pat'), the twin's prediction there is handed to it beside ``y_measured``.
        """
        layer = self.layer
        if layer.mode == "oracle":
            if id(rep) not in self._oracles:
                self._oracles[id(rep)] = rep.handle.true_model()
            twin = self._oracles[id(rep)]
        else:
            twin = rep.twin if rep.twin is not None else layer.twin
            if twin is None:
                raise RuntimeError(f"{layer.name}: mode 'pat' needs a twin for the backward pass of replica "
                                   f"{rep.name}; fit one first")

        if observer is None or layer.mode != "pat":
            def vjp(x, params, grad_y, need_x=True, need=None):
                return twin_vjp(twin, x_measured, params, grad_y, need_x=need_x, need=need)
        else:
            def vjp(x, params, grad_y, need_x=True, need=None):
                gx, gp, y = twin_vjp(twin, x_measured, params, grad_y, need_x=need_x, need=need, output=True)
                observer.observe(layer.name, rep, self.params_np, x_measured.numpy(), y_measured.numpy(), y.numpy())
                return gx, gp

        return vjp


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

    def _fill(self, model: nn.Module) -> int:
        """Micro-batches that keep every device of ``model`` busy: 2 x (stages + largest pool - 1)."""
        layers = [m for m in model if isinstance(m, PhysicalLayer) and m.mode != "in_silico"] \
            if isinstance(model, nn.Sequential) else []
        if not layers:
            return 1
        widest = max(len(self.pool(m).active) for m in layers)
        return 2 * (len(layers) + widest - 1)

    def forward_backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn,
                         micro_batch: int | None) -> StepResult:
        n = x.shape[0]
        size = self.config.size(n, micro_batch, fill=self._fill(model))
        run = _Run(self, model, x, split_micro(n, size), target=y, loss_fn=loss_fn)
        run.go()
        self.stats["steps"] += 1
        return StepResult(run.loss, run.correct, n, run.device_samples)

    def evaluate(self, model: nn.Module, x: torch.Tensor, micro_batch: int | None = None) -> torch.Tensor:
        size = self.config.size(x.shape[0], self.config.eval_micro_batch or micro_batch, evaluating=True,
                                fill=self._fill(model))
        run = _Run(self, model, x, split_micro(x.shape[0], size))
        run.go()
        return torch.cat(run.outputs)

    def close(self) -> None:
        """Release what the handles hold in this process (threads of in-process devices)."""
        for pool in self._pools.values():
            for rep in pool.replicas:
                close = getattr(rep.handle, "close", None)
                if close is not None:
                    close()


class _Run:
    """One batch through the pipeline.

    First every micro-batch is measured, stage by stage, in an event loop over
    pending device calls (no autograd: only values travel). Then, when
    training, the batch is replayed through the stack with autograd, the
    measured outputs standing in for the physical layers, and one backward
    pass makes the gradients.
    """

    def __init__(self, ex: PipelineExecutor, model: nn.Module, x: torch.Tensor, slices: list[slice],
                 target: torch.Tensor | None = None, loss_fn=None) -> None:
        self.ex = ex
        self.plan = ex._plan(model)
        self.grad = torch.is_grad_enabled()
        self.x, self.target, self.loss_fn, self.n = x, target, loss_fn, x.shape[0]
        self.stages: dict[int, _Stage] = {}
        for pos, m in enumerate(self.plan):
            if isinstance(m, PhysicalLayer) and m.mode != "in_silico":
                self.stages[pos] = _Stage(ex.pool(m))
        for st in self.stages.values():
            for rep in st.pool.active:
                rep.in_flight = 0  # calls left over from a step that raised are no longer ours
        self.queues = {pos: collections.deque() for pos in self.stages}
        self.order = sorted(self.stages, reverse=True)  # later stages first: a batch finishes sooner
        self.sequential = ex.config.schedule == "sequential"
        self.depth = 1 if self.sequential else ex.config.depth
        self.micros = [_Micro(k, sl, x[sl]) for k, sl in enumerate(slices)]
        self.outputs: list[torch.Tensor | None] = [None] * len(slices)
        self.pending: dict[Any, tuple[_Micro, int, Replica]] = {}
        # each replica's calls in the order sent, and replies that came in ahead of an earlier one
        self.sent: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.early: set[Any] = set()
        self.loss, self.correct, self.device_samples = 0.0, 0, 0
        self._waiting = collections.deque(self.micros)
        #: when each device call is overdue (its replica's timeout_s, times the calls queued ahead of it)
        self.deadline: dict[Any, float] = {}
        #: streamed backward: pending VJP calls -> (micro-batch, stage index, replica, twin handle, grad_y,
        #: the handle's TwinPool.loads when sent)
        self.vjps: dict[Any, tuple[_Micro, int, Replica, Any, torch.Tensor, int]] = {}
        self.observer = ex.observer if self.loss_fn is not None and self.grad else None
        self.stream = self.loss_fn is not None and self.grad and self._streams()
        if self.stream:
            self._plan_stream()

    def go(self) -> None:
        with torch.no_grad():
            self._measure()
        if self.loss_fn is not None:
            if self.stream:
                self._apply_streamed_grads()
            else:
                with torch.set_grad_enabled(self.grad):
                    self._backward()

    # -- measuring ---------------------------------------------------------------------------

    def _measure(self) -> None:
        self._release()
        while self.pending or self.vjps or any(self.queues.values()) or self._waiting:
            self._dispatch()
            if not self.pending and not self.vjps:
                if self._waiting:
                    self._release()
                    continue
                raise RuntimeError("pipeline: micro-batches are queued but no call is in flight")  # pragma: no cover
            calls = [c for c in self.pending if c not in self.early] + list(self.vjps)
            done = self.ex.backend.wait(calls, timeout=self._next_deadline()) if calls else []
            if not done:
                self._expire()
                continue
            for call in done:
                if call in self.vjps:
                    self._vjp_done(call)
                elif call in self.pending:
                    self._arrived(call)

    def _next_deadline(self) -> float | None:
        if not self.deadline:
            return None
        return max(0.0, min(self.deadline.values()) - time.monotonic())

    def _expire(self) -> None:
        """Device calls past their deadline fail with :class:`CallTimeout` (and are retried by the policy)."""
        now = time.monotonic()
        for call, when in list(self.deadline.items()):
            if when > now or call not in self.pending:
                continue
            mb, pos, rep = self.pending.pop(call)
            del self.deadline[call]
            self.early.discard(call)
            rep.in_flight = max(0, rep.in_flight - 1)
            sent = self.sent[id(rep)]
            if call in sent:
                sent.remove(call)
            self.ex.stats["timeouts"] += 1
            self._failed(mb, pos, rep, CallTimeout(f"device {rep.name}: no reply within its timeout_s of "
                                                   f"{rep.timeout_s:g} s"))
            self._drain(rep)

    def _arrived(self, call: Any) -> None:
        """Take a replica's replies in the order its calls were sent.

        The device measured them in that order, but replies may overtake each
        other on the way back; taken as they come, the next stage would see
        micro-batches in another order, and a rerun would not measure the same.
        """
        rep = self.pending[call][2]
        self.early.add(call)
        self._drain(rep)

    def _drain(self, rep: Replica) -> None:
        sent = self.sent[id(rep)]
        while sent and sent[0] in self.early:
            first = sent.popleft()
            self.early.discard(first)
            self._complete(first)

    def _release(self) -> None:
        """Start micro-batches: all at once when pipelined, the next one when the last finished if not."""
        while self._waiting and not (self.sequential and self._busy()):
            self._advance(self._waiting.popleft())

    def _busy(self) -> bool:
        return bool(self.pending) or any(self.queues.values()) or bool(self.vjps)

    def _advance(self, mb: _Micro) -> None:
        """Run digital layers until the next physical stage (queue it there) or the end of the stack."""
        while mb.pos < len(self.plan):
            if mb.pos in self.stages:
                mb.x_sent = mb.h.numpy()
                self.queues[mb.pos].append(mb)
                return
            mb.h = self.plan[mb.pos](mb.h)
            mb.pos += 1
        self.outputs[mb.index], mb.h = mb.h, None
        if self.stream:
            self._start_backward(mb)
        if self.sequential:
            self._release()

    def _dispatch(self) -> None:
        for pos in self.order:
            queue, st = self.queues[pos], self.stages[pos]
            while queue:
                if self.sequential and self.pending:
                    return
                rep = st.pool.pick(self.depth)
                if rep is None:
                    break
                mb = queue.popleft()
                send = rep.sent_version != st.version
                call = rep.handle.submit(mb.x_sent, st.params_np if send else None, st.version)
                if send:
                    # optimistic: the replica serves its calls in order, so later ones of this step find them
                    rep.sent_version = st.version
                    self.ex.stats["param_writes"] += 1
                if rep.timeout_s is not None:
                    self.deadline[call] = time.monotonic() + rep.timeout_s * (rep.in_flight + 1)
                rep.in_flight += 1
                self.ex.stats["calls"] += 1
                self.pending[call] = (mb, pos, rep)
                self.sent[id(rep)].append(call)

    def _complete(self, call: Any) -> None:
        mb, pos, rep = self.pending.pop(call)
        self.deadline.pop(call, None)
        rep.in_flight = max(0, rep.in_flight - 1)
        completed = getattr(rep.handle, "completed", None)
        if completed is not None:  # optional: a handle that orders its calls learns which replies arrived
            completed(call)
        st = self.stages[pos]
        try:
            y = self.ex.backend.result(call)
        except Exception as exc:
            if not self.ex.backend.is_device_failure(exc):
                raise
            self._failed(mb, pos, rep, exc)
            return
        if y is None:
            # the device does not hold this step's parameters (restarted, or written by someone else)
            rep.sent_version = None
            self.ex.stats["params_resent"] += 1
            self.queues[pos].appendleft(mb)
            return
        rep.failures = 0
        rep.measured += 1
        n = mb.x_sent.shape[0]
        st.layer.samples_measured += n
        self.device_samples += n
        if not y.flags.writeable:  # zero-copy from a shared object store; torch wants to own writable memory
            y = y.copy()
        mb.measured[pos] = (mb.x_sent, y, rep)
        mb.dtypes[pos] = mb.h.dtype
        mb.h = torch.from_numpy(y).to(dtype=mb.h.dtype)
        mb.x_sent = None
        mb.pos = pos + 1
        self._advance(mb)

    def _failed(self, mb: _Micro, pos: int, rep: Replica, exc: BaseException) -> None:
        st = self.stages[pos]
        pool, policy = st.pool, self.ex.policy
        self.ex.stats["retries"] += 1
        rep.sent_version = None  # a restarted device holds no parameters
        if rep in pool.active:
            rep.failures += 1
            if policy.should_retire(pool.name, rep.name, rep.failures, exc, len(pool.active)):
                pool.retire(rep, exc)
                self.ex.stats["replicas_retired"] += 1
        if not pool.active:
            raise NoReplicaLeft(pool.name, pool.retired) from exc
        mb.attempts[pos] += 1
        policy.check_attempts(pool.name, mb.index, mb.attempts[pos], exc)
        self.queues[pos].appendleft(mb)

    # -- the streamed backward pass ------------------------------------------------------------

    def _streams(self) -> bool:
        mode = self.ex.config.backward
        if mode == "batch" or not self.stages:
            return False
        ready = all(st.layer.mode == "pat" and all(r.twins is not None for r in st.pool.active)
                    for st in self.stages.values())
        if mode == "stream" and not ready:
            raise ValueError("PipelineConfig.backward='stream' needs a twin pool on every replica of every stage "
                             "in mode 'pat'; use 'batch' or 'auto'")
        return ready

    def _plan_stream(self) -> None:
        self.positions = sorted(self.stages)
        self.params_at: dict[int, list[torch.Tensor]] = {}
        self.need_x: dict[int, bool] = {}
        self.by_id: dict[int, torch.Tensor] = {}
        anything = False  # does anything before this position learn?
        for pos, m in enumerate(self.plan):
            if pos in self.stages:
                self.need_x[pos] = anything
                st = self.stages[pos]
                for p in st.params.values():
                    if p.requires_grad:
                        self.by_id[id(p)] = p
                anything = anything or st.trainable
            else:
                ps = [p for p in m.parameters() if p.requires_grad]
                self.params_at[pos] = ps
                for p in ps:
                    self.by_id[id(p)] = p
                anything = anything or bool(ps)

    def _segment(self, leaf: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = leaf
        params: list[torch.Tensor] = []
        for pos in range(start, stop):
            h = self.plan[pos](h)
            params += self.params_at.get(pos, [])
        return h, params

    def _keep_grads(self, mb: _Micro, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        for p, g in zip(params, grads):
            if g is not None:
                prev = mb.grads.get(id(p))
                mb.grads[id(p)] = g if prev is None else prev + g

    def _start_backward(self, mb: _Micro) -> None:
        """The loss of a measured micro-batch, and the VJP of its last stage, sent to that replica's twins."""
        k = len(self.positions) - 1
        last = self.positions[k]
        st = self.stages[last]
        with torch.enable_grad():
            y = torch.from_numpy(mb.measured[last][1]).to(mb.dtypes[last])
            y.requires_grad_(st.trainable or self.need_x[last])
            h, params = self._segment(y, last + 1, len(self.plan))
            weight = (mb.rows.stop - mb.rows.start) / self.n
            loss = self.loss_fn(h, self.target[mb.rows]) * weight
            self.loss += float(loss.detach())
            self.correct += int((h.detach().argmax(-1) == self.target[mb.rows]).sum())
            wrt = ([y] if y.requires_grad else []) + params
            grads = list(torch.autograd.grad(loss, wrt, allow_unused=True)) if wrt and loss.requires_grad else []
        if y.requires_grad and grads:
            gy = grads.pop(0)
            self._keep_grads(mb, params, grads)
            self._send_vjp(mb, k, torch.zeros_like(y) if gy is None else gy)
        else:
            self._keep_grads(mb, params, grads)
            mb.backward_done = True

    def _send_vjp(self, mb: _Micro, k: int, grad_y: torch.Tensor) -> None:
        pos = self.positions[k]
        st = self.stages[pos]
        x_sent, _, rep = mb.measured[pos]
        pool = rep.twins
        handle = pool.pick()
        need = [name for name, p in st.params.items() if p.requires_grad]
        if self.observer is not None:
            call = handle.submit_vjp(x_sent, st.params_np, grad_y.detach().numpy(), self.need_x[pos], need,
                                     pool.version, output=True)
        else:  # a handle of the user's own need not know about outputs
            call = handle.submit_vjp(x_sent, st.params_np, grad_y.detach().numpy(), self.need_x[pos], need,
                                     pool.version)
        pool.busy[id(handle)] += 1
        self.ex.stats["twin_calls"] += 1
        self.vjps[call] = (mb, k, rep, handle, grad_y, pool.loads[id(handle)])

    def _vjp_done(self, call: Any) -> None:
        mb, k, rep, handle, grad_y, loads = self.vjps.pop(call)
        rep.twins.busy[id(handle)] -= 1
        reply = self.ex.backend.result(call)
        if reply is None:
            # a twin restarted from older state: it gets the latest, and the same VJP is asked again
            if rep.twins.restore(handle, loads):
                self.ex.stats["twin_restores"] += 1
            self._send_vjp(mb, k, grad_y)
            return
        gx, gp = reply[0], reply[1]
        pos = self.positions[k]
        st = self.stages[pos]
        if self.observer is not None and len(reply) > 2:
            x_sent, y_measured, _ = mb.measured[pos]
            self.observer.observe(st.layer.name, rep, st.params_np, x_sent, y_measured, np.asarray(reply[2]))
        theta = [st.params[name] for name in gp]
        self._keep_grads(mb, theta, [torch.tensor(np.asarray(g), dtype=p.dtype) for p, g in zip(theta, gp.values())])
        if gx is None:
            mb.backward_done = True
            return
        start = self.positions[k - 1] + 1 if k > 0 else 0
        with torch.enable_grad():
            if k > 0:
                prev = self.stages[self.positions[k - 1]]
                leaf = torch.from_numpy(mb.measured[self.positions[k - 1]][1]).to(mb.dtypes[self.positions[k - 1]])
                leaf.requires_grad_(prev.trainable or self.need_x[self.positions[k - 1]])
            else:
                leaf = self.x[mb.rows]
            h, params = self._segment(leaf, start, pos)
            wrt = ([leaf] if k > 0 and leaf.requires_grad else []) + params
            grads = list(torch.autograd.grad(h, wrt, torch.tensor(np.asarray(gx), dtype=h.dtype),
                                             allow_unused=True)) if wrt and h.requires_grad else []
        if k > 0 and leaf.requires_grad and grads:
            g_leaf = grads.pop(0)
            self._keep_grads(mb, params, grads)
            self._send_vjp(mb, k - 1, torch.zeros_like(leaf) if g_leaf is None else g_leaf)
        else:
            self._keep_grads(mb, params, grads)
            mb.backward_done = True

    def _apply_streamed_grads(self) -> None:
        """Every micro-batch's gradients, summed in micro-batch order (the same step, whatever the reply order)."""
        for pid, p in self.by_id.items():
            total = None
            for mb in self.micros:
                g = mb.grads.get(pid)
                if g is not None:
                    total = g if total is None else total + g
            if total is not None:
                total = total.to(p.dtype).reshape(p.shape)
                p.grad = total.clone() if p.grad is None else p.grad + total

    # -- the backward pass ----------------------------------------------------------------------

    def _backward(self) -> None:
        """Replay the batch with autograd on the measured values; one backward pass per chunk of rows."""
        measured = {pos: (torch.cat([torch.from_numpy(mb.measured[pos][0]) for mb in self.micros]),
                          torch.cat([torch.from_numpy(mb.measured[pos][1]) for mb in self.micros]))
                    for pos in self.stages}
        for chunk in self._chunks():
            a, b = chunk[0].rows.start, chunk[-1].rows.stop
            h = self.x[a:b]
            for pos, m in enumerate(self.plan):
                if pos in self.stages:
                    xs, ys = measured[pos]
                    h = self._attach(self.stages[pos], h, xs[a:b], ys[a:b].to(h.dtype), chunk, pos, a)
                else:
                    h = m(h)
            # the same weighting as micro-batch by micro-batch: any loss reduction gives the same result
            loss = sum(self.loss_fn(h[mb.rows.start - a:mb.rows.stop - a], self.target[mb.rows])
                       * ((mb.rows.stop - mb.rows.start) / self.n) for mb in chunk)
            if loss.requires_grad:
                loss.backward()
            self.loss += float(loss.detach())
            self.correct += int((h.argmax(-1) == self.target[a:b]).sum())

    def _chunks(self) -> list[list[_Micro]]:
        limit = self.ex.config.backward_batch
        if limit is None:
            return [self.micros]
        chunks: list[list[_Micro]] = [[]]
        rows = 0
        for mb in self.micros:
            size = mb.rows.stop - mb.rows.start
            if chunks[-1] and rows + size > limit:
                chunks.append([])
                rows = 0
            chunks[-1].append(mb)
            rows += size
        return chunks

    def _attach(self, st: _Stage, h: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, chunk: list[_Micro],
                pos: int, a: int) -> torch.Tensor:
        """The measured outputs, differentiable through each replica's twin at the inputs it measured."""
        if not (st.trainable or h.requires_grad):
            return ys
        by_replica: dict[int, tuple[Replica, list[torch.Tensor]]] = {}
        for mb in chunk:
            rep = mb.measured[pos][2]
            rows = torch.arange(mb.rows.start - a, mb.rows.stop - a)
            by_replica.setdefault(id(rep), (rep, []))[1].append(rows)
        if len(by_replica) == 1:
            (rep, _), = by_replica.values()
            return pat_apply(h, ys, st.params, vjp=st.vjp_at(rep, xs, ys, self.observer))
        pieces, order = [], []
        for rep, rows in by_replica.values():
            idx = torch.cat(rows)
            pieces.append(pat_apply(h.index_select(0, idx), ys[idx], st.params,
                                    vjp=st.vjp_at(rep, xs[idx], ys[idx], self.observer)))
            order.append(idx)
        order_t = torch.cat(order)
        back = torch.empty_like(order_t)
        back[order_t] = torch.arange(len(order_t))
        return torch.cat(pieces).index_select(0, back)

"""The plain classes that Ray actors wrap: one owns a device, one a twin.

Each works in-process as it is (the unit tests and the in-process runner use
them directly); ``actors/`` only adds ``ray.remote`` with placement and
restart options. Neither holds anything that cannot be rebuilt from a
picklable description, because a restarted actor rebuilds itself from its
constructor arguments:

- :class:`DeviceWorker` builds its device from a recipe (anything with a
  ``build()`` that returns a :class:`~pnn_cluster.devices.base.Device`, such
  as :class:`~pnn_cluster.runner.build.DeviceRecipe`) and opens the connection
  itself, in its own process (an instrument connection cannot be pickled or
  shared), then serialises every access to it.
- :class:`TwinWorker` rebuilds a twin from its kind, config and state_dict,
  and tells by a version which state it holds.

The trainer (the model, the optimizer and the loop) is the runner's
:class:`~pnn_cluster.runner.ExperimentRun`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pnn_cluster.devices import Device, DeviceSpec
from pnn_cluster.pat import twin_vjp
from pnn_cluster.twins.versions import twin_digest

__all__ = ["DeviceWorker", "InTurn", "TwinWorker", "params_version", "twin_payload"]

#: a twin's parameters that are its physics model's calibration constants (what a device's drift moves)
CALIBRATION_PREFIX = "model.calibration."

log = logging.getLogger(__name__)


def params_version(params: Mapping[str, Any]) -> str:
    """A content hash of a full parameter set.

    Trainer and device compute it the same way, so the device can tell
    whether it holds the parameters a measurement is meant for, whoever wrote
    them and whether or not its process was restarted in between.
    """
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(params):
        a = np.ascontiguousarray(params[name], dtype=np.float64)
        h.update(name.encode())
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class DeviceWorker:
    """The one owner of a device: builds it, connects it, and serialises every call to it.

    ``forward(x, params, version)`` is the call the pipeline makes. With
    ``params`` the parameters are written first (an idempotent write). Without
    them, ``version`` says which parameters the caller means: if the device does
    not hold them (its process was restarted, or someone else wrote others)
    it measures nothing and returns ``None``, and the caller sends them again.
    A measurement is therefore never taken with parameters nobody asked for.

    Calls may arrive on several threads at once; the device itself sees one
    at a time, in the order each caller sent them (``ticket``: see :class:`InTurn`).
    """

    #: longest a call waits for an earlier call of its caller that has not arrived
    ORDER_WAIT_S = 1.0

    def __init__(self, device: Any, name: str | None = None) -> None:
        if isinstance(device, Device):
            self.recipe, self.device = None, device
        elif callable(getattr(device, "build", None)):
            self.recipe = device
            self.device = device.build()
            if not isinstance(self.device, Device):
                raise TypeError(f"DeviceWorker: {device!r} built a {type(self.device).__name__}, not a Device")
        else:
            raise TypeError(f"DeviceWorker: device must be a Device or a recipe with build(), got "
                            f"{type(device).__name__}")
        # connect first: a device that learns its spec on connect knows it before anyone asks
        self.device.connect()
        self.name = name or getattr(self.recipe, "label", None) or self.device.spec.name
        self.incarnation = uuid.uuid4().hex[:12]
        self._hashed: tuple[int, str | None] = (0, None)
        self._lock = threading.RLock()
        self._in_turn = InTurn(self.name, self.ORDER_WAIT_S)

    # -- the measurement path -----------------------------------------------------

    def forward(self, x: np.ndarray, params: Mapping[str, Any] | None = None, version: str | None = None,
                ticket: tuple[str, int, int] | None = None) -> np.ndarray | None:
        x = _writable(x)
        if ticket is None:
            return self._measure(x, params, version)
        return self._in_turn.run(ticket, lambda: self._measure(x, params, version))

    def set_handover(self, seconds: float) -> None:
        """Hand waiting calls to the runner's thread while the device's calls take ``seconds`` or more
        (:class:`InTurn`; 0: always, ``inf``: never)."""
        seconds = float(seconds)
        if not seconds >= 0:
            raise ValueError(f"handover: {seconds!r} s; allowed: >= 0 (0: always hand over, inf: never)")
        self._in_turn.handover_s = seconds

    def _measure(self, x: np.ndarray, params: Mapping[str, Any] | None, version: str | None) -> np.ndarray | None:
        with self._lock:
            if params is not None:
                self.device.set_params({k: _writable(v) for k, v in params.items()})
            elif version is not None and version != self.version:
                return None
            return self.device.forward(x)

    def forward_packed(self, call: tuple) -> np.ndarray | None:
        """:meth:`forward` with its arguments in one tuple: one object to serialise per call instead of four,
        a quarter less per-call overhead through an actor."""
        return self.forward(*call)

    def set_params(self, params: Mapping[str, Any]) -> str:
        with self._lock:
            self.device.set_params({k: _writable(v) for k, v in params.items()})
            return self.version

    @property
    def version(self) -> str | None:
        """Hash of the parameters the device holds; None until something wrote them.

        Read from the device itself rather than remembered, so a write that
        bypassed this worker (a calibration on the same in-process device) is
        seen too. Right after connecting, what the hardware holds is unknown.
        """
        writes = self.device.stats["param_writes"]
        if writes == 0:
            return None
        if self._hashed[0] != writes:
            self._hashed = (writes, params_version(self.device.params))
        return self._hashed[1]

    def collect(self, **kw: Any):
        """Calibration samples measured here, next to the device: one round trip instead of one per call."""
        from pnn_cluster.twins.collect import collect

        kw.setdefault("progress", False)
        with self._lock:
            return collect(self.device, **kw)

    # -- what the engine asks about the device --------------------------------------

    def spec(self) -> DeviceSpec:
        return self.device.spec

    def params(self) -> dict[str, np.ndarray]:
        with self._lock:
            return self.device.params

    def model(self):
        return self.device.model()

    def true_model(self):
        """The simulator's exact physics (mode 'oracle'); real hardware has none."""
        true_model = getattr(self.device, "true_model", None)
        if true_model is None:
            raise TypeError(f"{self.name}: mode 'oracle' needs a simulated device; "
                            f"{type(self.device).__name__} is real hardware. Use 'pat' or 'in_silico'.")
        with self._lock:
            return true_model()

    def noise_stream(self, purpose: str) -> None:
        with self._lock:
            self.device.noise_stream(purpose)

    def health(self) -> dict[str, Any]:
        return {**self.device.health(), "device": self.name, "incarnation": self.incarnation,
                "pid": os.getpid(), "host": socket.gethostname(), "params_version": self.version}

    def identity(self) -> dict[str, Any]:
        return self.device.identity()

    def close(self) -> None:
        self._in_turn.close()
        with self._lock:
            self.device.close()


class InTurn:
    """Ticketed calls, one at a time, each caller's in the order it sent them.

    A ticket is ``(caller stream, sequence number, after)``, ``after`` being
    the caller's previous call if it was still on its way when this one was
    sent (0 if not). Calls arrive on several threads at once (an actor takes a
    call's arguments while the last one is measured, and threads start in any
    order). A call that finds the device idle and nothing waiting runs at once
    on its own thread. One that arrives while another runs waits for its turn,
    and then:

    - while the device's calls take ``handover_s`` or more (a moving average of
      the last ones), it is handed to the runner's thread, which starts the
      next call whose turn it is the moment the last one ends: the device does
      not wait for a woken thread to get the interpreter while the last call's
      reply is being sent (measured: about 1 ms a call before, tens of
      microseconds with the runner);
    - while they take less (a simulation with no latency: the device is not
      what the pipeline waits for), its own thread runs it when its turn
      comes: a handover's two thread switches would cost more than they save.

    Waiting for ``after`` keeps a write ahead of the measurements meant for it,
    and each measurement's noise where a one-at-a-time device would draw it. A
    restarted process never sees the calls its predecessor served: a call
    waits for those at most ``wait_s``.
    """

    #: the moving average of a call's time from which waiting calls are handed to the runner's thread
    HANDOVER_S = 1e-3

    def __init__(self, name: str, wait_s: float, handover_s: float | None = None) -> None:
        self.name, self.wait_s = name, wait_s
        self.handover_s = self.HANDOVER_S if handover_s is None else float(handover_s)
        self._cv = threading.Condition()
        self._jobs: list[_Job] = []  # in the order they arrived
        self._served: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._running = False  # a call is being served (on the runner's thread or its caller's)
        #: a moving average of how long the device's calls take (starts long: a new device hands over)
        self.call_s = math.inf

    def close(self) -> None:
        """End the runner's thread once the calls handed to it are done (a later call starts it again)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def run(self, ticket: tuple[str, int, int], work: Any) -> Any:
        """``work()`` in its turn; its result, or what it raised. A call that finds nothing running and nothing
        waiting runs at once on its own thread (no handover); the others wait their turn, on the runner's thread
        or (short calls) on their own."""
        stream, seq, after = ticket
        with self._cv:
            inline = not self._running and not self._jobs and self._served.get(stream, 0) >= after
            if inline:
                self._running = True
            else:
                job = _Job(stream, seq, after, work, time.monotonic())
                job.own = self.call_s < self.handover_s
                self._closed = False
                if not job.own and (self._thread is None or not self._thread.is_alive()):
                    self._thread = threading.Thread(target=self._loop, name=f"device-{self.name}", daemon=True)
                    self._thread.start()
                self._jobs.append(job)
                self._cv.notify_all()
                if job.own:
                    while self._pick() is not job:
                        self._cv.wait(self._timeout())
                    self._take(job)
                    inline = True
        if inline:
            t0 = time.perf_counter()
            try:
                return work()
            finally:
                self._finished(stream, seq, time.perf_counter() - t0)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _finished(self, stream: str, seq: int, took: float) -> None:
        with self._cv:
            self._served[stream] = max(self._served.get(stream, 0), seq)
            self._running = False
            self.call_s = took if not math.isfinite(self.call_s) else 0.8 * self.call_s + 0.2 * took
            self._cv.notify_all()

    def _pick(self) -> _Job | None:
        """The job whose turn it is now (None: a call is running, or none may go yet); holding the condition."""
        if self._running:
            return None
        for job in self._jobs:
            if self._served.get(job.stream, 0) >= job.after:
                return job
        now = time.monotonic()
        for job in self._jobs:
            if now - job.arrived >= self.wait_s:
                return job
        return None

    def _take(self, job: _Job) -> None:
        """``job`` leaves the queue to be served; holding the condition."""
        if self._served.get(job.stream, 0) < job.after:
            log.info("%s: call %d of %s waited %.1f s for call %d, served before a restart; going on",
                     self.name, job.seq, job.stream, self.wait_s, job.after)
        self._jobs.remove(job)
        self._running = True

    def _timeout(self) -> float | None:
        """How long to wait before looking again: until the first waiting job's wait for its predecessor runs
        out (at least a millisecond: a job past it is taken by whoever's it is; None: none waits)."""
        if not self._jobs:
            return None
        return max(1e-3, min(j.arrived for j in self._jobs) + self.wait_s - time.monotonic())

    def _next(self) -> _Job | None:
        """The next job for the runner's thread (waiting for one; None once closed with none of its own left);
        called holding the condition. A job whose turn it is but that runs on its caller's thread is left to it."""
        while True:
            if self._closed and not any(not j.own for j in self._jobs):
                self._thread = None
                return None
            job = self._pick()
            if job is not None and not job.own:
                return job
            self._cv.wait(self._timeout())

    def _loop(self) -> None:
        while True:
            with self._cv:
                job = self._next()
                if job is None:
                    return
                self._take(job)
            t0 = time.perf_counter()
            try:
                job.result = job.work()
            except BaseException as exc:  # the caller's thread raises it
                job.error = exc
            self._finished(job.stream, job.seq, time.perf_counter() - t0)
            job.done.set()


class _Job:
    __slots__ = ("stream", "seq", "after", "work", "arrived", "done", "result", "error", "own")

    def __init__(self, stream: str, seq: int, after: int, work: Any, arrived: float) -> None:
        self.stream, self.seq, self.after, self.work, self.arrived = stream, seq, after, work, arrived
        self.own = False  # run on its caller's thread when its turn comes (short calls), not the runner's
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


def _writable(a: Any) -> Any:
    # arrays that arrive zero-copy are read-only views of a transfer buffer; the device keeps its own copy
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        return a.copy()
    return a


def _own_samples(samples: Any) -> Any:
    """Samples whose arrays this process owns (ones that arrived zero-copy are read-only views)."""
    if samples is None or not hasattr(samples, "x"):
        return samples
    return type(samples)([_writable(x) for x in samples.x],
                         [{k: _writable(v) for k, v in p.items()} for p in samples.params],
                         [_writable(y) for y in samples.y])


def twin_payload(twin: torch.nn.Module) -> dict[str, Any]:
    """What rebuilds ``twin`` elsewhere: kind, config, spec, physics model and tensors (never the object)."""
    model = getattr(twin, "model", None)
    floats = [t for t in twin.state_dict().values() if t.is_floating_point()]
    dtype = str(floats[0].dtype).removeprefix("torch.") if floats else None
    return {"kind": twin.kind, "config": twin.config(), "spec": twin.spec, "model": model, "dtype": dtype,
            "state": {k: v.detach().cpu() for k, v in twin.state_dict().items()}}


class TwinWorker:
    """A digital twin on its own: forward, vector-Jacobian product at measured inputs, and fit.

    Built from a twin's description (kind, spec, model, config, state, dtype), or blank (``kind=None``):
    a blank worker answers every VJP with None until :meth:`load` gives it a whole twin, so its process
    can start while the device it will serve is still connecting.
    """

    def __init__(self, kind: str | None = None, spec: DeviceSpec | None = None, model=None,
                 config: Mapping[str, Any] | None = None, state: Mapping[str, torch.Tensor] | None = None,
                 dtype: str | None = None) -> None:
        self.twin = None
        self.version: str | None = None
        self._built: tuple | None = None
        if kind is not None:
            self._build(kind, spec, model, config, dtype)
            if state is not None:
                self.twin.load_state_dict(dict(state))
            self.version = twin_digest(self.twin.state_dict())

    def _build(self, kind: str, spec: DeviceSpec, model, config: Mapping[str, Any] | None, dtype: str | None):
        from pnn_cluster.twins.models import build_twin

        cfg = dict(config or {})
        if "hidden" in cfg:
            cfg["hidden"] = tuple(cfg["hidden"])
        self.twin = build_twin(kind, spec, model, **cfg)
        if dtype is not None:
            # this process's default dtype may differ from the trainer's; the twin keeps the trainer's
            self.twin.to(getattr(torch, dtype))
        # what fit() may move; between fits the twin only supplies Jacobians and stays frozen
        self._learnable = {n for n, p in self.twin.named_parameters() if p.requires_grad}
        self.twin.requires_grad_(False)
        self._built = (kind, repr(dict(config or {})), dtype)

    @classmethod
    def from_twin(cls, twin: torch.nn.Module) -> TwinWorker:
        p = twin_payload(twin)
        return cls(p["kind"], p["spec"], p["model"], p["config"], p["state"], p["dtype"])

    def load(self, payload: Mapping[str, Any]) -> str:
        """Take another state of the twin (a refit elsewhere, the latest after a restart), or a whole twin."""
        if self._built != (payload["kind"], repr(dict(payload.get("config") or {})), payload.get("dtype")):
            self._build(payload["kind"], payload["spec"], payload.get("model"), payload.get("config"),
                        payload.get("dtype"))
        self.twin.load_state_dict(dict(payload["state"]))
        self.version = twin_digest(self.twin.state_dict())
        return self.version

    def _dtype(self) -> torch.dtype:
        floats = [t for t in self.twin.state_dict().values() if t.is_floating_point()]
        return floats[0].dtype if floats else torch.get_default_dtype()

    def _tensors(self, x, params):
        dtype = self._dtype()
        return (torch.as_tensor(_writable(np.asarray(x)), dtype=dtype),
                {k: torch.as_tensor(_writable(np.asarray(v)), dtype=dtype) for k, v in params.items()})

    @torch.no_grad()
    def forward(self, x: np.ndarray, params: Mapping[str, np.ndarray]) -> np.ndarray:
        xt, pt = self._tensors(x, params)
        return self.twin(xt, pt).numpy()

    def vjp(self, x: np.ndarray, params: Mapping[str, np.ndarray], grad_y: np.ndarray, need_x: bool = True,
            need: Sequence[str] | None = None, version: str | None = None, output: bool = False
            ) -> tuple | None:
        """``(d twin / d x)^T g`` and ``(d twin / d params)^T g`` at the measured ``x``, as numpy.

        With ``version``, None when this copy holds another state (it was restarted from an older one).
        With ``output``, the twin's prediction at ``x`` comes third (what drift monitoring compares with
        the measurement).
        """
        if self.twin is None or (version is not None and version != self.version):
            return None
        xt, pt = self._tensors(x, params)
        gy = torch.as_tensor(_writable(np.asarray(grad_y)), dtype=xt.dtype)
        gx, gp, *y = twin_vjp(self.twin, xt, pt, gy, need_x=need_x, need=need, output=output)
        grads = (None if gx is None else gx.numpy()), {k: v.numpy() for k, v in gp.items()}
        return (*grads, y[0].numpy()) if output else grads

    def vjp_packed(self, call: tuple):
        """:meth:`vjp` with its arguments in one tuple (one object to serialise per call)."""
        return self.vjp(*call)

    def fit(self, train, val=None, **kw: Any) -> dict[str, Any]:
        """Fit this twin (a fresh copy of its calibration) to ``train`` samples; returns the fit figures."""
        try:
            return self._fit(self.twin, train, val, **kw)
        finally:
            self.version = twin_digest(self.twin.state_dict())

    def _fit(self, twin: torch.nn.Module, train, val=None, learn: set[str] | None = None, **kw: Any
             ) -> dict[str, Any]:
        from pnn_cluster.twins.fit import fit_twin

        kw.setdefault("progress", False)
        train, val = _own_samples(train), _own_samples(val)
        if kw.get("stop") is not None:
            kw["stop"] = _own_samples(kw["stop"])
        learn = self._learnable if learn is None else learn
        for n, p in twin.named_parameters():
            p.requires_grad_(n in learn)
        default = torch.get_default_dtype()
        # fit_twin builds its sample tensors in the default dtype; set for this fit, on this thread's behalf
        # (a refinement runs beside VJPs, which convert their inputs to the twin's dtype themselves)
        torch.set_default_dtype(self._dtype())
        try:
            res = fit_twin(twin, train, val, **kw)
            return {**res.as_dict(), "history": [float(v) for v in res.history]}
        finally:
            torch.set_default_dtype(default)
            twin.requires_grad_(False)

    def refine(self, train, val, drifting_only: bool = True, **kw: Any) -> dict[str, Any]:
        """Fit a copy of this twin, warm-started from it, to fresh samples; this copy is left as it is.

        The copy in use goes on serving VJPs meanwhile (a twin actor runs this in its own concurrency
        group), and the trainer swaps the result in at a step boundary, if it is better. Returns the fit's
        figures, this twin's NMSE on the same held-out ``val`` (``nmse_before``: the refit is accepted
        only if it is lower), and the refined twin's state (``payload``).

        ``drifting_only``: move only what drifts, the physics model's calibration constants (an MLP twin
        has none: all its weights move), and keep the output normalisation. Samples measured along
        training's path cover a small region; fitted to them, a residual twin's couplings and network
        would bend to that region and lose the rest of the range they were calibrated on.
        """
        from pnn_cluster.twins.fit import evaluate_twin

        twin = copy.deepcopy(self.twin)
        val = _own_samples(val)
        before = evaluate_twin(self.twin, val)
        learn = None
        if drifting_only:
            calibration = {n for n in self._learnable if n.startswith(CALIBRATION_PREFIX)}
            learn = calibration or None
            kw["output_stats"] = False
        figures = self._fit(twin, train, val, learn=learn, **kw)
        return {"figures": figures, "nmse_before": float(before), "payload": twin_payload(twin)}

    def payload(self) -> dict[str, Any]:
        return twin_payload(self.twin)

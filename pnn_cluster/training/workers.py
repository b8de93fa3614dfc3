"""The plain classes that Ray actors wrap: one owns a device, one a twin, one the training loop.

Each works in-process as it is (the unit tests and the in-process pipeline
use them directly); ``actors/`` only adds ``ray.remote`` with placement and
restart options. None of them holds anything that cannot be rebuilt from a
picklable description, because a restarted actor rebuilds itself from its
constructor arguments:

- :class:`DeviceWorker` builds its device from a :class:`DeviceConfig` and
  opens the connection itself, in its own process (an instrument connection
  cannot be pickled or shared), then serialises every access to it.
- :class:`TwinWorker` rebuilds a twin from its kind, config and state_dict.
- :class:`TrainerWorker` owns the model and the optimizer and runs
  :func:`~pnn_cluster.experiments.run_method` with the devices and executor it
  is given, saving a checkpoint when a stage runs out of replicas.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pnn_cluster.devices import SYSTEMS, Device, DeviceSpec, Imperfections, make_device
from pnn_cluster.pat import twin_vjp
from pnn_cluster.training.faults import checkpoint_on_failure

__all__ = ["DeviceConfig", "DeviceWorker", "TwinWorker", "TrainerWorker", "params_version", "twin_payload"]

log = logging.getLogger(__name__)

_INSTRUMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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


@dataclass(frozen=True)
class DeviceConfig:
    """How to build one device, in the process that will own it.

    system: a simulated system (``"shg"``, ``"circuit"``, ...) or a device class as
        ``"package.module:ClassName"``, constructed with ``options`` as keyword arguments.
    imperfections: for simulated systems only.
    instrument: the name a lab PC declared when it joined the cluster; the device
        runs on that PC. None: anywhere (the local default).
    name: how logs and warnings call this device (default: the system name).
    """

    system: str
    options: Mapping[str, Any] = field(default_factory=dict)
    imperfections: Imperfections | None = None
    instrument: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.system, str) or not self.system:
            raise ValueError(f"DeviceConfig.system: must be a non-empty string, got {self.system!r}")
        if ":" not in self.system and self.system not in SYSTEMS:
            raise ValueError(f"DeviceConfig.system: unknown system {self.system!r}; allowed: one of "
                             f"{sorted(SYSTEMS)} or a class as 'package.module:ClassName'")
        if ":" in self.system and self.imperfections is not None:
            raise ValueError(f"DeviceConfig.imperfections: only simulated systems take imperfections; "
                             f"{self.system!r} is a device class")
        if not isinstance(self.options, Mapping):
            raise ValueError(f"DeviceConfig.options: must be a mapping of keyword arguments, "
                             f"got {type(self.options).__name__}")
        if self.instrument is not None and not (isinstance(self.instrument, str)
                                                and _INSTRUMENT.match(self.instrument)):
            raise ValueError(f"DeviceConfig.instrument: {self.instrument!r} is not a valid instrument name; "
                             "allowed: letters, digits, '.', '_' and '-', starting with a letter or digit")

    @property
    def label(self) -> str:
        return self.name or self.instrument or self.system

    def build(self) -> Device:
        """Construct the device (no I/O: constructors never open connections)."""
        if ":" in self.system:
            module, _, cls_name = self.system.partition(":")
            try:
                cls = getattr(importlib.import_module(module), cls_name)
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"DeviceConfig.system: cannot load {self.system!r} ({exc})") from None
            device = cls(**dict(self.options))
            if not isinstance(device, Device):
                raise TypeError(f"DeviceConfig.system: {self.system!r} built a {type(device).__name__}, "
                                "not a pnn_cluster Device")
            return device
        return make_device(self.system, imperfections=self.imperfections, **dict(self.options))


class DeviceWorker:
    """The one owner of a device: builds it, connects it, and serialises every call to it.

    ``forward(x, params, version)`` is the call the pipeline makes. With
    ``params`` the parameters are written first (an idempotent write). Without
    them, ``version`` says which parameters the caller means: if the device does
    not hold them (its process was restarted, or someone else wrote others)
    it measures nothing and returns ``None``, and the caller sends them again.
    A measurement is therefore never taken with parameters nobody asked for.

    Calls may arrive on several threads at once; the device itself sees one
    at a time, in the order each caller sent them (``ticket``).
    """

    #: longest a call waits for an earlier call of its caller that has not arrived
    ORDER_WAIT_S = 1.0

    def __init__(self, device: DeviceConfig | Device) -> None:
        if isinstance(device, DeviceConfig):
            self.config: DeviceConfig | None = device
            self.device = device.build()
        elif isinstance(device, Device):
            self.config, self.device = None, device
        else:
            raise TypeError(f"DeviceWorker: device must be a DeviceConfig or a Device, got {type(device).__name__}")
        self.device.connect()
        self.name = self.config.label if self.config else self.device.spec.name
        self.incarnation = uuid.uuid4().hex[:12]
        self._hashed: tuple[int, str | None] = (0, None)
        self._lock = threading.RLock()
        self._turn = threading.Condition()
        self._served: dict[str, int] = {}

    # -- the measurement path -----------------------------------------------------

    def forward(self, x: np.ndarray, params: Mapping[str, Any] | None = None, version: str | None = None,
                ticket: tuple[str, int, int] | None = None) -> np.ndarray | None:
        x = _writable(x)
        with self._in_turn(ticket), self._lock:
            if params is not None:
                self.device.set_params({k: _writable(v) for k, v in params.items()})
            elif version is not None and version != self.version:
                return None
            return self.device.forward(x)

    def set_params(self, params: Mapping[str, Any]) -> str:
        with self._lock:
            self.device.set_params({k: _writable(v) for k, v in params.items()})
            return self.version

    @contextlib.contextmanager
    def _in_turn(self, ticket: tuple[str, int, int] | None) -> Iterator[None]:
        """Serve a caller's calls in the order it sent them.

        ``ticket`` is ``(caller stream, sequence number, after)``, ``after``
        being the caller's previous call if it was still on its way when this
        one was sent (0 if not). Calls may start on several threads at once (an
        actor overlaps one call's transfer with another's measurement), and
        threads start in any order; waiting for ``after`` keeps a write ahead
        of the measurements meant for it, and each measurement's noise where a
        one-at-a-time device would draw it. A restarted process never sees
        the calls its predecessor served: it waits for them at most
        ``ORDER_WAIT_S``.
        """
        if ticket is None:
            yield
            return
        stream, seq, after = ticket
        with self._turn:
            in_turn = self._turn.wait_for(lambda: self._served.get(stream, 0) >= after, timeout=self.ORDER_WAIT_S)
            if not in_turn:
                log.info("%s: call %d of %s waited %.1f s for call %d, served before a restart; going on",
                         self.name, seq, stream, self.ORDER_WAIT_S, after)
        try:
            yield
        finally:
            with self._turn:
                self._served[stream] = max(self._served.get(stream, 0), seq)
                self._turn.notify_all()

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

    def health(self) -> dict[str, Any]:
        return {**self.device.health(), "device": self.name, "incarnation": self.incarnation,
                "pid": os.getpid(), "host": socket.gethostname(), "params_version": self.version}

    def identity(self) -> dict[str, Any]:
        return self.device.identity()

    def close(self) -> None:
        with self._lock:
            self.device.close()


def _writable(a: Any) -> Any:
    # arrays that arrive zero-copy are read-only views of a transfer buffer; the device keeps its own copy
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        return a.copy()
    return a


def twin_payload(twin: torch.nn.Module) -> dict[str, Any]:
    """What rebuilds ``twin`` elsewhere: kind, config, spec, physics model and tensors (never the object)."""
    model = getattr(twin, "model", None)
    floats = [t for t in twin.state_dict().values() if t.is_floating_point()]
    dtype = str(floats[0].dtype).removeprefix("torch.") if floats else None
    return {"kind": twin.kind, "config": twin.config(), "spec": twin.spec, "model": model, "dtype": dtype,
            "state": {k: v.detach().cpu() for k, v in twin.state_dict().items()}}


class TwinWorker:
    """A digital twin on its own: forward, vector-Jacobian product at measured inputs, and fit."""

    def __init__(self, kind: str, spec: DeviceSpec, model=None, config: Mapping[str, Any] | None = None,
                 state: Mapping[str, torch.Tensor] | None = None, dtype: str | None = None) -> None:
        from pnn_cluster.twins.models import build_twin

        cfg = dict(config or {})
        if "hidden" in cfg:
            cfg["hidden"] = tuple(cfg["hidden"])
        self.twin = build_twin(kind, spec, model, **cfg)
        if dtype is not None:
            # this process's default dtype may differ from the trainer's; the twin keeps the trainer's
            self.twin.to(getattr(torch, dtype))
        if state is not None:
            self.twin.load_state_dict(dict(state))
        # what fit() may move; between fits the twin only supplies Jacobians and stays frozen
        self._learnable = {n for n, p in self.twin.named_parameters() if p.requires_grad}
        self.twin.requires_grad_(False)

    @classmethod
    def from_twin(cls, twin: torch.nn.Module) -> TwinWorker:
        p = twin_payload(twin)
        return cls(p["kind"], p["spec"], p["model"], p["config"], p["state"], p["dtype"])

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
            need: Sequence[str] | None = None) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """``(d twin / d x)^T g`` and ``(d twin / d params)^T g`` at the measured ``x``, as numpy."""
        xt, pt = self._tensors(x, params)
        gy = torch.as_tensor(_writable(np.asarray(grad_y)), dtype=xt.dtype)
        gx, gp = twin_vjp(self.twin, xt, pt, gy, need_x=need_x, need=need)
        return (None if gx is None else gx.numpy()), {k: v.numpy() for k, v in gp.items()}

    def fit(self, train, val=None, **kw: Any) -> dict[str, Any]:
        """Fit this twin (a fresh copy of its calibration) to ``train`` samples; returns the fit figures."""
        from pnn_cluster.twins.fit import fit_twin

        kw.setdefault("progress", False)
        for n, p in self.twin.named_parameters():
            p.requires_grad_(n in self._learnable)
        default = torch.get_default_dtype()
        torch.set_default_dtype(self._dtype())  # fit_twin builds its sample tensors in the default dtype
        try:
            return fit_twin(self.twin, train, val, **kw).as_dict()
        finally:
            torch.set_default_dtype(default)
            self.twin.requires_grad_(False)

    def payload(self) -> dict[str, Any]:
        return twin_payload(self.twin)


class TrainerWorker:
    """Owns the model and the optimizer and runs the loop, on devices and an executor it is given.

    ``devices`` are objects with the :class:`~pnn_cluster.devices.base.Device`
    interface (in-process devices, or proxies of device actors), one per
    physical layer of the task; the executor decides how micro-batches reach
    them. When a stage runs out of replicas the checkpoint is saved to
    ``checkpoint`` before the error propagates.
    """

    def __init__(self, devices: Sequence[Any], executor: Any = None, checkpoint: str | os.PathLike | None = None,
                 replicas: Mapping[str, Sequence[Any]] | None = None, calib_groups: int = 40,
                 on_trainer: Callable[[Any], None] | None = None) -> None:
        self.devices = list(devices)
        self.executor = executor
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.replicas = {name: list(devs) for name, devs in (replicas or {}).items()}
        if self.replicas and not callable(getattr(executor, "set_pool", None)):
            raise ValueError("TrainerWorker.replicas: the executor has no replica pools (set_pool); "
                             "use a PipelineExecutor or RayExecutor")
        self.calib_groups = calib_groups
        self.trainer = None
        self._twin_kind = "physics"
        self._on_trainer = on_trainer

    def _keep(self, trainer) -> None:
        # run_method hands the trainer over after calibration and before the first step
        self.trainer = trainer
        if self.replicas:
            self._install_replicas(trainer.model)
        if self._on_trainer is not None:
            self._on_trainer(trainer)

    def _install_replicas(self, model) -> None:
        from pnn_cluster.training.pipeline import Replica

        layers = {layer.name: layer for layer in model.physical_layers()}
        unknown = sorted(set(self.replicas) - set(layers))
        if unknown:
            raise ValueError(f"TrainerWorker.replicas: no physical layer named {unknown[0]!r}; "
                             f"layers are {sorted(layers)}")
        backend = self.executor.backend
        for name, extra in self.replicas.items():
            layer = layers[name]
            pool = [Replica(backend.handle_for(layer.device, name), name=name)]
            for j, dev in enumerate(extra, start=1):
                # every physical copy has its own imperfections, so its own twin, fitted on its own measurements
                twin = self._replica_twin(layer, dev, seed=1000 * j)
                pool.append(Replica(backend.handle_for(dev, f"{name}/{j}"), twin=twin, name=f"{name}/{j}"))
            self.executor.set_pool(name, pool)

    def _replica_twin(self, layer, device, seed: int):
        from pnn_cluster.twins import build_twin, calibrate

        if layer.mode != "pat":  # oracle differentiates the simulator itself; in silico measures only to test
            return None
        if self._twin_kind == "ideal":
            twin = build_twin("physics", device.spec, device.model())
            return twin.requires_grad_(False)
        cal = calibrate(device, kinds=(self._twin_kind,), groups=self.calib_groups, seed=seed, progress=False)
        return cal.twins[self._twin_kind].requires_grad_(False)

    def run_method(self, task, method: str, **kw: Any):
        """:func:`~pnn_cluster.experiments.run_method` on this worker's devices and executor."""
        from pnn_cluster.experiments import run_method

        self._twin_kind = kw.get("twin", "physics")
        with checkpoint_on_failure(lambda: self.trainer, self.checkpoint):
            return run_method(task, method, devices=self.devices, executor=self.executor, on_trainer=self._keep,
                              **kw)

    def status(self) -> dict[str, Any]:
        t = self.trainer
        if t is None:
            return {"state": "created", "global_step": 0, "epoch": 0, "device_samples": 0}
        return {"state": t.state, "global_step": t.global_step, "epoch": t.epoch,
                "device_samples": t.device_samples, "steps_per_epoch": t.steps_per_epoch}

"""MLflow tracking as a trainer callback: one run per ``train``, ``calibrate`` or ``demo``.

A run records what a lab needs to trust and reproduce a result:

- the full resolved configuration, as parameters and as ``config/config.yaml``;
- a snapshot of every device (spec and limits, driver, identity, calibration)
  as ``devices.json`` and as ``device.*`` tags;
- every twin fit as a nested run: NMSE against the noise floor, the fit's loss
  curve and a parity plot of twin prediction against measurement;
- per-step training metrics, buffered in memory and journaled as one
  ``log_batch`` every ``flush_every_s`` seconds, so a step pays for a few
  list appends and nothing else;
- per epoch: physical validation accuracy and loss (``val_acc``, ``val_loss``),
  and the twin-versus-device residual of each physical layer (NMSE of the
  twin's prediction against the device's measured output, on a validation
  batch): the number that says when a twin has drifted away from its device;
- a checkpoint each epoch (``checkpoints/last.pt``), from which
  ``pnn-cluster train --resume RUN_ID`` continues the same run at the same step;
- at the end of training, a training curve (PNG) and the trained parameters
  and twins as state_dict files in logged models;
- once, after training, the test split measured on the devices (``test_acc``,
  ``test_loss`` at the last step) and its confusion matrix (PNG).

Everything is recorded first in the run's local directory (``pnn-runs/...``:
a journal of every operation, the artifacts as files, the checkpoint written
atomically and fsynced) and sent to the server by one background thread
(:mod:`pnn_cluster.tracking.outbox`), through one :class:`mlflow.MlflowClient`
bound to the tracking URI given to the constructor, every call bounded. An
unreachable server is reported once and never stops or slows the training;
what it missed is uploaded when it is back, or by ``pnn-cluster sync``. No
global active run is used, so several trackers (a demo's methods, a test's
runs) never interfere.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pnn_cluster.fsio import atomic_torch_save, atomic_write, atomic_write_text
from pnn_cluster.tracking.outbox import (
    Outbox,
    RunDir,
    bound_http,
    default_runs_root,
    find_run_dir,
    is_local_id,
    new_local_id,
)
from pnn_cluster.training.trainer import Callback, Trainer
from pnn_cluster.twins.record import TwinFit

__all__ = ["MlflowCallback", "TwinFit", "resolve_tracking_uri", "twin_residuals", "device_snapshot",
           "CHECKPOINT_ARTIFACT", "CONFIG_ARTIFACT", "TWIN_VERSIONS_ARTIFACT", "load_run_checkpoint",
           "active_twin_versions", "twin_history_figure"]

#: where a run keeps its latest checkpoint and its configuration
CHECKPOINT_ARTIFACT = "checkpoints/last.pt"
CONFIG_ARTIFACT = "config/config.yaml"
#: every version of every twin of a run (fits and refits, accepted or not), rewritten whole at each new one
TWIN_VERSIONS_ARTIFACT = "twins/versions.json"
#: MLflow's limits: 100 params and 1000 metrics per batch, 6000 characters per param value
_PARAMS_PER_BATCH, _METRICS_PER_BATCH, _PARAM_CHARS, _TAG_CHARS = 100, 1000, 6000, 5000


def resolve_tracking_uri(cli_uri: str | None = None, config_uri: str | None = None,
                         env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None) -> str:
    """``--tracking-uri``, else the configuration's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``,
    else ``sqlite:///mlflow.db`` in the working directory."""
    env = os.environ if env is None else env
    uri = cli_uri or config_uri or env.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


# -- what a run records about devices and twins -------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, str | int | float | bool):
        return x
    return str(x)


def twin_calibration(twin: Any) -> dict[str, Any]:
    """The twin's fitted calibration constants (physics kinds), or its kind alone."""
    if twin is None:
        return {}
    out: dict[str, Any] = {"kind": getattr(twin, "kind", type(twin).__name__)}
    model = getattr(twin, "model", None)
    if model is not None and hasattr(model, "calibration_values"):
        out["constants"] = model.calibration_values()
    return out


def device_snapshot(device: Any, driver: Mapping[str, Any] | None = None, placement: Mapping[str, Any] | None = None,
                    twin: Any = None, fit: TwinFit | None = None) -> dict[str, Any]:
    """Spec and limits, driver, identity, current parameters and calibration of one device, JSON-safe."""
    try:
        snap = dict(device.snapshot())
    except Exception as exc:  # a remote device not yet connected has no spec; record what we know
        snap = {"identity": device.identity(), "error": f"no snapshot: {exc}"}
    snap["driver"] = dict(driver) if driver else {"class": snap.get("identity", {}).get("driver", "?")}
    if placement:
        snap["placement"] = dict(placement)
    cal = twin_calibration(twin)
    if fit is not None:
        cal["fit"] = fit.as_dict()
    if cal:
        snap["calibration"] = cal
    return _jsonable(snap)


def _device_tags(name: str, snap: Mapping[str, Any]) -> dict[str, str]:
    ident = snap.get("identity", {})
    drv = snap.get("driver", {})
    spec = snap.get("spec", {})
    tags = {f"device.{name}.driver": str(drv.get("kind") or drv.get("class") or ident.get("driver", "?"))}
    for key in ("system", "address", "resource", "serial"):
        if key in drv or key in ident:
            tags[f"device.{name}.{key}"] = str(drv.get(key, ident.get(key)))
    if "source" in drv:
        tags[f"device.{name}.resource"] = f"{drv['source'].get('resource')} -> {drv['sink'].get('resource')}"
    if spec:
        tags[f"device.{name}.io"] = f"{spec['input']['size']} -> {spec['output']['size']}"
        tags[f"device.{name}.params"] = ", ".join(f"{p['name']}{tuple(p['shape'])} in [{p['low']:.4g}, {p['high']:.4g}]"
                                                  f"{' ' + p['unit'] if p.get('unit') else ''}"
                                                  for p in spec.get("params", []))
    if "imperfections" in ident:
        tags[f"device.{name}.seed"] = str(ident["imperfections"].get("seed"))
    cal = snap.get("calibration", {})
    if cal.get("kind"):
        tags[f"device.{name}.twin"] = str(cal["kind"])
    return {k: v[:_TAG_CHARS] for k, v in tags.items()}


@torch.no_grad()
def twin_residuals(stack: Any, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """How far each twin is from its device, on the inputs the device sees in this stack.

    Runs ``x`` through the stack with every physical layer measured (mode
    ``pat``). At each physical layer with a twin: ``nmse`` is the twin's
    prediction at the same input and parameters against the measurement, and
    ``noise_floor`` the device against itself (the same batch measured again),
    in the same units: a twin cannot do better than the floor, and a ratio that
    grows over a training says the device has drifted away from its twin.
    Layers without a twin (``oracle``) are skipped.
    """
    from pnn_cluster.layers import PhysicalLayer
    from pnn_cluster.twins.collect import nmse

    out: dict[str, dict[str, float]] = {}
    h = x
    with stack.mode_as("pat"):
        for m in stack:
            if isinstance(m, PhysicalLayer):
                y = m(h)
                if m.twin is not None:
                    again = m.measure(h)
                    var = y.double().var().clamp_min(1e-30)
                    out[m.name] = {"nmse": nmse(m.twin(h, dict(m.theta.items())), y),
                                   "noise_floor": float(((again.double() - y.double()) ** 2).mean() / 2 / var)}
                h = y
            else:
                h = m(h)
    return out


def parity_figure(twin: Any, samples: Any, title: str, max_points: int = 4000):
    """Twin prediction against measurement for held-out samples (one repeat of each)."""
    from matplotlib.figure import Figure

    preds, meas = [], []
    dtype = torch.get_default_dtype()
    with torch.no_grad():
        for x, p, y in zip(samples.x, samples.params, samples.y):
            pr = twin(torch.as_tensor(x, dtype=dtype), {k: torch.as_tensor(v, dtype=dtype) for k, v in p.items()})
            preds.append(pr.double().numpy().reshape(-1))
            meas.append(np.asarray(y[0]).reshape(-1))
    pred, target = np.concatenate(preds), np.concatenate(meas)
    if len(pred) > max_points:
        keep = np.random.default_rng(0).choice(len(pred), max_points, replace=False)
        pred, target = pred[keep], target[keep]
    fig = Figure(figsize=(4.2, 4.2), dpi=110)
    ax = fig.add_subplot()
    ax.scatter(target, pred, s=3, alpha=0.35, linewidths=0)
    lo, hi = float(min(target.min(), pred.min())), float(max(target.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
    ax.set_xlabel("measured on the device")
    ax.set_ylabel("twin prediction")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def curve_figure(steps: Mapping[str, list[tuple[int, float]]], epochs: Mapping[str, list[tuple[int, float]]]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.4), dpi=110)
    ax1, ax2 = fig.subplots(1, 2)
    for name, pts in steps.items():
        if pts:
            s, v = zip(*pts)
            ax1.plot(s, v, lw=0.8, alpha=0.6, label=f"{name} (step)")
    for name, pts in epochs.items():
        if not pts:
            continue
        s, v = zip(*pts)
        (ax2 if "acc" in name else ax1).plot(s, v, marker="o", label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("step")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=7)
    fig.suptitle("training curve (validation accuracy measured on the physical devices)", fontsize=9)
    fig.tight_layout()
    return fig


def active_twin_versions(versions: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The twin in use on each device: its latest accepted version."""
    active: dict[str, int] = {}
    for v in versions:
        if v.get("accepted", True):
            device = str(v["device"])
            active[device] = max(active.get(device, -1), int(v["version"]))
    return active


def twin_state_artifact(device: str, version: int) -> str:
    """Where a run keeps the tensors of one twin version (``circuit/1`` -> ``twins/circuit_1/v3.pt``)."""
    return f"twins/{device.replace('/', '_')}/v{int(version)}.pt"


def twin_state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """A digest of a twin's tensors (names, dtypes, shapes, values): two versions with one hash are one twin."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _drift_device(key: str) -> str | None:
    # drift/<device>/ratio, where a replica's device has a slash of its own (circuit/1)
    head, tail = "drift/", "/ratio"
    if key.startswith(head) and key.endswith(tail) and len(key) > len(head) + len(tail):
        return key[len(head):-len(tail)]
    return None


def twin_history_figure(history: Mapping[str, list[tuple[int, float]]], versions: Sequence[Mapping[str, Any]]):
    """Each twin's NMSE over its device's noise floor along a training, one panel per device.

    The curve is the metric ``drift/<device>/ratio`` (1: the twin is as good as the device's own noise lets
    anything be). A solid vertical line is a version swapped in at that step, a dotted one a refit recorded
    but not swapped in (it was not better than the twin in use); each is labelled ``v<k> <source>``. The
    horizontal lines are the ratio the device's first twin (version 0) had at calibration, and twice it:
    how far the twin in use has moved from where the training started.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter
    from matplotlib.transforms import blended_transform_factory

    curves = {d: pts for k, pts in history.items() if (d := _drift_device(k)) is not None and pts}
    devices = list(curves) + sorted({str(v["device"]) for v in versions} - set(curves))
    fig = Figure(figsize=(8, 1.2 + 2.2 * max(1, len(devices))), dpi=110)
    axes = fig.subplots(max(1, len(devices)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, device in zip(axes, devices):
        if device in curves:
            s, r = zip(*curves[device])
            ax.plot(s, r, lw=0.9, color="C0", label="twin NMSE / noise floor")
        mine = sorted((v for v in versions if str(v["device"]) == device), key=lambda v: int(v["version"]))
        base = next((v.get("ratio_to_floor") for v in mine if int(v["version"]) == 0), None)
        if isinstance(base, int | float) and math.isfinite(base) and base > 0:
            ax.axhline(base, color="0.35", lw=0.8, ls="--", label=f"at calibration ({base:.2f})")
            ax.axhline(2 * base, color="0.35", lw=0.8, ls="-.", label="2 x calibration")
        on_x = blended_transform_factory(ax.transData, ax.transAxes)
        for v in mine:
            k = int(v["version"])
            if k == 0:
                continue  # the calibration is the horizontal line
            accepted = bool(v.get("accepted", True))
            step = int(v.get("step", 0))
            ax.axvline(step, color="C3" if accepted else "0.45", lw=0.9, ls="-" if accepted else ":",
                       gid=f"twin-version:{device}:v{k}")
            ax.text(step, 0.98, f" v{k} {v.get('source', '?')}", transform=on_x, rotation=90, va="top",
                    ha="right", fontsize=6, color="C3" if accepted else "0.45")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # 1.5, not 1.5 x 10^0
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_ylabel("NMSE / floor")
        ax.set_title(device, fontsize=8, loc="left")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    axes[-1].set_xlabel("step")
    fig.suptitle("twins against their devices during training (solid: version swapped in; dotted: refit not "
                 "kept)", fontsize=9)
    fig.tight_layout()
    return fig


def confusion_figure(pred: np.ndarray, target: np.ndarray, title: str):
    from matplotlib.figure import Figure

    n = int(max(pred.max(initial=0), target.max(initial=0)) + 1)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (target.astype(np.int64), pred.astype(np.int64)), 1)
    fig = Figure(figsize=(4.6, 4.2), dpi=110)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def flatten_params(tree: Any, prefix: str = "") -> dict[str, str]:
    from pnn_cluster.config import flatten

    return {k: ("" if v is None else str(v))[:_PARAM_CHARS] for k, v in flatten(tree, prefix).items()}


def tracking_client(uri: str):
    """An :class:`mlflow.MlflowClient` whose HTTP calls are bounded (seconds, not minutes)."""
    from mlflow import MlflowClient

    bound_http()
    return MlflowClient(tracking_uri=uri)


def _download_text(client: Any, run_id: str, artifact: str) -> str | None:
    """A run's text artifact from the server; None when it has none or cannot be asked."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="pnn-artifact-") as tmp:
            return Path(client.download_artifacts(run_id, artifact, tmp)).read_text()
    except Exception:  # noqa: BLE001 -- no such artifact, or no server: either way, nothing to continue from
        return None


def load_run_checkpoint(client: Any, run_id: str, dest: str | os.PathLike) -> Path | None:
    """Download a run's latest checkpoint into ``dest``; None when the run has none yet."""
    names = {f.path for f in client.list_artifacts(run_id, "checkpoints")}
    if CHECKPOINT_ARTIFACT not in names:
        return None
    return Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(dest)))


#: a training's first fit (TwinFit.source ``fit``) is its twin's calibration
_VERSION_SOURCE = {"fit": "calibration"}


# -- the callback ---------------------------------------------------------------------------------------------


class MlflowCallback(Callback):
    """Tracks a run in MLflow; pass it to :class:`Trainer` (or ``run_method``) as a callback.

    Everything is recorded in a local run directory first (``runs_root``,
    default ``PNN_RUNS_DIR`` or ``./pnn-runs``; or ``run_dir``, an existing
    one to continue) and sent to the server by an :class:`~pnn_cluster.tracking.outbox.Outbox`:
    the training never waits for the server, an outage is reported once, and
    what could not be sent is uploaded when the server is back or by
    ``pnn-cluster sync``. Checkpoints are written to the run directory,
    atomically and fsynced, before they are uploaded.

    ``run_id`` resumes an existing run (metrics continue at the trainer's step);
    ``parent_run_id`` makes this run a child (a demo's methods). Use it as a
    context manager, or call :meth:`end`, so the run is closed with the right
    status (FINISHED, FAILED, or KILLED on Ctrl-C). ``start_wait_s`` bounds
    the wait for the server to create the run, ``end_wait_s`` the wait for the
    last uploads at the end.
    """

    def __init__(self, tracking_uri: str, experiment: str = "pnn-cluster", run_name: str | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
                 config: Mapping[str, Any] | None = None, flush_every_s: float = 10.0, checkpoint_every: int = 1,
                 residual_batch: int = 256, log_models: bool = True, command: str = "train",
                 start_time: float | None = None, run_dir: str | os.PathLike | None = None,
                 runs_root: str | os.PathLike | None = None, start_wait_s: float = 10.0, end_wait_s: float = 15.0,
                 retry_every_s: float = 15.0) -> None:
        self.tracking_uri = tracking_uri
        self.client = tracking_client(tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self._run_id = run_id
        self.resuming = run_id is not None or run_dir is not None
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.config = dict(config) if config is not None else None
        self.flush_every_s = float(flush_every_s)
        self.checkpoint_every = int(checkpoint_every)
        self.residual_batch = int(residual_batch)
        self.log_models = log_models
        self.command = command
        self.start_time = start_time
        self.runs_root = Path(runs_root) if runs_root is not None else default_runs_root()
        self._run_dir_arg = run_dir
        self.start_wait_s, self.end_wait_s, self.retry_every_s = start_wait_s, end_wait_s, retry_every_s
        self.dir: RunDir | None = None
        self.outbox: Outbox | None = None
        self.wait_s = 0.0  # time this process spent waiting for the tracking server
        self.left_unsent = 0
        self._buffer: list[tuple[str, float, int, int]] = []
        self._last_flush = time.monotonic()
        self._devices_logged = False
        self._ended = False
        self.twin_fits: dict[str, TwinFit] = {}
        #: every version of every twin (``twins/versions.json``); a resumed run starts from what it had
        self.twin_versions: list[dict[str, Any]] = []
        self._twin_versions_lock = threading.Lock()  # a refit may be recorded from another thread
        self._metric_keys: set[str] = set()  # what this process logged: which figures the run can draw

    # -- the run ------------------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The server's id of the run, or its local id (``local-...``) while the server has not created it."""
        self.start()
        if is_local_id(self._run_id):
            self._run_id = self.outbox._ids.get(self._run_id, self._run_id)
        return self._run_id

    @property
    def run_dir(self) -> Path:
        self.start()
        return self.dir.path

    @property
    def resume_hint(self) -> str:
        """What ``pnn-cluster train --resume`` takes to continue this run: its id, or its directory."""
        rid = self.run_id
        return str(self.dir.path) if is_local_id(rid) else rid

    def _open(self) -> None:
        if self._run_dir_arg is not None:
            self.dir = RunDir.open(self._run_dir_arg)
            meta = self.dir.meta()
            self._run_id = self._run_id or self.dir.run_id
            self.experiment = meta.get("experiment", self.experiment)
        elif self._run_id is not None and (found := find_run_dir(self._run_id, self.runs_root)) is not None:
            self.dir = found  # this machine has the run's directory: continue it, journal and all
        else:
            self.dir = RunDir.create(self.runs_root, self.run_name or self.command,
                                     {"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                                      "command": self.command, "run_name": self.run_name, "run_id": self._run_id})
        self.dir.lock()
        self.outbox = Outbox(self.dir, self.client, self.tracking_uri, retry_every_s=self.retry_every_s)

    def start(self) -> str:
        """Create the run (or reopen the one being resumed); idempotent."""
        if self.dir is not None:
            return self._run_id
        self._open()
        if self.resuming:
            self.outbox.submit({"op": "resume_run", "run": self._run_id})
            self.dir.update_meta(resumed=int(self.dir.meta().get("resumed", 0)) + 1)
            self._load_twin_versions()
            return self._run_id
        local = new_local_id()
        tags = {"pnn.command": self.command, **self.tags, "pnn.run_dir": str(self.dir.path)}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        start_ms = int((self.start_time if self.start_time is not None else time.time()) * 1000)
        self.dir.update_meta(run_id=local)
        done, rid = self._wait(lambda: self.outbox.call(
            {"op": "create_run", "run": local, "experiment": self.experiment, "run_name": self.run_name,
             "start_time": start_ms, "tags": tags}, self.start_wait_s))
        self._run_id = rid if done and rid else local
        if done and rid:
            self.dir.update_meta(run_id=rid)
        if self.config is not None:
            self.log_config(self.config)
        return self._run_id

    def _wait(self, fn):
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            self.wait_s += time.monotonic() - t0

    def end(self, status: str = "FINISHED") -> None:
        if self._ended or self.dir is None:
            return
        self._ended = True
        try:
            self.flush()
            self.outbox.submit({"op": "set_terminated", "run": self._run_id, "status": status,
                                "end_time": int(time.time() * 1000)})
            self.dir.sync()
            self.left_unsent = self._wait(lambda: self.outbox.close(self.end_wait_s))
            self.dir.update_meta(status=status, run_id=self.run_id)
            if self.left_unsent:
                print(f"pnn-cluster: {self.left_unsent} tracking operation(s) of run {self.run_id} not uploaded "
                      f"yet; they are kept in {self.dir.path}: `pnn-cluster sync {self.dir.path}` uploads them",
                      file=sys.stderr, flush=True)
        finally:
            self.dir.unlock()

    def __enter__(self) -> MlflowCallback:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        if exc_type is not None and self.dir is not None:
            self.set_tags({"pnn.error": f"{exc_type.__name__}: {exc}"[:_TAG_CHARS]})
        self.end(status)

    # -- parameters, tags, artifacts ------------------------------------------------------------------------

    def _submit(self, op: dict[str, Any]) -> None:
        self.start()
        self.outbox.submit(op)

    def log_params(self, params: Mapping[str, Any], run_id: str | None = None) -> None:
        if self.resuming and run_id is None:
            return  # parameters of a run are immutable; a resumed run already has them
        items = [(k[:250], v) for k, v in flatten_params(params).items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._submit({"op": "log_batch", "run": run_id or self._run_id, "params": items[i:i + _PARAMS_PER_BATCH]})

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        items = [(k, str(v)[:_TAG_CHARS]) for k, v in tags.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._submit({"op": "log_batch", "run": run_id or self._run_id, "tags": items[i:i + _PARAMS_PER_BATCH]})

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The resolved configuration: every key as a parameter, the whole as ``config/config.yaml``."""
        import yaml

        self.config = dict(config)
        self.log_params(config)
        self.log_text(yaml.safe_dump(_jsonable(config), sort_keys=False), CONFIG_ARTIFACT)

    def _artifact_path(self, artifact_file: str, run_id: str | None) -> Path:
        self.start()
        sub = artifact_file if run_id is None else f"runs/{run_id}/{artifact_file}"
        path = self.dir.file(sub)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _log_file(self, path: Path, artifact_file: str, run_id: str | None) -> None:
        parent = str(Path(artifact_file).parent)
        self._submit({"op": "log_artifact", "run": run_id or self._run_id,
                      "file": str(path.relative_to(self.dir.path)), "artifact_path": None if parent == "." else parent})

    def log_text(self, text: str, artifact_file: str, run_id: str | None = None) -> None:
        path = self._artifact_path(artifact_file, run_id)
        atomic_write_text(path, text)
        self._log_file(path, artifact_file, run_id)

    def log_figure(self, fig: Any, artifact_file: str, run_id: str | None = None) -> None:
        path = self._artifact_path(artifact_file, run_id)
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
        self._log_file(path, artifact_file, run_id)

    def log_devices(self, devices: Mapping[str, Any], drivers: Mapping[str, Mapping[str, Any]] | None = None,
                    placements: Mapping[str, Mapping[str, Any]] | None = None,
                    twins: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A snapshot of every device as ``devices.json`` and ``device.<name>.*`` tags."""
        twins = twins or {}
        snaps = {name: device_snapshot(dev, (drivers or {}).get(name), (placements or {}).get(name),
                                       twins.get(name), self.twin_fits.get(name))
                 for name, dev in devices.items()}
        self.log_text(json.dumps(snaps, indent=2), "devices.json")
        tags: dict[str, str] = {"pnn.devices": ", ".join(devices)}
        for name, snap in snaps.items():
            tags.update(_device_tags(name, snap))
        self.set_tags(tags)
        self._devices_logged = True
        return snaps

    def log_twin_fit(self, fit: TwinFit, params: Mapping[str, Any] | None = None, step: int = 0) -> str:
        """A nested run for one twin fit: its figures, its loss curve and a parity plot (returns its local id).

        In a training, the fit is also the device's next twin version (0 at the start; see
        :meth:`log_twin_version`), taking over at ``step``. ``calibrate`` fits several kinds of one device
        side by side: alternatives, not versions, so it records none.
        """
        self.twin_fits[fit.device] = fit
        cid = new_local_id()
        tags = {"mlflow.parentRunId": self._run_id or self.run_id, "pnn.command": "twin-fit",
                "pnn.device": fit.device, "pnn.twin": fit.kind}
        self._submit({"op": "create_run", "run": cid, "experiment": self.experiment,
                      "run_name": f"twin {fit.device} ({fit.kind})", "start_time": int(time.time() * 1000),
                      "tags": tags})
        all_params = {"device": fit.device, "kind": fit.kind, "source": fit.source, **(params or {})}
        self._submit({"op": "log_batch", "run": cid,
                      "params": [(k, str(v)[:_PARAM_CHARS]) for k, v in all_params.items()]})
        now = int(time.time() * 1000)
        metrics = [(k, float(v), now, 0) for k, v in fit.metrics().items() if math.isfinite(float(v))]
        metrics += [("fit_loss", float(v), now, i) for i, v in enumerate(fit.history) if math.isfinite(v)]
        # kind best: every kind tried, with the early-stopping NMSE that chose between them
        metrics += [(f"candidate/{kind}/{k}", float(v), now, 0) for kind, c in fit.candidates.items()
                    for k, v in c.items() if k in ("nmse_stop", "nmse_val", "nmse_train", "best_epoch", "seconds")
                    and v is not None and math.isfinite(float(v))]
        for i in range(0, len(metrics), _METRICS_PER_BATCH):
            self._submit({"op": "log_batch", "run": cid, "metrics": metrics[i:i + _METRICS_PER_BATCH]})
        status = "FINISHED"
        try:
            if fit.val is not None and len(fit.val):
                title = (f"{fit.device}: {fit.kind} twin, NMSE {fit.nmse_val:.2e} "
                         f"({fit.ratio_to_floor:.2f} x noise floor)")
                self.log_figure(parity_figure(fit.twin, fit.val, title), "parity.png", run_id=cid)
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._submit({"op": "set_terminated", "run": cid, "status": status, "end_time": int(time.time() * 1000)})
        # the parent run carries the headline figures too, for comparing runs at a glance
        suffix = "" if self.command == "train" else f"/{fit.kind}"  # calibrate fits several kinds per device
        self.log_metrics({f"twin_nmse/{fit.device}{suffix}": fit.nmse_val,
                          f"noise_floor/{fit.device}": fit.noise_floor}, step=0, now=True)
        if self.command == "train":
            state = fit.twin.state_dict() if hasattr(fit.twin, "state_dict") else None
            self.log_twin_version(
                {"device": fit.device, "version": self.next_twin_version(fit.device), "step": int(step),
                 "source": _VERSION_SOURCE.get(fit.source, fit.source), "kind": fit.kind, "nmse": fit.nmse_val,
                 "noise_floor": fit.noise_floor, "ratio_to_floor": fit.ratio_to_floor,
                 "samples": {"device_samples": int(fit.device_samples)}, "parent": None, "accepted": True,
                 "seconds": float(fit.seconds), "state_hash": twin_state_hash(state) if state else None}, state)
        return cid

    # -- twin versions -----------------------------------------------------------------------------------------

    def next_twin_version(self, device: str) -> int:
        """The number the device's next twin version gets: 0 for its first, one more than its last after."""
        with self._twin_versions_lock:
            mine = [int(v["version"]) for v in self.twin_versions if v["device"] == device]
        return max(mine) + 1 if mine else 0

    def log_twin_version(self, record: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None = None) -> None:
        """One version of a device's twin: the calibration (0), a refit swapped in, or one not kept.

        ``record`` holds ``device``, ``version``, ``step`` (the global step it took over at), ``source``,
        ``kind``, ``nmse``, ``noise_floor``, ``ratio_to_floor``, ``samples``, ``parent``, ``accepted``,
        ``seconds`` and ``state_hash``; the run's id is added. The run's ``twins/versions.json`` is rewritten
        with every version so far (one file: the latest upload has them all) and ``state``, the twin's
        tensors, goes to ``twins/<device>/v<version>.pt``; both are written in the run directory first,
        atomically, then uploaded by the outbox. An accepted version is also the metrics
        ``twin/<device>/version`` and ``twin/<device>/ratio_to_floor`` at its step (the twin in use, step
        by step) and the tag ``pnn.twin_version.<device>``; a version not kept is in the file only.
        Recording the same device and version again replaces the record.
        """
        missing = [k for k in ("device", "version") if record.get(k) is None]
        if missing:
            raise ValueError(f"log_twin_version: the record has no {' or '.join(missing)}: {dict(record)}")
        self.start()
        rec = _jsonable(dict(record))
        device, version = str(rec["device"]), int(rec["version"])
        rec.update(device=device, version=version, step=int(rec.get("step") or 0),
                   accepted=bool(rec.get("accepted", True)), run_id=self.run_id)
        if state is not None:
            tensors = {k: v.detach().cpu() for k, v in state.items()}
            if not rec.get("state_hash"):
                rec["state_hash"] = twin_state_hash(tensors)
            artifact = twin_state_artifact(device, version)
            path = self._artifact_path(artifact, None)
            atomic_torch_save(tensors, path)
            rec["state_file"] = artifact
            self._log_file(path, artifact, None)
        with self._twin_versions_lock:  # the file written last holds every record, whichever thread wrote it
            self.twin_versions = [v for v in self.twin_versions
                                  if (v["device"], int(v["version"])) != (device, version)] + [rec]
            active = active_twin_versions(self.twin_versions).get(device)
            self.log_text(json.dumps(self.twin_versions, indent=2), TWIN_VERSIONS_ARTIFACT)
        if rec["accepted"]:
            metrics = {f"twin/{device}/version": float(version)}
            ratio = rec.get("ratio_to_floor")
            if isinstance(ratio, int | float) and math.isfinite(ratio):
                metrics[f"twin/{device}/ratio_to_floor"] = float(ratio)
            self.log_metrics(metrics, rec["step"], now=True)
        if active is not None:
            self.set_tags({f"pnn.twin_version.{device}": active})

    def _load_twin_versions(self) -> None:
        """A resumed run's twin versions, so its numbering and its file continue: from its directory, else
        (resumed on another machine) from the server, when it answers."""
        path = self.dir.file(TWIN_VERSIONS_ARTIFACT)
        text = path.read_text() if path.is_file() else None
        if text is None and not is_local_id(self._run_id):
            text = self._wait(lambda: _download_text(self.client, self._run_id, TWIN_VERSIONS_ARTIFACT))
            if text is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, text)
        try:
            records = json.loads(text) if text else []
        except ValueError:
            records = []  # a file this run cannot read is replaced by the versions it records from now on
        self.twin_versions = [dict(r) for r in records if isinstance(r, Mapping) and "device" in r and "version" in r]

    # -- metrics ---------------------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int, now: bool = False) -> None:
        """Buffer metrics for the next batched write (``now``: journal them at once)."""
        ts = int(time.time() * 1000)
        self._metric_keys.update(metrics)
        for k, v in metrics.items():
            self._buffer.append((k, float(v), ts, int(step)))
        if now:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Hand buffered metrics to the outbox as ``log_batch`` operations (``wait``: until they are sent,
        bounded by ``end_wait_s``)."""
        buf, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        if buf and self.dir is not None:
            metrics = [m for m in buf if math.isfinite(m[1])]
            for i in range(0, len(metrics), _METRICS_PER_BATCH):
                self.outbox.submit({"op": "log_batch", "run": self._run_id,
                                    "metrics": metrics[i:i + _METRICS_PER_BATCH]})
        if wait and self.outbox is not None:
            self._wait(lambda: self.outbox.drain(self.end_wait_s))

    # -- trainer hooks -------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer) -> None:
        self.start()
        self.set_tags({"pnn.start_step": trainer.global_step, "pnn.start_epoch": trainer.epoch,
                       "pnn.steps_per_epoch": trainer.steps_per_epoch})
        if not self._devices_logged and not self.resuming:
            layers = trainer.model.physical_layers()
            self.log_devices({l.name: l.device for l in layers}, twins={l.name: l.twin for l in layers})

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        # the hot path: a few appends; the journal write happens every flush_every_s seconds, the upload off thread
        ts = int(time.time() * 1000)
        step = trainer.global_step
        append = self._buffer.append
        self._metric_keys.update(metrics)
        for k, v in metrics.items():
            append((k, v, ts, step))
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = trainer.global_step
        epoch_metrics = {"epoch": metrics["epoch"], "epoch_train_loss": metrics["train_loss"],
                         "epoch_train_acc": metrics["train_acc"], "epoch_seconds": metrics["epoch_seconds"]}
        if "val_acc" in metrics:  # none without a validation split
            epoch_metrics.update(val_acc=metrics["val_acc"], val_loss=metrics["val_loss"])
        if self.residual_batch > 0:
            for name, r in self._residuals(trainer).items():
                epoch_metrics[f"twin_residual/{name}"] = r["nmse"]
                epoch_metrics[f"twin_residual_floor/{name}"] = r["noise_floor"]
        self.log_metrics(epoch_metrics, step)
        self.flush()
        last = trainer.epoch >= trainer.config.epochs
        if trainer.epoch % self.checkpoint_every == 0 or last:
            self.log_checkpoint(trainer)

    def on_train_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.flush()
        self.set_tags({"pnn.state": trainer.state, "pnn.end_step": trainer.global_step})
        if trainer.state == "stopped":  # asked to stop: keep the step reached, resume from it later
            self.log_checkpoint(trainer)
            return
        self.log_metrics({"device_samples_total": trainer.device_samples}, trainer.global_step, now=True)
        self.log_training_curve()
        self.log_twin_history()
        if self.log_models:
            self.log_trained_models(trainer)

    def on_test_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        """The run's one test measurement: ``test_acc``, ``test_loss`` at the last step, and a confusion matrix."""
        self.log_metrics({"test_acc": result["acc"], "test_loss": result["loss"]}, trainer.global_step, now=True)
        self.log_figure(confusion_figure(result["pred"], result["target"],
                                         f"test set on the physical devices: {result['acc']:.3f}"),
                        "plots/confusion_matrix.png")

    def _residuals(self, trainer: Trainer) -> dict[str, dict[str, float]]:
        # inputs only, but still never the test split's: validation, or train when there is none
        data = trainer.data
        pool = data.x_val if len(data.x_val) else data.x_train
        x = torch.as_tensor(pool[: self.residual_batch], dtype=torch.get_default_dtype())
        try:
            return twin_residuals(trainer.model, x)
        except Exception as exc:  # a residual is a diagnostic; it never stops a training
            self.set_tags({"pnn.residual_error": f"{type(exc).__name__}: {exc}"})
            return {}

    # -- checkpoints and models ------------------------------------------------------------------------------------

    def save_checkpoint(self, trainer: Trainer) -> Path:
        """The trainer's state plus its experiment configuration, in the run directory (atomic, fsynced)."""
        self.start()
        state = trainer.state_dict()
        state["experiment"] = _jsonable(self.config) if self.config is not None else None
        state["mlflow_run_id"] = self._run_id
        state["run_dir"] = str(self.dir.path)
        path = atomic_torch_save(state, self.dir.checkpoint)
        self.dir.update_meta(checkpoint_step=trainer.global_step, checkpoint_epoch=trainer.epoch)
        return path

    def log_checkpoint(self, trainer: Trainer) -> None:
        """``checkpoints/last.pt``: written locally first, then uploaded (the outbox sends the latest file)."""
        path = self.save_checkpoint(trainer)
        self.flush()
        self._submit({"op": "log_artifact", "run": self._run_id, "file": str(path.relative_to(self.dir.path)),
                      "artifact_path": "checkpoints"})
        self.set_tags({"pnn.checkpoint_step": trainer.global_step, "pnn.checkpoint_epoch": trainer.epoch})
        self.dir.sync()

    def metric_history(self, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        """Each metric's values by step: this run directory's journal, plus the server's for a run resumed
        from another machine (when the server answers)."""
        local = self.dir.metric_history(self._run_id, keys)
        if not self.resuming or is_local_id(self.run_id) or not self.outbox.online:
            return local
        out = {}
        for key in keys:
            try:
                pts = {m.step: m.value for m in self._wait(lambda k=key: self.client.get_metric_history(self.run_id,
                                                                                                    k))}
            except Exception:  # noqa: BLE001 -- the server is away: the local record is what there is
                return local
            pts.update(dict(local.get(key, [])))  # the newest values are the journal's
            out[key] = sorted(pts.items())
        return out

    def log_training_curve(self) -> None:
        keys = ["train_loss", "epoch_train_loss", "val_loss", "epoch_train_acc", "val_acc"]
        h = self.metric_history(keys)
        fig = curve_figure({"train_loss": h["train_loss"]}, {k: h[k] for k in keys[1:]})
        self.log_figure(fig, "plots/training_curve.png")

    def log_twin_history(self) -> None:
        """``plots/twin_drift.png``, when the run measured its twins against their devices
        (``drift/<device>/ratio``): see :func:`twin_history_figure`."""
        keys = {k for k in self._metric_keys if _drift_device(k) is not None}
        keys |= {f"drift/{v['device']}/ratio" for v in self.twin_versions}  # logged before a resume, too
        if not keys:
            return
        history = {k: pts for k, pts in self.metric_history(sorted(keys)).items() if pts}
        if history:
            self.log_figure(twin_history_figure(history, self.twin_versions), "plots/twin_drift.png")

    def log_trained_models(self, trainer: Trainer) -> list[str]:
        """The trained stack (state_dict, device parameters, configuration) and each twin, as logged models."""
        import yaml

        from pnn_cluster.twins import save_twin

        self.start()
        names = []
        root = self.dir.file("models")
        stack_dir = root / "stack"
        stack_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(trainer.model.state_dict(), stack_dir / "state_dict.pt")
        atomic_write_text(stack_dir / "device_params.json",
                          json.dumps(_jsonable(trainer.model.device_params()), indent=2))
        if self.config is not None:
            atomic_write_text(stack_dir / "config.yaml", yaml.safe_dump(_jsonable(self.config), sort_keys=False))
        names.append(self.log_model_dir("stack", stack_dir, {"pnn.kind": "stack"}))
        for layer in trainer.model.physical_layers():
            if layer.twin is None:
                continue
            d = root / f"twin-{layer.name}"
            fit = self.twin_fits.get(layer.name)
            save_twin(layer.twin, d / layer.name, device=_jsonable(layer.device.identity()),
                      fit=fit.as_dict() if fit else None)
            names.append(self.log_model_dir(f"twin-{layer.name}", d, {"pnn.kind": "twin", "pnn.device": layer.name}))
        return names

    def log_model_dir(self, name: str, local_dir: str | os.PathLike, tags: Mapping[str, str] | None = None) -> str:
        """A logged model of this run from a folder inside the run directory (uploaded by the outbox)."""
        self.start()
        local = Path(local_dir).resolve()
        if self.dir.path not in local.parents:
            raise ValueError(f"log_model_dir: {local} is not inside the run directory {self.dir.path}")
        self._submit({"op": "log_model", "run": self._run_id, "experiment": self.experiment, "name": name,
                      "dir": str(local.relative_to(self.dir.path)), "tags": dict(tags or {})})
        return name


def tracker_from_args(args: Any, command: str, config_uri: str | None = None, **kw: Any) -> MlflowCallback | None:
    """The tracker a command's ``--tracking-uri``/``--no-track`` ask for (None with ``--no-track``)."""
    if getattr(args, "no_track", False):
        return None
    uri = resolve_tracking_uri(getattr(args, "tracking_uri", None), config_uri)
    return MlflowCallback(uri, command=command, **kw)


def add_tracking_args(p: Any) -> None:
    """``--tracking-uri`` and ``--no-track``, the same on every command that tracks."""
    p.add_argument("--tracking-uri", metavar="URI", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--no-track", action="store_true", help="do not record an MLflow run")



# -- the demo and calibrate commands ------------------------------------------------------------------------------


class DemoTracking:
    """A demo's parent run; each method is a run of its own, a child of it (nothing with ``--no-track``)."""

    def __init__(self, parent: MlflowCallback | None, params: Mapping[str, Any]) -> None:
        self.parent = parent
        self.params = dict(params)

    def __enter__(self) -> DemoTracking:
        if self.parent is not None:
            self.parent.__enter__()
            self.parent.log_params(self.params)
            print(f"MLflow run {self.parent.run_id} at {self.parent.tracking_uri}", flush=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.parent is not None:
            self.parent.__exit__(exc_type, exc, tb)

    def child(self, method: str) -> dict[str, Any] | None:
        """Tracking settings of one method's run: a child of the demo's run, in the same store."""
        if self.parent is None:
            return None
        return {"tracking_uri": self.parent.tracking_uri, "experiment": self.parent.experiment,
                "run_name": f"{self.params.get('task', 'demo')} {method}", "parent_run_id": self.parent.run_id,
                "tags": {"pnn.demo": self.parent.run_id}}

    def record(self, result: Any) -> None:
        """A method's headline figures on the demo's run."""
        if self.parent is None or result.test_acc is None:
            return
        summary = {"test_acc": float(result.test_acc), "device_samples": float(result.device_samples_total),
                   "seconds": float(result.seconds)}
        if result.twin_nmse is not None:
            summary["twin_nmse"] = float(result.twin_nmse)
        self.parent.log_metrics({f"{k}/{result.method}": v for k, v in summary.items()}, step=0, now=True)


def demo_tracking(args: Any, params: Mapping[str, Any]) -> DemoTracking:
    return DemoTracking(tracker_from_args(args, "demo", run_name=f"demo {params.get('task', '')}".strip()), params)


def log_calibration(args: Any, system: str, device: Any, cal: Any, params: Mapping[str, Any],
                    started: float | None = None) -> str | None:
    """One run for ``pnn-cluster calibrate``: the device, a nested run per twin kind, the best twin as a model."""
    tracker = tracker_from_args(args, "calibrate", run_name=f"calibrate {system}", start_time=started)
    if tracker is None:
        return None
    from pnn_cluster.twins import save_twin

    with tracker:
        tracker.log_params(params)
        fits = {}
        for kind, res in cal.results.items():
            fits[kind] = TwinFit(system, cal.twins[kind], kind, res.nmse_val, res.noise_floor, res.nmse_train,
                                 cal.ideal_nmse, cal.device_samples, res.seconds, list(res.history), cal.val)
            tracker.log_twin_fit(fits[kind], params={"groups": params.get("groups"), "batch": params.get("batch")})
        best = cal.best_kind
        tracker.twin_fits[system] = fits[best]  # the device snapshot records the twin that was kept
        tracker.log_devices({system: device}, twins={system: cal.best})
        metrics = {"noise_floor": cal.noise_floor, "device_samples": cal.device_samples,
                   **{f"nmse_val/{k}": r.nmse_val for k, r in cal.results.items()}}
        if cal.ideal_nmse is not None:
            metrics["ideal_nmse"] = cal.ideal_nmse
        tracker.log_metrics(metrics, step=0, now=True)
        tracker.set_tags({"pnn.best_twin": best})
        d = tracker.dir.file("best_twin")
        save_twin(cal.best, d / f"{system}_{best}", system=system, fit=cal.results[best].as_dict(),
                  device=_jsonable(device.identity()))
        tracker.log_model_dir(f"twin-{system}", d, {"pnn.kind": "twin", "pnn.device": system, "pnn.twin": best})
        print(f"MLflow run {tracker.run_id} at {tracker.tracking_uri}", flush=True)
        return tracker.run_id

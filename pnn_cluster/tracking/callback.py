"""The MLflow callback: a trainer callback that records one run, through its run directory and outbox.

It records what it is given and what the trainer's hooks show it (:mod:`pnn_cluster.tracking` lists what a
run holds) and decides nothing about the training; a twin's version number and digest come from
:mod:`pnn_cluster.twins.versions`. Its state in a checkpoint is the run it records into (``extra["tracking"]``:
it is :class:`~pnn_cluster.training.trainer.Stateful`); the checkpoint is the trainer's, written to the run
directory atomically, then uploaded.

Why one module of some 600 lines: it is one class, :class:`MlflowCallback`, whose every method writes into
the same run through the same outbox and local ids (parameters, tags, files, twin fits and versions,
metrics, checkpoints, models); what is not that class (finding runs, snapshots, figures, the run directory,
the outbox) lives in its own module already.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from pnn_cluster.fsio import atomic_torch_save, atomic_write, atomic_write_text
from pnn_cluster.tracking import figures
from pnn_cluster.tracking.outbox import Outbox
from pnn_cluster.tracking.rundir import RunDir, default_runs_root, find_run_dir, is_local_id, new_local_id
from pnn_cluster.tracking.runs import CONFIG_ARTIFACT, TWIN_VERSIONS_ARTIFACT, download_text, twin_state_artifact
from pnn_cluster.tracking.snapshots import (
    PARAM_CHARS,
    TAG_CHARS,
    device_snapshot,
    device_tags,
    flatten_params,
    jsonable,
    twin_residuals,
)
from pnn_cluster.training.trainer import Callback, Trainer
from pnn_cluster.twins.record import TwinFit
from pnn_cluster.twins.versions import TwinVersions, twin_digest

__all__ = ["MlflowCallback"]

#: MLflow's limits: 100 params and 1000 metrics per batch
_PARAMS_PER_BATCH, _METRICS_PER_BATCH = 100, 1000


def _client(uri: str) -> Any:
    # looked up when called: ``pnn_cluster.tracking.tracking_client`` is the one name to replace (a stand-in server)
    from pnn_cluster import tracking

    return tracking.tracking_client(uri)


#: a training's first fit (TwinFit.source ``fit``) is its twin's calibration
_VERSION_SOURCE = {"fit": "calibration"}


class MlflowCallback(Callback):
    """Tracks a run in MLflow; pass it to :class:`Trainer` (or ``run_method``) as a callback.

    Everything is recorded in a local run directory first (``runs_root``,
    default ``PNN_RUNS_DIR``, else ``./pnn-runs``, or ``~/pnn-runs`` in a Ray
    job's temporary working directory: :func:`~pnn_cluster.tracking.rundir.default_runs_root`;
    or ``run_dir``, an existing one to continue) and sent to the server by an
    :class:`~pnn_cluster.tracking.outbox.Outbox`: the training never waits for
    the server, an outage is reported once, and what could not be sent is
    uploaded when the server is back or by ``pnn-cluster sync``. Checkpoints
    are written to the run directory, atomically and fsynced, before they are
    uploaded. A server that refuses to create the run (401, 403) stops
    :meth:`start` with :class:`~pnn_cluster.tracking.access.TrackingAccessDenied`;
    refused later, the run goes on recorded locally.

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
        self.client = _client(tracking_uri)
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
        self._versions = TwinVersions()
        self._versions_lock = threading.Lock()  # a refit may be recorded from another thread
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
        if not done and self.outbox.denied is not None:
            self._refused()
        self._run_id = rid if done and rid else local
        if done and rid:
            self.dir.update_meta(run_id=rid)
        if self.config is not None:
            self.log_config(self.config)
        return self._run_id

    def _refused(self) -> None:
        """The server refused to create the run: nothing was measured, so its directory goes, and the command
        stops with the one line that says who was refused what."""
        denied = self.outbox.denied
        self.outbox.close()
        self.dir.unlock()
        shutil.rmtree(self.dir.path, ignore_errors=True)
        self._ended = True
        raise denied

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
            self.set_tags({"pnn.error": f"{exc_type.__name__}: {exc}"[:TAG_CHARS]})
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
        items = [(k, str(v)[:TAG_CHARS]) for k, v in tags.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._submit({"op": "log_batch", "run": run_id or self._run_id, "tags": items[i:i + _PARAMS_PER_BATCH]})

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The resolved configuration: every key as a parameter, the whole as ``config/config.yaml``."""
        import yaml

        self.config = dict(config)
        self.log_params(config)
        self.log_text(yaml.safe_dump(jsonable(config), sort_keys=False), CONFIG_ARTIFACT)

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

    def log_written(self, write: Callable[[Path], Any], artifact_file: str, run_id: str | None = None) -> None:
        """``write(path)`` writes the artifact into the run's local directory; then it goes to the server."""
        path = self._artifact_path(artifact_file, run_id)
        write(path)
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
            tags.update(device_tags(name, snap))
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
                      "params": [(k, str(v)[:PARAM_CHARS]) for k, v in all_params.items()]})
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
                self.log_figure(figures.parity_figure(fit.twin, fit.val, title), "parity.png", run_id=cid)
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
                 "seconds": float(fit.seconds), "state_hash": twin_digest(state) if state else None}, state)
        return cid

    # -- twin versions -----------------------------------------------------------------------------------------

    @property
    def twin_versions(self) -> list[dict[str, Any]]:
        """Every version of every twin recorded in this run so far (those of before a resume too)."""
        with self._versions_lock:
            return self._versions.records

    def next_twin_version(self, device: str) -> int:
        """The number the device's next twin version gets, as :class:`~pnn_cluster.twins.versions.TwinVersions`
        numbers it: 0 for its first, one more than its last after."""
        with self._versions_lock:
            return self._versions.next_version(device)

    def log_twin_version(self, record: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None = None) -> None:
        """One version of a device's twin: the calibration (0), a refit swapped in, or one not kept.

        ``record`` holds ``device``, ``version``, ``step`` (the global step it took over at), ``source``,
        ``kind``, ``nmse``, ``noise_floor``, ``ratio_to_floor``, ``samples``, ``parent``, ``accepted``,
        ``seconds`` and ``state_hash`` (the twin's :func:`~pnn_cluster.twins.versions.twin_digest`, computed
        from ``state`` when missing); the run's id is added. The run's ``twins/versions.json`` is rewritten
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
        rec = jsonable(dict(record))
        rec["run_id"] = self.run_id
        device, version = str(rec["device"]), int(rec["version"])
        if state is not None:
            tensors = {k: v.detach().cpu() for k, v in state.items()}
            if not rec.get("state_hash"):
                rec["state_hash"] = twin_digest(tensors)
            artifact = twin_state_artifact(device, version)
            path = self._artifact_path(artifact, None)
            atomic_torch_save(tensors, path)
            rec["state_file"] = artifact
            self._log_file(path, artifact, None)
        with self._versions_lock:  # the file written last holds every record, whichever thread wrote it
            rec = self._versions.add(rec)
            active = self._versions.active().get(device)
            self.log_text(json.dumps(self._versions.records, indent=2), TWIN_VERSIONS_ARTIFACT)
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
            text = self._wait(lambda: download_text(self.client, self._run_id, TWIN_VERSIONS_ARTIFACT))
            if text is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, text)
        try:
            records = json.loads(text) if text else []
        except ValueError:
            records = []  # a file this run cannot read is replaced by the versions it records from now on
        readable = [r for r in records if isinstance(r, Mapping) and "device" in r and "version" in r]
        with self._versions_lock:
            self._versions = TwinVersions(readable)

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
        self.log_figure(figures.confusion_figure(result["pred"], result["target"],
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

    #: where this callback's state is in a checkpoint (``extra["tracking"]``): the run it records into
    state_key = "tracking"

    def state_dict(self) -> dict[str, str | None]:
        """The run a checkpoint belongs to: its id (the local one while the server has not created it) and
        its run directory, so whoever holds the file can find the run it came from."""
        return {"run_id": self._run_id, "run_dir": str(self.dir.path) if self.dir is not None else None}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Nothing to restore: the run a tracker records into is chosen when it is made (``run_id`` or
        ``run_dir``, which ``train --resume`` finds before it reads the checkpoint), so the ids a checkpoint
        holds, here or at its top level (``mlflow_run_id``, ``run_dir``: checkpoints written before the
        trainer kept its components' state), only say where it was written."""

    def save_checkpoint(self, trainer: Trainer) -> Path:
        """The trainer's checkpoint (this callback's state in it) in the run directory: atomic, fsynced."""
        self.start()
        path = trainer.save_checkpoint(self.dir.checkpoint)
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
        fig = figures.curve_figure({"train_loss": h["train_loss"]}, {k: h[k] for k in keys[1:]})
        self.log_figure(fig, "plots/training_curve.png")

    def log_twin_history(self) -> None:
        """``plots/twin_drift.png``, when the run measured its twins against their devices
        (``drift/<device>/ratio``): see :func:`~pnn_cluster.tracking.figures.twin_history_figure`."""
        keys = {k for k in self._metric_keys if figures.drift_device(k) is not None}
        keys |= {f"drift/{v['device']}/ratio" for v in self.twin_versions}  # logged before a resume, too
        if not keys:
            return
        devices = [figures.drift_device(k) for k in keys]
        marks = [f"drift/{d}/{m}" for d in devices for m in ("alarm", "region_alarms")]
        found = self.metric_history(sorted(keys) + marks)
        history = {k: found[k] for k in keys if found.get(k)}
        alarms = {d: figures.alarm_steps(found.get(f"drift/{d}/alarm") or [],
                                         found.get(f"drift/{d}/region_alarms") or []) for d in devices}
        if history:
            self.log_figure(figures.twin_history_figure(history, self.twin_versions, alarms), "plots/twin_drift.png")

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
                          json.dumps(jsonable(trainer.model.device_params()), indent=2))
        if self.config is not None:
            atomic_write_text(stack_dir / "config.yaml", yaml.safe_dump(jsonable(self.config), sort_keys=False))
        names.append(self.log_model_dir("stack", stack_dir, {"pnn.kind": "stack"}))
        for layer in trainer.model.physical_layers():
            if layer.twin is None:
                continue
            d = root / f"twin-{layer.name}"
            fit = self.twin_fits.get(layer.name)
            save_twin(layer.twin, d / layer.name, device=jsonable(layer.device.identity()),
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

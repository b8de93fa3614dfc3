"""One runner for every experiment: build, twins, initialisation, training, evaluation, tracking.

:class:`ExperimentRun` takes a validated :class:`~pnn_cluster.config.ExperimentConfig`
and an injected :class:`~pnn_cluster.runner.placement.Placement`. ``pnn-cluster
demo``, ``train``, ``evaluate`` and the benchmarks all run through it; where
it runs (this process, or a trainer actor on a Ray cluster with every device
in its own device actor) is the placement's business and the command line's
choice, never the runner's.

Each epoch ends with the validation split measured on the devices; the
test split is measured once, after training finished (not when stopped),
and is what ``RunResult.test_acc`` reports.

A run reports progress as lines (``report``); in a trainer actor the lines
are kept for the driver to stream (:meth:`ExperimentRun.events`). ``stop()``
(Ctrl-C, ``ray job stop``) ends the run after the current step: the
checkpoint of that step is kept and the MLflow run is marked KILLED, so
``train --resume RUN_ID`` continues at the next step.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pnn_cluster.config import ExperimentConfig
from pnn_cluster.layers import Stack, init_rescales_
from pnn_cluster.runner.build import build_stack, device_recipes, load_data, train_config
from pnn_cluster.runner.credentials import check_tracking_credentials
from pnn_cluster.runner.methods import method_for
from pnn_cluster.runner.placement import DeviceRef, InProcessPlacement, Placement
from pnn_cluster.runner.twins import ReplicaTwins, make_twin, twin_shell
from pnn_cluster.tracking.runs import OPERATING_ARTIFACT
from pnn_cluster.training.faults import FaultPolicy, NoReplicaLeft, TrainingAborted
from pnn_cluster.training.operating import OperatingRecorder
from pnn_cluster.training.pipeline import PipelineConfig, PipelineExecutor, Replica
from pnn_cluster.training.recalibration import NoiseModel, RecalibrationWatch, WatchedReplica
from pnn_cluster.training.selection import BestOnValidation
from pnn_cluster.training.trainer import Callback, Trainer, TrainerState
from pnn_cluster.twins import TwinFit

__all__ = ["ExperimentRun", "RunResult", "run_experiment", "ProgressReport"]


@dataclass
class RunResult:
    """What a run reports: physical test accuracy (measured once, after training), the last epoch's
    validation accuracy, the device samples it spent, where things ran."""

    config: str
    method: str
    state: str
    test_acc: float | None
    steps: int
    epochs: int
    device_samples: int
    calibration_samples: int
    init_samples: int
    seconds: float
    val_acc: float | None = None
    twins: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None
    run_dir: str | None = None
    tracking_unsent: int = 0
    tracking_wait_s: float = 0.0
    device_actors: int = 0
    #: seconds each device (by label) waited for its instrument while another run held it; empty: none waited
    instrument_waits: dict[str, float] = field(default_factory=dict)
    twin_actors: int = 0
    trainer_actor: bool = False
    nodes: dict[str, str] = field(default_factory=dict)
    executor: dict[str, int] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    #: device samples spent on twins during training: exploratory samples of refinements, full recalibrations
    recalibration_samples: int = 0
    #: per watched device replica: policy, alarm steps, twin versions, samples spent (see RecalibrationWatch)
    recalibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per watched replica, (step, twin NMSE / noise floor) of every step (not in :meth:`summary`)
    drift_history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def device_samples_total(self) -> int:
        """Every measurement the method cost: calibration, initialisation, training and recalibration during
        training (not the test)."""
        return self.device_samples + self.calibration_samples + self.init_samples + self.recalibration_samples

    @property
    def twin_nmse(self) -> float | None:
        vals = [t["nmse_val"] for t in self.twins.values() if "nmse_val" in t]
        return float(np.mean(vals)) if vals else None

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("checkpoint")
        out.pop("drift_history")
        out["device_samples_total"] = self.device_samples_total
        return out


class ProgressReport(Callback):
    """Lines a person reads while a long run goes on: every ``every_s`` seconds, and at each epoch's end."""

    def __init__(self, report: Callable[[str], None], every_s: float = 15.0) -> None:
        self.report = report
        self.every_s = every_s
        self.where = "physical"  # how the accuracy is measured: "digital" for an ablation
        self._last = time.monotonic()

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.report(f"   epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}/{trainer.steps_per_epoch}: "
                        f"loss {metrics['train_loss']:.3f}, {int(metrics['device_samples'])} device samples")

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._last = time.monotonic()
        val = f", validation accuracy {metrics['val_acc']:.3f} ({self.where})" if "val_acc" in metrics else ""
        self.report(f"   epoch {int(metrics['epoch'])}: train loss {metrics['train_loss']:.3f}{val}, "
                    f"{metrics['epoch_seconds']:.1f} s")


@dataclass
class _Built:
    data: Any
    refs: dict[str, list[DeviceRef]]
    stack: Stack
    executor: PipelineExecutor


class ExperimentRun:
    """One experiment, end to end, on the devices a placement starts.

    tracking: keyword arguments of :class:`~pnn_cluster.tracking.MlflowCallback`
        (``tracking_uri``, ``experiment``, ``run_name``, ``run_id`` to resume, ``parent_run_id``, ``tags``,
        ``command``), or None for no MLflow run.
    resume: a checkpoint (``Trainer.state_dict()``) to continue from.
    report: where progress lines go (default: kept for :meth:`events`, and printed when ``echo``).
    checkpoint_path: where the checkpoint is saved if the run stops on a fault it cannot work around
        (besides the MLflow run's), on the machine the run executes on.
    measure_test: False leaves the test split unmeasured (``test_acc`` None): a search for settings reads the
        validation split alone.
    callbacks: further trainer callbacks (after the run's own: progress, twin watch, MLflow).
    """

    def __init__(self, config: ExperimentConfig, placement: Placement | None = None,
                 tracking: Mapping[str, Any] | None = None, resume: Mapping[str, Any] | None = None,
                 progress: bool = False, echo: bool = True, keep_checkpoint: bool = False,
                 pipeline: PipelineConfig | None = None, policy: FaultPolicy | None = None,
                 checkpoint_path: str | None = None, callbacks: Sequence[Callback] = (),
                 measure_test: bool = True) -> None:
        self.config = config
        self.method = method_for(config.method)
        self.measure_test = measure_test
        self.callbacks = list(callbacks)
        self.watch: RecalibrationWatch | None = None
        self.checkpoint_path = checkpoint_path
        self.placement = placement or InProcessPlacement()
        self.tracking = dict(tracking) if tracking else None
        self.resume = resume
        self.progress = progress
        self.echo = echo
        self.keep_checkpoint = keep_checkpoint
        self.pipeline = pipeline or PipelineConfig(
            micro_batches=getattr(self.placement, "micro_batches", None),
            untimed_micro_batches=getattr(self.placement, "untimed_micro_batches", None))
        self.policy = policy or FaultPolicy()
        self.trainer: Trainer | None = None
        self.tracker = None
        self._replica_fits: dict[str, TwinFit] = {}
        self._events: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- progress and control (safe from other threads) ---------------------------------------------

    def report(self, line: str) -> None:
        with self._lock:
            self._events.append(line)
        if self.echo:
            print(line, flush=True)

    def events(self, since: int = 0) -> list[str]:
        with self._lock:
            return self._events[since:]

    def stop(self) -> None:
        """End the run after the current step; its checkpoint is kept (``--resume`` continues it)."""
        self._stop.set()
        if self.trainer is not None:
            self.trainer.stop()

    def status(self) -> dict[str, Any]:
        t = self.trainer
        if t is None:
            return {"state": "preparing", "global_step": 0, "epoch": 0, "device_samples": 0}
        return {"state": t.state, "global_step": t.global_step, "epoch": t.epoch, "device_samples": t.device_samples,
                "steps_per_epoch": t.steps_per_epoch}

    # -- building -----------------------------------------------------------------------------------------

    def _build(self) -> _Built:
        cfg = self.config
        data = load_data(cfg)
        recipes = device_recipes(cfg)
        flat = [r for rs in recipes.values() for r in rs]
        # all at once: connections open in parallel on a cluster (and twin actors boot meanwhile, for PAT)
        started = self.placement.start_devices(flat, twins=self.method.twin_copies and self.resume is None)
        refs: dict[str, list[DeviceRef]] = {name: [] for name in recipes}
        for ref in started:
            refs[ref.recipe.name].append(ref)
        stack = build_stack(cfg, {name: rs[0].device for name, rs in refs.items()}, data.n_features)
        if not self.method.digital:
            stack.set_mode(self.method.mode)
        executor = PipelineExecutor(self.placement.backend, config=self.pipeline, policy=self.policy)
        return _Built(data, refs, stack, executor)

    @staticmethod
    def _noise_streams(built: _Built, purpose: str) -> None:
        """Every device's noise from here on from its stream for ``purpose``: the methods compared on one
        device copy then see the same noise in training and test, whatever each spent on calibration."""
        for refs in built.refs.values():
            for ref in refs:
                ref.device.noise_stream(purpose)

    def _layer(self, stack: Stack, name: str):
        return next(l for l in stack.physical_layers() if l.name == name)

    def _twins(self, built: _Built, tracker) -> tuple[dict[str, TwinFit], int]:
        """Every replica's twin, fitted next to its device; the pools of the stages. Returns fits, samples.

        On a cluster the replicas' twins are made at once (their twin actors start, collect on their
        devices and fit in parallel); in this process one after the other.
        """
        cfg = self.config
        method = self.method
        if method.digital:
            return {}, 0  # no physical layer: nothing to describe
        jobs = []  # (index, ref, wanted, shell twin or None, twin pool or None)
        for index, (name, refs) in enumerate(built.refs.items()):
            tc = cfg.devices[name].twin
            for ref in refs:
                wanted = method.needs_twin(ref.recipe.replica)
                twin = twin_shell(tc, ref) if wanted else None  # None too for kind best: the fit chooses
                pool = self.placement.start_twins(twin, ref.recipe) if twin is not None and method.twin_copies \
                    else None
                jobs.append((index, ref, wanted, twin, pool))
        names = ", ".join(ref.label for _, ref, wanted, _, _ in jobs if wanted)
        if names:
            self.report(f"-- making twins of {names} ...")

        def make(job):
            index, ref, wanted, twin, pool = job
            if not wanted:
                return None
            tc = cfg.devices[ref.recipe.name].twin
            return make_twin(ref, tc, twin, pool, seed=cfg.seed + index + 1000 * ref.recipe.replica,
                             progress=self.progress)

        if self.placement.kind != "in-process" and len(jobs) > 1:
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="twin") as ex:
                made = list(ex.map(make, jobs))
        else:
            made = [make(job) for job in jobs]
        fits: dict[str, TwinFit] = {}
        samples = 0
        replicas: dict[str, list[Replica]] = {name: [] for name in built.refs}
        for (_, ref, _, _, pool), fit in zip(jobs, made):
            name = ref.recipe.name
            if fit is not None:
                self._replica_fits[ref.label] = fit
                samples += fit.device_samples
                chosen = ""
                if fit.candidates:
                    chosen = " chosen of " + ", ".join(f"{k} {c['nmse_stop']:.2e}" for k, c in fit.candidates.items()
                                                       if c.get("nmse_stop") is not None) + " (early-stopping NMSE)"
                self.report(f"   twin {fit.device} ({fit.kind}): NMSE {fit.nmse_val:.3e}, noise floor "
                            f"{fit.noise_floor:.3e} ({fit.ratio_to_floor:.2f} x), {fit.device_samples} device samples"
                            + chosen)
                if pool is None and method.twin_copies and fit.candidates:
                    pool = self.placement.start_twins(fit.twin, ref.recipe)  # copies of the kind chosen
                if ref.recipe.replica == 0:
                    fits[name] = fit
                    self._layer(built.stack, name).twin = fit.twin
                if tracker is not None:
                    tracker.log_twin_fit(fit, params=cfg.devices[name].twin.model_dump(mode="json"))
            replicas[name].append(Replica(ref.handle, twin=fit.twin if fit else None, twins=pool, name=ref.label,
                                          timeout_s=cfg.devices[name].timeout_s))
        for name, reps in replicas.items():
            built.executor.set_pool(name, reps)
        return fits, samples

    def _restore_twins(self, built: _Built, state: Mapping[str, Any]) -> None:
        """A resumed or evaluated run: twins come from the checkpoint, not from new measurements."""
        cfg = self.config
        if self.method.digital:
            return
        saved = ReplicaTwins.saved(state)
        kinds, replica_twins = saved["kinds"], saved["weights"]
        for name, refs in built.refs.items():
            tc = cfg.devices[name].twin
            replicas = []
            for ref in refs:
                twin, pool = None, None
                if self.method.needs_twin(ref.recipe.replica):
                    twin = twin_shell(tc, ref, kind=kinds.get(ref.label))
                    if ref.recipe.replica == 0:
                        self._layer(built.stack, name).twin = twin
                    elif ref.label in replica_twins:
                        twin.load_state_dict(replica_twins[ref.label])
                replicas.append(Replica(ref.handle, twin=twin, twins=pool, name=ref.label,
                                        timeout_s=cfg.devices[name].timeout_s))
            built.executor.set_pool(name, replicas)

    def _replica_twins(self, built: _Built) -> ReplicaTwins:
        """The run's twins, every replica's (none for the digital controls)."""
        twins = ReplicaTwins()
        if self.method.digital:
            return twins
        for name, refs in built.refs.items():
            layer = self._layer(built.stack, name)
            for rep, ref in zip(built.executor.pool(layer).replicas, refs):
                primary = ref.recipe.replica == 0
                twins.add(rep.name, layer.twin if primary else rep.twin, primary)
        return twins

    def _start_twin_pools(self, built: _Built) -> None:
        """After a restore: twin copies elsewhere start from the restored twins."""
        if not self.method.twin_copies:
            return
        for name in built.refs:
            pool = built.executor.pool(self._layer(built.stack, name))
            for rep, ref in zip(pool.replicas, built.refs[name]):
                twin = rep.twin if ref.recipe.replica > 0 else self._layer(built.stack, name).twin
                if twin is not None:
                    rep.twin = twin
                    rep.twins = self.placement.start_twins(twin, ref.recipe)

    def _watch(self, built: _Built, tracker) -> RecalibrationWatch | None:
        """Each device replica's twin watch, as its ``recalibration`` section says (PAT only: the other
        methods have no twin in the backward pass to watch)."""
        cfg = self.config
        if not self.method.watches_twins:
            return None
        prior = ((self.resume or {}).get("extra") or {}).get("recalibration") or {}
        watched = []
        for name, refs in built.refs.items():
            dc = cfg.devices[name]
            settings = dc.recalibration.settings()
            if settings.policy == "none":
                continue
            layer = self._layer(built.stack, name)
            tc = dc.twin
            pool = built.executor.pool(layer)
            for rep, ref in zip(pool.replicas, refs):
                fit = self._replica_fits.get(ref.label)
                before = prior.get(ref.label, {})
                floor = fit.noise_floor if fit is not None else before.get("noise_floor")
                if floor is None or not np.isfinite(floor) or floor <= 0:
                    self.report(f"   {ref.label}: its noise floor is {floor} (not measured, or a noise-free device); "
                                "its twin's drift is not watched")
                    continue
                var, noise = before.get("output_var"), None
                if fit is not None and fit.val is not None:
                    var = float(np.concatenate([y.reshape(-1) for y in fit.val.y]).var())
                    noise = NoiseModel.from_repeats(fit.val)
                watched.append(WatchedReplica(
                    ref.label, rep, layer, settings, ref.collect, float(floor),
                    nmse=fit.nmse_val if fit is not None else before.get("nmse"), output_var=var, noise=noise,
                    calibration={"groups": tc.groups, "batch": tc.batch, "repeats": tc.repeats,
                                 "holdout": tc.holdout, "epochs": tc.epochs, "lr": tc.lr},
                    kind=getattr(rep.twin, "kind", ""), pool=pool))
        if not watched:
            return None
        watch = RecalibrationWatch(watched, report=self.report, backend=self.placement.backend, seed=cfg.seed,
                                   on_version=getattr(tracker, "log_twin_version", None))
        built.executor.observer = watch
        return watch

    def _initialise(self, built: _Built) -> int:
        cfg = self.config
        xs = torch.as_tensor(built.data.x_train[: cfg.init.samples], dtype=torch.get_default_dtype())
        before = built.stack.samples_measured()
        with built.stack.mode_as(self.method.init_mode):
            init_rescales_(built.stack, xs, spread=cfg.init.spread, logit_scale=cfg.init.logit_scale)
        return built.stack.samples_measured() - before

    # -- the run ------------------------------------------------------------------------------------------

    def _tracker(self):
        if not self.tracking or not self.config.tracking.enabled:
            return None
        from pnn_cluster.tracking import MlflowCallback

        t = self.config.tracking
        kw = {"experiment": t.experiment, "run_name": t.run_name or self.config.name,
              "tags": {"pnn.config": self.config.name, "pnn.method": self.config.method, **t.tags},
              "flush_every_s": t.flush_every_s, "checkpoint_every": t.checkpoint_every,
              "residual_batch": t.residual_batch, "log_models": t.log_models, "command": "train",
              "start_wait_s": t.start_wait_s, "end_wait_s": t.end_wait_s, "retry_every_s": t.retry_every_s}
        if t.runs_dir:
            kw["runs_root"] = str(Path(t.runs_dir).expanduser().resolve())
        given = dict(self.tracking)
        kw["tags"] = {**kw["tags"], **given.pop("tags", {})}
        kw.update({k: v for k, v in given.items() if v is not None})
        check_tracking_credentials(kw.get("tracking_uri"))  # in the process that will send them
        return MlflowCallback(config=self.config.resolved(), **kw)

    def run(self) -> RunResult:
        """Build, make twins (or restore them from ``resume``), initialise, train, test on the devices."""
        t0 = time.perf_counter()
        tracker = self.tracker = self._tracker()
        try:
            with tracker if tracker is not None else contextlib.nullcontext():
                result = self._run(tracker, t0)
        finally:
            self.placement.close()
        if tracker is not None:  # after the run's end: its id once the server has it, what is left to upload
            result.run_id, result.run_dir = tracker.run_id, str(tracker.run_dir)
            result.tracking_unsent, result.tracking_wait_s = tracker.left_unsent, round(tracker.wait_s, 3)
        return result

    def _run(self, tracker, t0: float) -> RunResult:
        cfg = self.config
        if tracker is not None:
            self.report(f"MLflow run {tracker.run_id} ({'resumed' if self.resume else 'new'}) at "
                        f"{tracker.tracking_uri}; kept locally in {tracker.run_dir}")
        built = self._build()
        counts = self.placement.counts()
        self.report(f"pnn-cluster: {cfg.name} ({cfg.method}) on {built.data.name}: {len(built.data.y_train)} train, "
                    f"{len(built.data.y_val)} validation, {len(built.data.y_test)} test; devices "
                    + ", ".join(f"{n} (x{len(r)})" if len(r) > 1 else n for n, r in built.refs.items())
                    + (f"; {counts['device_actors']} device actor(s) on Ray" if counts["device_actors"] else ""))
        if tracker is not None and counts.get("instrument_waits"):
            # what the run waited for instruments other runs held, beside what it measured
            tracker.log_metrics({f"instrument_wait_s/{label}": s for label, s in counts["instrument_waits"].items()},
                                step=0)
        fits: dict[str, TwinFit] = {}
        cal_samples = init_samples = 0
        if self.resume is not None:
            self._restore_twins(built, self.resume)
        else:
            self._noise_streams(built, "calibration")
            fits, cal_samples = self._twins(built, tracker)
            self._noise_streams(built, "init")
            init_samples = self._initialise(built)
        progress = ProgressReport(self.report)
        progress.where = "digital" if self.method.digital else "physical"
        callbacks: list[Callback] = [progress]
        watch = self.watch = self._watch(built, tracker)
        if watch is not None:
            callbacks.append(watch)  # before the MLflow callback: it adds its figures to each step's metrics
        if tracker is not None and self.method.mode == "pat":
            # where training ran each device, from the measurements it makes anyway: what `pnn-cluster calibrate
            # --operating` judges twins on (the second half of the run: the trained network's region)
            callbacks.append(OperatingRecorder(skip_fraction=0.5, seed=cfg.seed, meta={"config": cfg.name},
                                               on_end=lambda region: tracker.log_written(
                                                   region.save, OPERATING_ARTIFACT)))
        if tracker is not None:
            callbacks.append(tracker)
        best = None
        if cfg.schedule.keep == "best":
            best = BestOnValidation()  # Stateful: a resumed run's checkpoint restores it
            callbacks.insert(1, best)  # before the MLflow callback: its last checkpoint holds the chosen weights
        callbacks += self.callbacks
        trainer = Trainer(built.stack, built.data, train_config(cfg), callbacks=callbacks, executor=built.executor,
                          progress=self.progress)
        trainer.checkpoint_meta["experiment"] = cfg.resolved()
        trainer.add_stateful(self._replica_twins(built))
        if self.resume is not None:
            trainer.load_state_dict(self.resume)
            self._start_twin_pools(built)
            self.report(f"-- resuming at epoch {trainer.epoch}, step {trainer.global_step}")
        elif tracker is not None and not self.method.digital:
            dev = cfg.devices
            names = list(built.refs)
            tracker.log_devices({n: built.refs[n][0].device for n in names},
                                drivers={n: built.refs[n][0].recipe.driver_summary() for n in names},
                                placements={n: dev[n].placement.model_dump(mode="json") for n in names},
                                twins={n: self._layer(built.stack, n).twin for n in names})
        self.trainer = trainer
        if self._stop.is_set():
            trainer.stop()
        counts = self.placement.counts()
        self.report(f"-- training {cfg.schedule.epochs} epochs of {trainer.steps_per_epoch} steps"
                    + (f" ({counts['twin_actors']} twin actor(s))" if counts["twin_actors"] else "") + " ...")
        self._noise_streams(built, "training")
        try:
            try:
                history = trainer.fit()
            finally:
                if watch is not None:
                    watch.close()
        except NoReplicaLeft as exc:
            # the state is that of the last complete step (a failed step never reaches optimizer.step):
            # a repaired lab resumes from it and repeats nothing
            raise self._aborted(trainer, tracker, exc) from exc
        stopped = trainer.state == TrainerState.STOPPED
        if not self.measure_test and not stopped:
            acc = None
            self.report(f"validation accuracy {history[-1].get('val_acc') if history else None} after "
                        f"{trainer.global_step} steps; the test split is not measured (a search)")
        elif stopped:
            acc = None
            self.report(f"stopped at epoch {trainer.epoch}, step {trainer.global_step}"
                        + (f"; `pnn-cluster train --resume {tracker.resume_hint}` continues it" if tracker else ""))
            if tracker is not None:
                tracker.end("KILLED")
        else:
            # the one measurement of the test split in this run
            self._noise_streams(built, "test")
            try:
                acc = trainer.test()["acc"]
            except NoReplicaLeft as exc:  # training is complete and kept: `evaluate` measures it later
                raise self._aborted(trainer, tracker, exc, "test split not measured") from exc
        seconds = time.perf_counter() - t0
        if acc is not None:
            where = f"digitally (the {cfg.method} stand-ins)" if self.method.digital else "on the physical devices"
            self.report(f"test accuracy {acc:.3f} {where} after {trainer.global_step} steps; "
                        f"{trainer.device_samples} training device samples; {seconds:.1f} s")
        nodes = {ref.label: ref.node for refs in built.refs.values() for ref in refs if ref.node}
        checkpoint = None
        if self.keep_checkpoint:
            checkpoint = trainer.state_dict()
        return RunResult(config=cfg.name, method=cfg.method, state=trainer.state, test_acc=acc,
                         steps=trainer.global_step, epochs=trainer.epoch, device_samples=trainer.device_samples,
                         calibration_samples=cal_samples, init_samples=init_samples, seconds=seconds,
                         val_acc=best.val_acc if best is not None and best.val_acc is not None
                         else history[-1].get("val_acc") if history else None,
                         twins={k: f.as_dict() for k, f in fits.items()}, history=list(trainer.history),
                         run_id=tracker.run_id if tracker is not None else None,
                         run_dir=str(tracker.run_dir) if tracker is not None else None,
                         device_actors=counts["device_actors"], twin_actors=counts["twin_actors"],
                         instrument_waits=dict(counts.get("instrument_waits", {})),
                         trainer_actor=counts["trainer_actor"], nodes=nodes, executor=dict(built.executor.stats),
                         checkpoint=checkpoint, **self._recalibration_figures(watch))

    @staticmethod
    def _recalibration_figures(watch: RecalibrationWatch | None) -> dict[str, Any]:
        if watch is None:
            return {}
        summary = watch.summary()
        history = {label: s.pop("history") for label, s in summary.items()}
        spent = sum(s["explore_samples"] + s["recalibration_samples"] + s["reference_samples"]
                    for s in summary.values())
        for label, s in summary.items():
            s["versions_log"] = [r for r in watch.records if r["device"] == label]
        return {"recalibration": summary, "drift_history": history, "recalibration_samples": spent}

    def _aborted(self, trainer: Trainer, tracker, exc: Exception, what: str = "training stopped") -> TrainingAborted:
        """Keep the checkpoint of the last complete step (``--checkpoint`` PATH, the run directory) and say where."""
        kept, saved = [], None
        if self.checkpoint_path is not None:
            saved = trainer.save_checkpoint(self.checkpoint_path)
            kept.append(f"saved to {saved}")
        if tracker is not None:
            tracker.log_checkpoint(trainer)
            kept.append(f"kept in run {tracker.run_id} ({tracker.dir.checkpoint})")
        where = f"checkpoint of step {trainer.global_step} {' and '.join(kept)}" if kept else \
            "no checkpoint kept (tracking is off and no --checkpoint PATH was given)"
        return TrainingAborted(f"{what}: {exc}; {where}", saved)

    def evaluate(self, split: str = "test") -> dict[str, Any]:
        """The checkpoint given as ``resume``, measured on the devices (and on the twins alone)."""
        if self.resume is None:
            raise ValueError("ExperimentRun.evaluate: give the checkpoint to evaluate as resume=")
        try:
            built = self._build()
            self._restore_twins(built, self.resume)
            trainer = Trainer(built.stack, built.data, train_config(self.config), executor=built.executor,
                              progress=False)
            trainer.load_state_dict(self.resume)
            physical = trainer.evaluate(split, physical=True)
            twin_only = trainer.evaluate(split, physical=False) if self.method.twin_only_evaluation else None
        finally:
            self.placement.close()
        # the twins are those the checkpoint holds: the versions in use when it was taken
        watched = ((self.resume.get("extra") or {}).get("recalibration") or {})
        return {"acc": physical["acc"], "loss": physical["loss"], "n": len(physical["target"]),
                "twin_versions": {label: w.get("version", 0) for label, w in watched.items()},
                "twin_acc": twin_only["acc"] if twin_only else None, "epoch": trainer.epoch,
                "step": trainer.global_step}


def run_experiment(config: ExperimentConfig, placement: Placement | None = None, **kw: Any) -> RunResult:
    """:class:`ExperimentRun` in one call."""
    return ExperimentRun(config, placement, **kw).run()

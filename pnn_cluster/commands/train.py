"""``pnn-cluster train``: train the stack an experiment configuration describes, tracked in MLflow."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pnn_cluster.tracking import add_tracking_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train the stack a YAML configuration describes (MLflow run, checkpoints, --resume)",
        description="Loads and validates an experiment configuration (see pnn_cluster/configs/), builds its devices "
                    "and stack, makes each device's twin (fit on fresh measurements, ideal model, or loaded), "
                    "trains with the configured method and reports the test accuracy measured on the physical "
                    "devices. Every run is recorded in MLflow with a checkpoint each epoch; --resume RUN_ID "
                    "continues an interrupted run at the step it reached. Exit codes: 0 done, 1 the training "
                    "failed, 2 bad configuration or arguments, 130 interrupted (resume it).",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="experiment YAML file; optional with --resume (the run's own configuration is used)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration key, e.g. --set schedule.epochs=2 (repeatable)")
    add_tracking_args(p)
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: tracking.experiment)")
    p.add_argument("--run-name", default=None, help="MLflow run name (default: tracking.run_name or the config name)")
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="also write the final checkpoint to PATH (evaluate it with `pnn-cluster evaluate PATH`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: cluster.address, then RAY_ADDRESS, else a local Ray)")
    p.add_argument("--in-process", action="store_true",
                   help="run devices and training in this process, without Ray")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line as well")
    p.set_defaults(func=run)


def _usage(message: str) -> Exception:
    from pnn_cluster.cli import UsageError

    return UsageError(message)


def _config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    from pnn_cluster.config import flatten

    fa, fb = flatten(a, prefix), flatten(b, prefix)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def load_resume(args: argparse.Namespace, workdir: Path):
    """The configuration and checkpoint of the run to resume."""
    import yaml

    from pnn_cluster.config import ConfigError, load_config, parse_config
    from pnn_cluster.tracking import CONFIG_ARTIFACT, load_run_checkpoint, resolve_tracking_uri

    if args.no_track:
        raise _usage("--resume continues an MLflow run; it cannot be combined with --no-track")
    if args.overrides:
        raise _usage("--resume continues a run with its own configuration; --set cannot change it")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(args.tracking_uri)
    client = MlflowClient(uri)
    try:
        run = client.get_run(args.resume)
    except MlflowException:
        raise _usage(f"--resume {args.resume}: no such run in tracking URI {uri}") from None
    if run.data.tags.get("pnn.command") != "train":
        raise _usage(f"--resume {args.resume}: run is a {run.data.tags.get('pnn.command', 'foreign')!r} run, "
                     "only train runs can be resumed")
    try:
        logged = Path(client.download_artifacts(args.resume, CONFIG_ARTIFACT, str(workdir)))
    except MlflowException:
        raise _usage(f"--resume {args.resume}: the run has no {CONFIG_ARTIFACT}") from None
    data = yaml.safe_load(logged.read_text())
    cfg = parse_config(data, source=f"run {args.resume}:{CONFIG_ARTIFACT}")
    if args.config:
        given = load_config(args.config)
        differ = [k for k in _config_differences(given.resolved(), cfg.resolved()) if not k.startswith("tracking.")]
        if differ:
            raise ConfigError(args.config, [_problem_for(k) for k in differ[:10]])
    ckpt = load_run_checkpoint(client, args.resume, workdir)
    return cfg, ckpt, uri


def _problem_for(key: str):
    from pnn_cluster.config import Problem

    return Problem(key, "differs from the configuration of the run being resumed", "the run's own value")


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.config import ConfigError, load_config

    if not args.config and not args.resume:
        raise _usage("give a CONFIG file, or --resume RUN_ID")
    with tempfile.TemporaryDirectory(prefix="pnn-train-") as tmp:
        try:
            if args.resume:
                cfg, ckpt, uri = load_resume(args, Path(tmp))
            else:
                cfg, ckpt, uri = load_config(args.config, args.overrides), None, None
        except ConfigError as exc:
            raise _usage(str(exc)) from None
        return train(cfg, args, checkpoint=ckpt, tracking_uri=uri)


def _distribute(cfg, exp, address: str | None):
    """Put every device in its own Ray actor (placed by its instrument) and pipeline training over them.

    Devices reached through a VISA or ZeroMQ driver stay with their drivers in this process; then the
    whole training runs here, as it would with ``--in-process``.
    """
    hardware = [n for n in exp.devices if cfg.devices[n].driver.kind != "simulated"]
    if hardware:
        print(f"note: {', '.join(hardware)} reached through their drivers from this process; training runs here",
              flush=True)
        return None, []
    from actors.cluster import connect
    from actors.device import RemoteDevice, start_device
    from actors.executor import RayExecutor

    where = connect(address or cfg.cluster.address)
    started = []
    for index, name in enumerate(exp.devices):
        place = cfg.devices[name].placement
        options = {}
        if place.resources:
            options["resources"] = dict(place.resources)
        if place.labels:
            options["label_selector"] = dict(place.labels)  # nodes that joined with `ray start --labels`
        actor = start_device(cfg.device_config(name, index=index), **options)
        started.append(actor)
        remote = RemoteDevice(actor, name=name)
        exp.layer(name).device = remote
        exp.devices[name] = remote
    print(f"-- {len(started)} device actor(s) on Ray ({where})", flush=True)
    return RayExecutor(), started


def train(cfg, args: argparse.Namespace, checkpoint: Path | None = None, tracking_uri: str | None = None) -> int:
    executor_actors: list = []
    try:
        return _train(cfg, args, executor_actors, checkpoint, tracking_uri)
    finally:
        if executor_actors:
            import ray

            for actor in executor_actors:
                ray.kill(actor, no_restart=True)


def _train(cfg, args: argparse.Namespace, started: list, checkpoint: Path | None = None,
           tracking_uri: str | None = None) -> int:
    """Build, make twins (or restore them), train, report; tracked unless ``--no-track``."""
    import torch

    from pnn_cluster.config import ConfigError, attach_twin_shells, build_experiment, initialise_stack, prepare_twins
    from pnn_cluster.tracking import MlflowCallback, resolve_tracking_uri
    from pnn_cluster.training.trainer import Trainer

    progress = not args.no_progress
    t0 = time.perf_counter()
    tracker = None
    track = cfg.tracking.enabled and not args.no_track
    if track:
        uri = tracking_uri or resolve_tracking_uri(args.tracking_uri, cfg.tracking.uri)
        t = cfg.tracking
        tracker = MlflowCallback(uri, experiment=args.experiment or t.experiment,
                                 run_name=args.run_name or t.run_name or cfg.name, run_id=args.resume,
                                 tags={"pnn.config": cfg.name, "pnn.method": cfg.method, **t.tags},
                                 config=cfg.resolved(), flush_every_s=t.flush_every_s,
                                 checkpoint_every=t.checkpoint_every, residual_batch=t.residual_batch,
                                 log_models=t.log_models, command="train")
    with tracker if tracker is not None else contextlib.nullcontext():
        if tracker is not None:
            print(f"MLflow run {tracker.run_id} ({'resumed' if args.resume else 'new'}) at {tracker.tracking_uri}",
                  flush=True)
        try:
            exp = build_experiment(cfg)
        except ConfigError as exc:
            raise _usage(str(exc)) from None
        print(f"pnn-cluster train: {cfg.name} ({cfg.method}) on {exp.data.name}: {len(exp.data.y_train)} train, "
              f"{len(exp.data.y_test)} test; devices {', '.join(exp.devices)}", flush=True)
        executor, device_actors = (None, []) if args.in_process else _distribute(cfg, exp, args.address)
        started.extend(device_actors)
        fits = {}
        if checkpoint is not None:
            attach_twin_shells(exp)
            exp.stack.set_mode(cfg.method)
        elif args.resume:
            print("the run has no checkpoint yet: starting its training from the beginning", flush=True)
        if checkpoint is None:
            def report(fit):
                print(f"   twin {fit.device} ({fit.kind}): NMSE {fit.nmse_val:.3e}, noise floor {fit.noise_floor:.3e} "
                      f"({fit.ratio_to_floor:.2f} x), {fit.device_samples} device samples", flush=True)
                if tracker is not None:
                    d = cfg.devices[fit.device].twin
                    tracker.log_twin_fit(fit, params=d.model_dump(mode="json"))

            if cfg.method != "oracle":
                print("-- making twins ...", flush=True)
            fits = prepare_twins(exp, progress=progress, on_fit=report)
            initialise_stack(exp)
        trainer = Trainer(exp.stack, exp.data, exp.train, callbacks=[tracker] if tracker else [], progress=progress,
                          executor=executor)
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
            print(f"-- resuming at epoch {trainer.epoch}, step {trainer.global_step}", flush=True)
        if tracker is not None and checkpoint is None:
            dev = cfg.devices
            tracker.log_devices(exp.devices, drivers={n: dev[n].driver.model_dump(mode="json") for n in exp.devices},
                                placements={n: dev[n].placement.model_dump(mode="json") for n in exp.devices},
                                twins={n: exp.layer(n).twin for n in exp.devices})
        print(f"-- training {cfg.schedule.epochs} epochs of {trainer.steps_per_epoch} steps ...", flush=True)
        try:
            history = trainer.fit()
        except KeyboardInterrupt:
            if tracker is not None:
                print(f"\ninterrupted at step {trainer.global_step}; `pnn-cluster train --resume {tracker.run_id}` "
                      f"continues from the checkpoint of epoch {trainer.epoch}", file=sys.stderr, flush=True)
            raise
        if args.checkpoint:
            state = trainer.state_dict()
            state["experiment"] = cfg.resolved()
            Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, args.checkpoint)
        acc = history[-1]["test_acc"] if history else trainer.evaluate("test")["acc"]
        seconds = time.perf_counter() - t0
        for h in history:
            print(f"   epoch {int(h['epoch'])}: train loss {h['train_loss']:.3f}, test accuracy {h['test_acc']:.3f} "
                  f"(physical)", flush=True)
        print(f"test accuracy {acc:.3f} on the physical devices after {trainer.global_step} steps; "
              f"{trainer.device_samples} training device samples; {seconds:.1f} s", flush=True)
        if tracker is not None:
            print(f"MLflow run {tracker.run_id}: `pnn-cluster train --resume {tracker.run_id}` continues it",
                  flush=True)
        if args.json:
            print(json.dumps({"config": cfg.name, "method": cfg.method, "test_acc": acc, "steps": trainer.global_step,
                              "epochs": trainer.epoch, "device_samples": trainer.device_samples,
                              "twins": {k: f.as_dict() for k, f in fits.items()}, "seconds": seconds,
                              "run_id": tracker.run_id if tracker else None, "device_actors": len(started)}))
    return 0

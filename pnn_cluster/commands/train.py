"""``pnn-cluster train``: train the stack an experiment configuration describes, tracked in MLflow."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from pnn_cluster.tracking import add_tracking_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train the stack a YAML configuration describes (MLflow run, checkpoints, --resume)",
        description="Loads and validates an experiment configuration (see pnn_cluster/configs/), builds its devices "
                    "and stack, makes each device's twin (fit on fresh measurements, ideal model, or loaded), "
                    "trains with the configured method (each epoch measuring the validation split on the "
                    "physical devices) and reports the test accuracy, measured once on the physical devices "
                    "after training. Every run is recorded in MLflow with a checkpoint each epoch; --resume RUN_ID "
                    "continues an interrupted run at the step it reached. Exit codes: 0 done, 1 the training "
                    "failed, 2 bad configuration or arguments, 130 interrupted (resume it).",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="experiment YAML file; optional with --resume (the run's own configuration is used)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration key, e.g. --set schedule.epochs=2 (repeatable)")
    p.add_argument("--quick", action="store_true", help="the smaller run the configuration's `quick` section gives")
    add_tracking_args(p)
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: tracking.experiment)")
    p.add_argument("--run-name", default=None, help="MLflow run name (default: tracking.run_name or the config name)")
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="also write the final checkpoint to PATH (evaluate it with `pnn-cluster evaluate PATH`), "
                        "and the last complete step's there if a fault stops the run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_placement_args(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line as well")
    p.set_defaults(func=run)


def add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: cluster.address, then RAY_ADDRESS, else a local Ray)")
    p.add_argument("--in-process", action="store_true",
                   help="run devices, twins and training in this process, without Ray")


def _usage(message: str) -> Exception:
    from pnn_cluster.commands import UsageError

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
                cfg, ckpt, uri = load_config(args.config), None, None
                if args.quick:  # what --set says wins over the quick section
                    cfg = cfg.quick_version()
                if args.overrides:
                    cfg = cfg.with_overrides(args.overrides)
        except ConfigError as exc:
            raise _usage(str(exc)) from None
        state = None
        if ckpt is not None:
            import torch

            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        return train(cfg, args, checkpoint=state, tracking_uri=uri)


def launcher_for(args: argparse.Namespace):
    """In this process with ``--in-process``; else the Ray launcher (a trainer actor, device actors)."""
    from pnn_cluster.runner.launch import get_launcher

    if args.in_process:
        return get_launcher("in-process")
    try:
        return get_launcher("ray", address=args.address)
    except ValueError as exc:
        raise _usage(f"{exc}; or run with --in-process") from None


def tracking_for(cfg, args: argparse.Namespace, tracking_uri: str | None = None, **extra: Any) -> dict | None:
    """What the run's MLflow tracker is given (None with ``--no-track``); the URI made absolute here,
    so a trainer actor elsewhere on this machine writes to the same store."""
    from pnn_cluster.tracking import resolve_tracking_uri

    if args.no_track or not cfg.tracking.enabled:
        return None
    out = {"tracking_uri": tracking_uri or resolve_tracking_uri(args.tracking_uri, cfg.tracking.uri),
           "experiment": getattr(args, "experiment", None), "run_name": getattr(args, "run_name", None),
           "run_id": getattr(args, "resume", None)}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def train(cfg, args: argparse.Namespace, checkpoint: dict | None = None, tracking_uri: str | None = None) -> int:
    """Run the experiment through the runner; report; exit 130 when it was stopped (it can be resumed)."""
    from pnn_cluster.config import ConfigError
    from pnn_cluster.devices.base import DeviceError
    from pnn_cluster.training.faults import TrainingAborted

    launcher = launcher_for(args)
    tracking = tracking_for(cfg, args, tracking_uri)
    if args.resume and checkpoint is None:
        print("the run has no checkpoint yet: starting its training from the beginning", flush=True)
    try:
        result = launcher.run(cfg, tracking=tracking, resume=checkpoint, keep_checkpoint=bool(args.checkpoint),
                              progress=not args.no_progress,
                              checkpoint_path=str(Path(args.checkpoint).resolve()) if args.checkpoint else None)
    except ConfigError as exc:
        raise _usage(str(exc)) from None
    except (TrainingAborted, DeviceError) as exc:
        # raised in a trainer actor, it arrives wrapped with the remote traceback; the cause is the message
        print(f"pnn-cluster train: {getattr(exc, 'cause', None) or exc}", file=sys.stderr, flush=True)
        return 1
    if result.state == "stopped":
        if result.run_id:
            print(f"interrupted at step {result.steps}; `pnn-cluster train --resume {result.run_id}` continues it",
                  file=sys.stderr, flush=True)
        return 130
    if args.checkpoint and result.checkpoint is not None:
        import torch

        path = Path(args.checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(result.checkpoint, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves half a checkpoint
    if result.run_id:
        print(f"MLflow run {result.run_id}: `pnn-cluster train --resume {result.run_id}` continues it", flush=True)
    if args.json:
        print(json.dumps({"config": result.config, "method": result.method, "test_acc": result.test_acc,
                          "val_acc": result.val_acc, "steps": result.steps, "epochs": result.epochs,
                          "device_samples": result.device_samples,
                          "device_samples_total": result.device_samples_total, "twins": result.twins,
                          "seconds": result.seconds, "run_id": result.run_id, "device_actors": result.device_actors,
                          "twin_actors": result.twin_actors, "trainer_actor": result.trainer_actor,
                          "nodes": result.nodes, "state": result.state}))
    return 0

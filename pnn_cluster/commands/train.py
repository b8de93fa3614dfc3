"""``pnn-cluster train``: train the stack an experiment configuration describes, tracked in MLflow."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from pnn_cluster.commands._tracking import add_tracking_args


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
    p.add_argument("--resume", metavar="RUN_ID|RUN_DIR",
                   help="continue a run from its last checkpoint: its run directory (pnn-runs/...), or its MLflow "
                        "run id (this machine's run directory of it if there is one, else the tracking server's)")
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
    """The configuration, checkpoint, tracking URI and run directory of the run to resume.

    ``--resume`` takes a run directory (``pnn-runs/...``), or a run id: this
    machine's run directory of that run when it has one (its checkpoint is the
    newest, and no server is needed), else the tracking server's record.
    """
    import yaml

    from pnn_cluster.config import parse_config
    from pnn_cluster.tracking import CONFIG_ARTIFACT, load_run_checkpoint, resolve_tracking_uri, tracking_client
    from pnn_cluster.tracking.rundir import RunDirError
    from pnn_cluster.tracking.runs import NoSuchRun, NotARunDir, RunUnreachable, find_run

    if args.no_track:
        raise _usage("--resume continues a tracked run; it cannot be combined with --no-track")
    if args.overrides:
        raise _usage("--resume continues a run with its own configuration; --set cannot change it")
    try:
        found = find_run(args.resume, tracking_client, args.tracking_uri)
    except NotARunDir:
        raise _usage(f"--resume {args.resume}: not a run directory (no run.json); give a run directory "
                     "under pnn-runs/ or an MLflow run id") from None
    except RunUnreachable as exc:
        raise TrackingError(f"--resume {args.resume}: tracking server {exc.uri} unreachable ({exc.reason}); no run "
                            "directory of this run here either (resume from one with --resume pnn-runs/DIR)") from None
    except NoSuchRun as exc:
        raise _usage(f"--resume {args.resume}: no such run in tracking URI {exc.uri}, and no run directory of it "
                     "under pnn-runs/") from None
    local = found.local
    if local is not None:
        try:
            meta = local.meta()
        except RunDirError as exc:
            raise _usage(f"--resume {args.resume}: {exc}") from None
        if meta.get("command") != "train":
            raise _usage(f"--resume {args.resume}: run is a {meta.get('command', 'foreign')!r} run, "
                         "only train runs can be resumed")
        ckpt = local.checkpoint if local.checkpoint.is_file() else None
        cfg_file = local.file(CONFIG_ARTIFACT)
        if cfg_file.is_file():
            data = yaml.safe_load(cfg_file.read_text())
        elif ckpt is not None:
            from pnn_cluster.training.trainer import read_checkpoint

            data = read_checkpoint(ckpt).get("experiment")
        else:
            raise _usage(f"--resume {args.resume}: {local.path} holds neither a configuration nor a checkpoint")
        cfg = parse_config(data, source=f"{local.path}:{CONFIG_ARTIFACT}")
        uri = resolve_tracking_uri(args.tracking_uri, meta.get("tracking_uri"))
        _check_same_config(args, cfg)
        return cfg, ckpt, uri, local.path
    from mlflow.exceptions import MlflowException

    client = found.client
    if found.tags.get("pnn.command") != "train":
        raise _usage(f"--resume {args.resume}: run is a {found.tags.get('pnn.command', 'foreign')!r} run, "
                     "only train runs can be resumed")
    try:
        logged = Path(client.download_artifacts(args.resume, CONFIG_ARTIFACT, str(workdir)))
    except MlflowException:
        raise _usage(f"--resume {args.resume}: the run has no {CONFIG_ARTIFACT}") from None
    data = yaml.safe_load(logged.read_text())
    cfg = parse_config(data, source=f"run {args.resume}:{CONFIG_ARTIFACT}")
    _check_same_config(args, cfg)
    ckpt = load_run_checkpoint(client, args.resume, workdir)
    return cfg, ckpt, found.uri, None


def _check_same_config(args: argparse.Namespace, cfg) -> None:
    from pnn_cluster.config import ConfigError, load_config

    if args.config:
        given = load_config(args.config)
        differ = [k for k in _config_differences(given.resolved(), cfg.resolved()) if not k.startswith("tracking.")]
        if differ:
            raise ConfigError(args.config, [_problem_for(k) for k in differ[:10]])


class TrackingError(RuntimeError):
    """The tracking server could not be reached for something only it has."""


def _problem_for(key: str):
    from pnn_cluster.config import Problem

    return Problem(key, "differs from the configuration of the run being resumed", "the run's own value")


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.config import ConfigError, load_config

    if not args.config and not args.resume:
        raise _usage("give a CONFIG file, or --resume RUN_ID")
    with tempfile.TemporaryDirectory(prefix="pnn-train-") as tmp:
        run_dir = None
        try:
            if args.resume:
                try:
                    cfg, ckpt, uri, run_dir = load_resume(args, Path(tmp))
                except TrackingError as exc:
                    print(f"pnn-cluster train: error: {exc}", file=sys.stderr, flush=True)
                    return 1
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
            from pnn_cluster.training.trainer import read_checkpoint

            state = read_checkpoint(ckpt)
        return train(cfg, args, checkpoint=state, tracking_uri=uri, run_dir=run_dir)


def launcher_for(args: argparse.Namespace):
    """In this process with ``--in-process``; else the Ray launcher (a trainer actor, device actors)."""
    from pnn_cluster.runner.launch import get_launcher

    if args.in_process:
        return get_launcher("in-process")
    try:
        return get_launcher("ray", address=args.address)
    except ValueError as exc:
        raise _usage(f"{exc}; or run with --in-process") from None


def tracking_for(cfg, args: argparse.Namespace, tracking_uri: str | None = None, run_dir: Path | None = None,
                 **extra: Any) -> dict | None:
    """What the run's MLflow tracker is given (None with ``--no-track``); the URI and the run directories
    made absolute here, so a trainer actor elsewhere on this machine writes to the same store and folder."""
    from pnn_cluster.tracking import resolve_tracking_uri
    from pnn_cluster.tracking.rundir import default_runs_root

    if args.no_track or not cfg.tracking.enabled:
        return None
    resume = getattr(args, "resume", None)
    out = {"tracking_uri": tracking_uri or resolve_tracking_uri(args.tracking_uri, cfg.tracking.uri),
           "experiment": getattr(args, "experiment", None), "run_name": getattr(args, "run_name", None),
           "run_id": None if run_dir is not None else resume,
           "run_dir": str(run_dir) if run_dir is not None else None,
           "runs_root": str(Path(cfg.tracking.runs_dir).expanduser().resolve() if cfg.tracking.runs_dir
                            else default_runs_root())}
    out.update(extra)
    submitter = submitter_tags()
    if submitter:
        out["tags"] = {**submitter, **(out.get("tags") or {})}
    return {k: v for k, v in out.items() if v is not None}


def submitter_tags() -> dict[str, str]:
    """The run's tags naming who submitted it, in a Ray job ``pnn-cluster submit`` sent (it names the submitter
    in the job's environment); the MLflow account is the cluster's, so the tag is what tells whose run it is."""
    from pnn_cluster.commands.submit import SUBMITTER_ENV

    who = os.environ.get(SUBMITTER_ENV, "").strip()
    return {"pnn.submitter": who, "mlflow.user": who} if who else {}


def train(cfg, args: argparse.Namespace, checkpoint: dict | None = None, tracking_uri: str | None = None,
          run_dir: Path | None = None) -> int:
    """Run the experiment through the runner; report; exit 130 when it was stopped (it can be resumed)."""
    from pnn_cluster.config import ConfigError
    from pnn_cluster.devices.base import DeviceError
    from pnn_cluster.runner.credentials import check_tracking_credentials
    from pnn_cluster.training.faults import TrainingAborted

    tracking = tracking_for(cfg, args, tracking_uri, run_dir)
    if tracking is not None:  # here as well as where the run is tracked: refused before anything starts
        check_tracking_credentials(tracking["tracking_uri"])
    launcher = launcher_for(args)
    if args.resume and checkpoint is None:
        print("the run has no checkpoint yet: starting its training from the beginning", flush=True)
    try:
        result = launcher.run(cfg, tracking=tracking, resume=checkpoint, keep_checkpoint=bool(args.checkpoint),
                              progress=not args.no_progress,
                              checkpoint_path=str(Path(args.checkpoint).resolve()) if args.checkpoint else None)
    except ConfigError as exc:  # from a trainer actor: the cause, without the remote traceback
        raise _usage(str(getattr(exc, "cause", None) or exc)) from None
    except (TrainingAborted, DeviceError) as exc:
        # raised in a trainer actor, it arrives wrapped with the remote traceback; the cause is the message
        print(f"pnn-cluster train: {getattr(exc, 'cause', None) or exc}", file=sys.stderr, flush=True)
        return 1
    if result.state == "stopped":
        if result.run_id:
            print(f"interrupted at step {result.steps}; `pnn-cluster train --resume {_resume_hint(result)}` "
                  "continues it", file=sys.stderr, flush=True)
        return 130
    if args.checkpoint and result.checkpoint is not None:
        from pnn_cluster.fsio import atomic_torch_save

        atomic_torch_save(result.checkpoint, args.checkpoint)  # the old file or the new one, never half of one
    if result.run_id:
        print(f"MLflow run {result.run_id}, kept in {result.run_dir}: `pnn-cluster train --resume "
              f"{_resume_hint(result)}` continues it", flush=True)
    if args.json:
        print(json.dumps({"config": result.config, "method": result.method, "test_acc": result.test_acc,
                          "val_acc": result.val_acc, "steps": result.steps, "epochs": result.epochs,
                          "device_samples": result.device_samples,
                          "device_samples_total": result.device_samples_total, "twins": result.twins,
                          "seconds": result.seconds, "run_id": result.run_id, "device_actors": result.device_actors,
                          "twin_actors": result.twin_actors, "trainer_actor": result.trainer_actor,
                          "nodes": result.nodes, "state": result.state, "run_dir": result.run_dir,
                          "tracking_unsent": result.tracking_unsent, "tracking_wait_s": result.tracking_wait_s,
                          "instrument_waits": result.instrument_waits}))
    return 0


def _resume_hint(result) -> str:
    from pnn_cluster.tracking.rundir import is_local_id

    return result.run_dir if is_local_id(result.run_id) and result.run_dir else result.run_id

"""``pnn-cluster evaluate``: test accuracy of a trained stack, measured on the physical devices."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pnn_cluster.commands._tracking import add_tracking_args
from pnn_cluster.commands.train import add_placement_args, launcher_for


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="measure a trained stack's test accuracy on the physical devices (run id or checkpoint)",
        description="Rebuilds the devices and the stack of a training from its checkpoint (an MLflow run id, "
                    "whose checkpoints/last.pt is used, or a checkpoint file written by `train --checkpoint`), "
                    "loads the trained parameters and twins, and measures the test set (or --split) on the physical "
                    "devices. The twin-only (in silico) accuracy is shown next to it: a large gap means the twins "
                    "no longer describe the devices. A run id is looked up in this machine's run directories "
                    "(pnn-runs/) first, then on the tracking server. Exit codes: 0 done, 1 the tracking server is "
                    "unreachable (or the measurement failed), 2 no such run or file.",
    )
    p.add_argument("source", metavar="RUN_ID|RUN_DIR|CHECKPOINT",
                   help="MLflow run id, a run directory (pnn-runs/...), or a checkpoint file (.pt)")
    add_tracking_args(p)
    p.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="which split to measure (val: the validation split carved from train by dataset.val_fraction)")
    p.add_argument("--log", action="store_true", help="record the result as metrics of the run (run ids only)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line as well")
    add_placement_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from pnn_cluster.commands import UsageError
    from pnn_cluster.config import ConfigError, parse_config
    from pnn_cluster.tracking import load_run_checkpoint, resolve_tracking_uri, tracking_client
    from pnn_cluster.tracking.outbox import short_reason
    from pnn_cluster.tracking.rundir import is_local_id
    from pnn_cluster.tracking.runs import NoSuchRun, NotARunDir, RunUnreachable, find_run

    with tempfile.TemporaryDirectory(prefix="pnn-eval-") as tmp:
        client = None
        local = None
        if Path(args.source).is_file():
            ckpt_path = Path(args.source)
        else:
            try:
                found = find_run(args.source, None if args.no_track else tracking_client, args.tracking_uri)
            except NotARunDir:
                raise UsageError(f"{args.source}: neither a checkpoint file nor a run directory "
                                 "(no run.json)") from None
            except NoSuchRun as exc:
                if exc.uri is None:
                    raise UsageError(f"{args.source}: no such checkpoint file (a run id needs tracking, not "
                                     "--no-track)") from None
                raise UsageError(f"{args.source}: neither a checkpoint file, a run directory, nor a run in "
                                 f"tracking URI {exc.uri}") from None
            except RunUnreachable as exc:
                print(f"pnn-cluster evaluate: error: tracking server {exc.uri} unreachable ({exc.reason}); "
                      f"cannot look up run {args.source} (no run directory of it here either: evaluate a "
                      "checkpoint file or a run directory instead)", file=sys.stderr, flush=True)
                return 1
            local, client = found.local, found.client
            if local is not None:  # this machine's record of the run: no server needed
                ckpt_path = local.checkpoint
                if not ckpt_path.is_file():
                    raise UsageError(f"{args.source}: run directory {local.path} has no checkpoint yet "
                                     "(checkpoints/last.pt)")
            else:
                ckpt_path = load_run_checkpoint(client, args.source, tmp)
                if ckpt_path is None:
                    raise UsageError(f"run {args.source} has no checkpoint yet (checkpoints/last.pt)")
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(f"{ckpt_path}: not a pnn-cluster checkpoint ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict) or not state.get("experiment"):
            raise UsageError(f"{ckpt_path}: checkpoint carries no experiment configuration "
                             "(write checkpoints with `pnn-cluster train`)")
        try:
            cfg = parse_config(state["experiment"], source=f"{args.source}[experiment]")
            if args.split == "val" and cfg.dataset.val_fraction == 0:
                raise UsageError(f"{args.source}: the run has no validation split (dataset.val_fraction is 0)")
            res = launcher_for(args).evaluate(cfg, state, args.split)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    n = res["n"]
    print(f"{cfg.name} ({cfg.method}), epoch {res['epoch']}, step {res['step']}: {args.split} accuracy "
          f"{res['acc']:.3f} measured on the physical devices ({n} samples), loss {res['loss']:.3f}")
    if res["twin_acc"] is not None:
        print(f"twins only (in silico): {res['twin_acc']:.3f}")
    versions = res.get("twin_versions") or {}
    if versions:
        print("twin versions (those in use at the checkpoint): "
              + ", ".join(f"{name} v{v}" for name, v in sorted(versions.items())))
    result = {"source": args.source, "split": args.split, "acc": res["acc"], "loss": res["loss"],
              "twin_acc": res["twin_acc"], "n": n, "step": res["step"], "twin_versions": versions}
    if args.log:
        if client is None and local is not None:
            client = tracking_client(resolve_tracking_uri(args.tracking_uri, local.meta().get("tracking_uri")))
            args.source = local.run_id
        if client is None:
            raise UsageError("--log records on a run; give a run id, not a checkpoint file")
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(f"evaluate/{args.split}_acc", res["acc"], now, res["step"])]
        if res["twin_acc"] is not None:
            ms.append(Metric(f"evaluate/{args.split}_twin_acc", res["twin_acc"], now, res["step"]))
        from mlflow.exceptions import MlflowException

        if is_local_id(args.source):
            raise UsageError(f"--log: run {args.source} is not on the tracking server yet (`pnn-cluster sync` "
                             "uploads it)")
        try:
            client.log_batch(args.source, metrics=ms)
        except MlflowException as exc:
            print(f"pnn-cluster evaluate: error: --log: tracking server unreachable or refused the metrics "
                  f"({short_reason(exc)}); the result above was not recorded", file=sys.stderr, flush=True)
            return 1
    if args.json:
        print(json.dumps(result))
    return 0

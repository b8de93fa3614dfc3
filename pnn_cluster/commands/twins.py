"""``pnn-cluster twins``: every version of a training run's twins, and the one each device uses."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pnn_cluster.commands import UsageError
from pnn_cluster.commands._table import format_table

if TYPE_CHECKING:
    from pnn_cluster.tracking.runs import FoundRun


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "twins", help="list the versions of a run's twins (calibration, refits) and the one in use per device",
        description="A training fits each device's twin once at the start (version 0) and may refit it during "
                    "the training; every fit is a version, recorded in the run's twins/versions.json with its "
                    "NMSE against the device's noise floor, the step it took over at, and whether it was "
                    "swapped in (a refit no better than the twin in use is recorded but not kept). This lists "
                    "them; * marks the version each device uses. A run id is looked up in this machine's run "
                    "directories (pnn-runs/) first, then on the tracking server. Exit codes: 0 done, 1 the "
                    "tracking server is unreachable, 2 no such run, or a run with no twin versions.",
    )
    p.add_argument("source", metavar="RUN_ID|RUN_DIR", help="MLflow run id or a run directory (pnn-runs/...)")
    p.add_argument("--runs-dir", metavar="DIR", default=None,
                   help="where run directories are (default: PNN_RUNS_DIR, else ./pnn-runs)")
    p.add_argument("--tracking-uri", metavar="URI", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON line instead of the table: {"run_id", "versions", "active"}')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.tracking import TWIN_VERSIONS_ARTIFACT, active_twin_versions, tracking_client
    from pnn_cluster.tracking.rundir import RunDir, default_runs_root
    from pnn_cluster.tracking.runs import NoSuchRun, NotARunDir, RunUnreachable, find_run

    root = Path(args.runs_dir).resolve() if args.runs_dir else default_runs_root()
    try:
        found = find_run(args.source, tracking_client, args.tracking_uri, root)
    except NotARunDir:
        raise UsageError(f"{args.source}: not a run directory (no {RunDir.META})") from None
    except RunUnreachable as exc:
        _unreachable(args.source, exc.uri, exc.reason)
        return 1
    except NoSuchRun as exc:
        raise UsageError(f"{args.source}: neither a run directory nor a run in tracking URI {exc.uri}") from None
    local, run_id = found.local, found.run_id
    if local is not None:
        file = local.file(TWIN_VERSIONS_ARTIFACT)
        if not file.is_file():
            raise UsageError(f"{args.source}: run directory {local.path} has no twin versions "
                             f"({TWIN_VERSIONS_ARTIFACT}: the run has not fitted a twin, or predates them)")
        text, where = file.read_text(), str(file)
    else:
        text = _from_server(found)
        if text is None:
            return 1
        where = f"run {run_id}: {TWIN_VERSIONS_ARTIFACT}"
    try:
        versions = json.loads(text)
        if not isinstance(versions, list) or not all(isinstance(v, dict) and "device" in v and "version" in v
                                                     for v in versions):
            raise ValueError("not a list of twin versions")
    except ValueError as exc:
        raise UsageError(f"{where}: unreadable ({exc})") from None
    active = active_twin_versions(versions)
    if args.json:
        print(json.dumps({"run_id": run_id, "versions": versions, "active": active}))
    else:
        print(f"twins of run {run_id} (* the version in use)")
        print(version_table(versions, active))
    return 0


def _from_server(found: FoundRun) -> str | None:
    """``twins/versions.json`` of a run found on the tracking server; None (reported) when the server is away."""
    import tempfile

    from mlflow.exceptions import MlflowException

    from pnn_cluster.tracking import TWIN_VERSIONS_ARTIFACT
    from pnn_cluster.tracking.outbox import is_outage, short_reason

    client, run_id = found.client, found.run_id
    try:
        names = {f.path for f in client.list_artifacts(run_id, "twins")}
        if TWIN_VERSIONS_ARTIFACT not in names:
            raise UsageError(f"run {run_id} has no twin versions ({TWIN_VERSIONS_ARTIFACT}: the run has not "
                             "fitted a twin, or predates them)")
        with tempfile.TemporaryDirectory(prefix="pnn-twins-") as tmp:
            return Path(client.download_artifacts(run_id, TWIN_VERSIONS_ARTIFACT, tmp)).read_text()
    except MlflowException as exc:
        if is_outage(exc):
            _unreachable(run_id, found.uri, short_reason(exc))
            return None
        raise UsageError(f"{run_id}: neither a run directory nor a run in tracking URI {found.uri}") from None


def _unreachable(source: str, uri: str, reason: str) -> None:
    print(f"pnn-cluster twins: error: tracking server {uri} unreachable ({reason}); cannot look up run {source} "
          "(no run directory of it here either: give the run directory instead)", file=sys.stderr, flush=True)


def _number(x: Any, fmt: str) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return "-" if x is None else str(x)
    return format(x, fmt) if math.isfinite(x) else str(x)


def version_table(versions: Sequence[Mapping[str, Any]], active: Mapping[str, int]) -> str:
    """One row per version, by device and version; ``*`` after the version each device uses."""
    rows = [["device", "version", "step", "source", "kind", "NMSE", "floor", "ratio", "device samples",
             "accepted"]]
    for v in sorted(versions, key=lambda v: (str(v["device"]), int(v["version"]))):
        device, k = str(v["device"]), int(v["version"])
        samples = v.get("samples") or {}
        rows.append([device, f"{k}{'*' if active.get(device) == k else ''}", str(v.get("step", 0)),
                     str(v.get("source", "-")), str(v.get("kind", "-")), _number(v.get("nmse"), ".3e"),
                     _number(v.get("noise_floor"), ".3e"), _number(v.get("ratio_to_floor"), ".2f"),
                     _number(samples.get("device_samples") if isinstance(samples, Mapping) else None, "d"),
                     "yes" if v.get("accepted", True) else "no"])
    return format_table(rows)

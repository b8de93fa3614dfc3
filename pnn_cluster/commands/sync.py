"""``pnn-cluster sync``: upload what a run's local directory holds and the tracking server does not yet."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sync", help="upload runs kept locally while the tracking server was away (pnn-runs/...)",
        description="Every run records its tracking operations in a local run directory (pnn-runs/ in the "
                    "working directory, or PNN_RUNS_DIR) before sending them to the tracking server. What could "
                    "not be sent (the server was down or unreachable) stays there; this command sends it, in "
                    "order, creating the run on the server if it never was. Without RUN_DIR, every run directory "
                    "under the runs folder with something left to send, oldest first (a demo's parent run before "
                    "its methods). Exit codes: 0 everything sent, 1 the server is still unreachable (nothing is "
                    "lost: run it again later), 2 bad arguments, or the server refused your user (401, 403: "
                    "nothing is lost: run it again once the permission it names is granted).",
    )
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run directories (default: all with a backlog)")
    p.add_argument("--runs-dir", metavar="DIR", default=None,
                   help="where run directories are (default: PNN_RUNS_DIR, else ./pnn-runs)")
    p.add_argument("--tracking-uri", metavar="URI", default=None,
                   help="send to this server instead of the one each run was started with")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line as well")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.commands import UsageError
    from pnn_cluster.tracking import tracking_client
    from pnn_cluster.tracking.outbox import Outbox
    from pnn_cluster.tracking.rundir import RunDir, RunDirError, default_runs_root

    if args.run_dirs:
        try:
            dirs = [RunDir.open(d) for d in args.run_dirs]
        except RunDirError as exc:
            raise UsageError(str(exc)) from None
    else:
        root = Path(args.runs_dir).resolve() if args.runs_dir else default_runs_root()
        if not root.is_dir():
            raise UsageError(f"--runs-dir {root}: no such directory (runs keep their records in ./pnn-runs, or "
                             "PNN_RUNS_DIR)")
        dirs = [RunDir(m.parent) for m in sorted(root.glob(f"*/{RunDir.META}"))]
        dirs = [d for d in dirs if d.pending()]
    results, failed, refused = [], 0, 0
    for d in dirs:
        meta = d.meta()
        uri = args.tracking_uri or meta.get("tracking_uri")
        if not uri:
            print(f"pnn-cluster sync: {d.path}: no tracking URI recorded; give --tracking-uri", file=sys.stderr)
            failed += 1
            continue
        try:
            d.lock()
        except RunDirError as exc:
            print(f"pnn-cluster sync: skipped: {exc}", file=sys.stderr, flush=True)
            failed += 1
            continue
        try:
            box = Outbox(d, tracking_client(uri), uri, thread=False,
                         warn=lambda msg: print(msg, file=sys.stderr, flush=True))
            before = box.pending
            left = box.replay()
            if not left:
                d.update_meta(run_id=d.run_id)
        finally:
            d.unlock()
        sent = before - left
        results.append({"run_dir": str(d.path), "run_id": d.run_id, "sent": sent, "left": left, "uri": uri})
        if box.denied is not None:  # the outbox said who was refused what, in one line
            refused += 1
            print(f"{d.path}: {sent} operation(s) sent, {left} left (server {uri} refused this user, as said above: "
                  "run `pnn-cluster sync` again once that is fixed)", flush=True)
        elif left:
            failed += 1
            print(f"{d.path}: {sent} operation(s) sent, {left} left (server {uri} unreachable: run "
                  "`pnn-cluster sync` again later)", flush=True)
        else:
            print(f"{d.path}: {sent} operation(s) sent; MLflow run {d.run_id} at {uri}", flush=True)
    if not dirs:
        print("nothing to upload: every run directory is in sync", flush=True)
    if args.json:
        print(json.dumps({"runs": results, "failed": failed + refused}))
    return 2 if refused else 1 if failed else 0

#!/usr/bin/env python3
"""Give lab members what their runs need on the lab's MLflow server: EDIT on each shared experiment.

basic_auth.ini gives every account READ on every experiment (default_permission = READ) and its creator
MANAGE; anyone else gets 403 creating a run in it. A run creates runs, logs metrics, parameters, artifacts and
logged models in its configuration's experiment (tracking.experiment; `pnn-cluster` for calibrate and demo):
that is EDIT on the experiment. Run as the MLflow admin, after making an account and whenever a member or an
experiment is new (idempotent: an experiment that exists is kept, a permission at least as high is left alone):

  export MLFLOW_TRACKING_SERVER_CERT_PATH=~/.pnn-cluster/mlflow.crt MLFLOW_TRACKING_USERNAME=admin
  /opt/mlflow/venv/bin/python deploy/mlflow/grant-access.py --tracking-uri https://mlflow.lab.example:5000 \
      ada bob --experiment lab-hybrid --experiment pnn-cluster

Missing experiments are created (owned by the admin). `--create` makes an account for a user who has none,
with the password read from standard input (one line per new user, in the order given) or asked for on the
terminal. The admin's password comes from MLFLOW_TRACKING_PASSWORD, else it is asked for; no password is
ever printed or taken from the command line. Needs MLflow with the basic-auth client's
`grant_user_permission` (the version the server runs). Exit codes: 0 done, 1 the server failed or refused
the admin, 2 bad arguments (an unknown user without --create).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

#: MLflow's permissions, weakest first
RANKS = ["NO_PERMISSIONS", "READ", "USE", "EDIT", "MANAGE"]


def _password(prompt: str) -> str:
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    line = sys.stdin.readline().rstrip("\n")
    if not line:
        raise SystemExit(f"grant-access: {prompt.rstrip(': ')}: no line left on standard input")
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("users", nargs="+", metavar="USER", help="MLflow accounts (a service account too)")
    p.add_argument("--experiment", action="append", required=True, metavar="NAME",
                   help="an experiment runs are recorded in (repeat for several)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), metavar="URI",
                   help="the MLflow server (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--permission", default="EDIT", choices=["READ", "EDIT", "MANAGE"],
                   help="what to grant (default EDIT: create and write runs and models, delete nothing)")
    p.add_argument("--create", action="store_true", help="make an account for a user who has none")
    args = p.parse_args(argv)
    if not args.tracking_uri:
        p.error("--tracking-uri (or MLFLOW_TRACKING_URI) is needed")

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", "admin")
    if not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        os.environ["MLFLOW_TRACKING_PASSWORD"] = getpass.getpass(f"{os.environ['MLFLOW_TRACKING_USERNAME']}'s "
                                                                 "password: ")
    auth = get_app_client("basic-auth", tracking_uri=args.tracking_uri)
    client = MlflowClient(args.tracking_uri)
    try:
        for user in args.users:
            try:
                auth.get_user(user)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                if not args.create:
                    print(f"grant-access: {args.tracking_uri} has no account {user!r}: add --create to make it",
                          file=sys.stderr)
                    return 2
                auth.create_user(user, _password(f"{user}'s new password: "))
                print(f"{user}: account created")
        experiments = {}
        for name in args.experiment:
            exp = client.get_experiment_by_name(name)
            experiments[name] = exp.experiment_id if exp else client.create_experiment(name)
            if not exp:
                print(f"experiment {name!r} created (id {experiments[name]})")
        for user in args.users:
            for name, eid in experiments.items():
                have = auth.get_user_permission(user, "experiment", eid).permission
                if have in RANKS and RANKS.index(have) >= RANKS.index(args.permission):
                    print(f"{user}: {have} on experiment {name!r} already")
                    continue
                try:
                    auth.grant_user_permission(user, "experiment", eid, args.permission)
                except MlflowException as exc:  # a weaker grant of its own is there: replaced
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    auth.revoke_user_permission(user, "experiment", eid)
                    auth.grant_user_permission(user, "experiment", eid, args.permission)
                print(f"{user}: {args.permission} on experiment {name!r} (id {eid})")
    except MlflowException as exc:
        print(f"grant-access: {args.tracking_uri}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``pnn-cluster check-secrets``: the secret files a Ray node and its jobs read are their owner's alone.

Ray reads its token and its TLS key without looking at their modes, and MLflow its credentials file; a node
started with one of them readable by its group or others hands it to every user of the machine. The units and
the cluster file of ``deploy/`` run this before ``ray start``, in the environment Ray gets, so such a node does
not start: one line per file, naming it, its mode and the ``chmod`` that fixes it (exit 2).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-secrets", help="check that the secret files of this node's Ray and jobs are their owner's alone",
        description="Checks, in this environment, the files Ray and its jobs read secrets from: the cluster's "
                    "token (RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; with RAY_AUTH_MODE=token it must exist), "
                    "Ray's TLS key (RAY_TLS_SERVER_KEY; with RAY_USE_TLS=1 it, RAY_TLS_SERVER_CERT and "
                    "RAY_TLS_CA_CERT must exist), MLflow's ~/.mlflow/credentials, the CURVE key pairs "
                    "~/.pnn-cluster/curve/*.key_secret, the TLS keys ~/.pnn-cluster/tls/*.key, and each FILE "
                    "given. Each must be readable by its owner only (chmod 600). Exits 0 and names them when all "
                    "are, 2 with one line per file that is not or is missing.",
    )
    p.add_argument("files", metavar="FILE", nargs="*", type=Path, help="another secret file to check")
    p.set_defaults(func=run)


def secret_files(env: dict[str, str] | None = None) -> tuple[list[tuple[str, Path]], list[str]]:
    """(what, path) of every secret file to check, and the problems found before any is opened (a file that
    the environment says must exist and does not)."""
    from pnn_cluster.runner.credentials import mlflow_credentials_file

    env = os.environ if env is None else env
    home = Path.home()
    found: list[tuple[str, Path]] = []
    missing: list[str] = []
    token_path = env.get("RAY_AUTH_TOKEN_PATH")
    token = ("RAY_AUTH_TOKEN_PATH", Path(token_path)) if token_path else ("Ray token file", home / ".ray/auth_token")
    if env.get("RAY_AUTH_MODE", "").lower() == "token" and not env.get("RAY_AUTH_TOKEN") and not token[1].exists():
        missing.append(f"{token[0]} {token[1]}: missing; allowed: the cluster's token (mode 600, deploy/README.md "
                       "step 1)")
    found.append(token)
    if env.get("RAY_USE_TLS", "").lower() in ("1", "true"):
        for name in ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT"):
            if not env.get(name) or not Path(env[name]).is_file():
                missing.append(f"{name} {env.get(name) or '(not set)'}: no such file; allowed: with RAY_USE_TLS=1, "
                               "the files deploy/ray/make-tls.sh wrote (deploy/README.md step 4)")
    if env.get("RAY_TLS_SERVER_KEY"):
        found.append(("RAY_TLS_SERVER_KEY", Path(env["RAY_TLS_SERVER_KEY"])))
    found.append(("MLflow credentials file", mlflow_credentials_file()))
    found += [("CURVE key pair", p) for p in sorted((home / ".pnn-cluster/curve").glob("*.key_secret"))]
    found += [("TLS key", p) for p in sorted((home / ".pnn-cluster/tls").glob("*.key"))]
    return found, missing


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.commands import UsageError
    from pnn_cluster.secret_files import SharedSecretFile, check_owner_only

    found, problems = secret_files()
    given = [("secret file", path) for path in args.files]
    checked: list[str] = []
    seen: set[Path] = set()
    for what, path in found + given:
        if path.expanduser() in seen:
            continue  # RAY_TLS_SERVER_KEY is one of ~/.pnn-cluster/tls/*.key
        seen.add(path.expanduser())
        try:
            checked.append(str(check_owner_only(path.expanduser(), what)))
        except FileNotFoundError:
            if (what, path) in given:  # the others: a file this node does without, or one found missing above
                problems.append(f"{what} {path}: no such file")
        except SharedSecretFile as exc:
            problems.append(str(exc))
    if problems:
        raise UsageError("\n".join(problems))
    print(f"readable by their owner only: {', '.join(checked) or 'no secret files here'}", flush=True)
    return 0

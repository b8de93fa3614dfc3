"""``pnn-cluster submit``: a Ray job whose runtime environment carries the credentials of a private secrets file.

``ray job submit --runtime-env FILE`` sends what FILE holds; credentials would then have to sit in a file
next to the code or go on the command line. This command reads the shared runtime environment
(``deploy/ray/runtime-env.yaml``), adds the ``KEY=VALUE`` lines of a secrets file only its owner can read
to its ``env_vars`` and submits the job with Ray's job submission client, so the job's driver and every
actor it starts find ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` in their environment.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import stat
import sys
from pathlib import Path
from typing import Any

#: where the secrets file is looked for when --secrets is not given
DEFAULT_SECRETS = "~/.config/pnn-cluster/secrets.env"
SECRETS_ENV = "PNN_CLUSTER_SECRETS"

_LINE = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="submit a Ray job with credentials from a private secrets file in its runtime environment",
        description="Submits ENTRYPOINT (e.g. pnn-cluster train CONFIG) as a Ray job. Its runtime environment is "
                    "--runtime-env's, with the KEY=VALUE lines of the secrets file added to env_vars: the job's "
                    "driver and its actors get them in their environment, and they never appear on a command line. "
                    "The secrets file must be readable by its owner only (chmod 600). Ray's token authentication "
                    "works as for `ray job submit` (RAY_AUTH_MODE=token, the token in ~/.ray/auth_token or "
                    "RAY_AUTH_TOKEN). Follows the job's log and exits with 0 when the job succeeded, 1 when it "
                    "failed or was stopped (--no-wait: exits once submitted).",
    )
    p.add_argument("--address", default=None,
                   help="the cluster's dashboard, e.g. http://ray-head.lab.example:8265 (default: RAY_ADDRESS)")
    p.add_argument("--runtime-env", metavar="FILE", type=Path, default=None,
                   help="runtime environment YAML (env_vars, pip, working_dir, ...), e.g. deploy/ray/runtime-env.yaml")
    p.add_argument("--secrets", metavar="FILE", type=Path, default=None,
                   help=f"KEY=VALUE lines added to the job's env_vars (default: ${SECRETS_ENV}, else "
                        f"{DEFAULT_SECRETS} if it exists); mode 600")
    p.add_argument("--working-dir", metavar="DIR", default=None,
                   help="upload this directory and run the job in it (runtime_env.working_dir)")
    p.add_argument("--submission-id", default=None, help="the job's id (default: Ray chooses one)")
    p.add_argument("--no-wait", action="store_true", help="exit once the job is submitted")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, metavar="-- ENTRYPOINT",
                   help="the job's command, after --")
    p.set_defaults(func=run)


def read_secrets(path: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of a secrets file only its owner may read (values may be quoted; ``#`` comments).

    Refuses a file that its group or others may read or write, and never repeats a value in an error.
    """
    from pnn_cluster.commands import UsageError

    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"secrets file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise UsageError(f"secrets file {path} is accessible to group or others (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); allowed: its owner only, chmod 600 {path}")
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.fullmatch(line.strip())
        if not m:
            raise UsageError(f"secrets file {path}, line {n}: not KEY=VALUE (KEY a shell variable name)")
        key, value = m.group(1), m.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key in out:
            raise UsageError(f"secrets file {path}, line {n}: {key} set twice; allowed: each key once")
        out[key] = value
    return out


def secrets_path(given: Path | None) -> Path | None:
    """``--secrets``, else ``$PNN_CLUSTER_SECRETS``, else the default file if it exists (else no secrets)."""
    if given is not None:
        return given.expanduser()
    if os.environ.get(SECRETS_ENV):
        return Path(os.environ[SECRETS_ENV]).expanduser()
    default = Path(DEFAULT_SECRETS).expanduser()
    return default if default.is_file() else None


def job_runtime_env(runtime_env_file: Path | None, secrets: dict[str, str], working_dir: str | None) -> dict[str, Any]:
    """The runtime environment of the job: the file's, with the secrets added to (and overriding) env_vars."""
    import yaml

    from pnn_cluster.commands import UsageError

    env: dict[str, Any] = {}
    if runtime_env_file is not None:
        env = yaml.safe_load(runtime_env_file.read_text()) or {}
        if not isinstance(env, dict):
            raise UsageError(f"--runtime-env {runtime_env_file}: a mapping (env_vars:, pip:, ...) expected")
    env_vars = env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise UsageError(f"--runtime-env {runtime_env_file}: env_vars must be a mapping of names to values")
    env["env_vars"] = {str(k): str(v) for k, v in env_vars.items()} | secrets
    if working_dir is not None:
        env["working_dir"] = working_dir
    return env


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.commands import UsageError

    entry = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not entry:
        raise UsageError("no entrypoint; allowed: the job's command after --, e.g. -- pnn-cluster train CONFIG")
    path = secrets_path(args.secrets)
    secrets = read_secrets(path) if path is not None else {}
    if path is None:
        print(f"pnn-cluster submit: note: no secrets file ({DEFAULT_SECRETS} does not exist): the job gets no "
              "credentials", file=sys.stderr, flush=True)
    runtime_env = job_runtime_env(args.runtime_env, secrets, args.working_dir)

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
        job_id = client.submit_job(entrypoint=shlex.join(entry), runtime_env=runtime_env,
                                   submission_id=args.submission_id)
    except AuthenticationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"the cluster refused the job: {first}; with RAY_AUTH_MODE=token, give the cluster's "
                         "token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        # unreachable dashboard, refused token, bad runtime environment: Ray's message says which
        print(f"pnn-cluster submit: error: {exc}", file=sys.stderr)
        return 1
    names = ", ".join(sorted(secrets)) or "none"
    print(f"submitted job {job_id} (credentials in its environment: {names})", flush=True)
    if args.no_wait:
        return 0
    try:
        _follow(client, job_id)
    except KeyboardInterrupt:
        print(f"job {job_id} keeps running; `ray job stop {job_id}` stops it", file=sys.stderr, flush=True)
        raise
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _follow(client: Any, job_id: str) -> None:
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())

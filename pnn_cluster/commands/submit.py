"""``pnn-cluster submit``: a Ray job that carries no secret, sent where the cluster's token does not cross the
network in clear.

What ``ray job submit`` would leave open, this command closes:

- the address: the job API is reached with the cluster's token in every request, so it must be ``https://``
  (the dashboard behind the HTTPS proxy, its certificate checked against ``--ca-cert``) or on loopback (an SSH
  tunnel to the dashboard, which listens on the head's loopback); plain ``http://`` to another machine is
  refused before anything is sent;
- the runtime environment: Ray writes a job's runtime environment, its variables included, to the logs in
  its temporary directory on every node, which other users of the machine may read, so a variable whose name
  says it is a secret (``*PASSWORD*``, ``*SECRET*``, ``*TOKEN*``, ``*CREDENTIAL*``) is refused. The job's
  MLflow credentials are each node's ``~/.mlflow/credentials`` (the jobs' service account, mode 600), never
  the submitter's: the job gets the submitter's login name only (``PNN_CLUSTER_SUBMITTER``), which
  ``pnn-cluster train`` records as the run's ``pnn.submitter`` tag;
- the token file: refused when its group or others may read it.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: the variable that names the submitter in the job's environment; ``pnn-cluster train`` tags its run with it
SUBMITTER_ENV = "PNN_CLUSTER_SUBMITTER"
#: the lab CA's certificate (deploy/ray/make-tls.sh), trusted for an https:// address when --ca-cert is not given
DEFAULT_CA = "~/.pnn-cluster/tls/ca.crt"

#: names of runtime-environment variables that hold a secret (a path to a file is not one)
_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL", re.I)
_PATH_NAME = re.compile(r"_(PATH|FILE|DIR)$", re.I)

_TUNNEL = "ssh -N -L 8265:127.0.0.1:8265 HEAD, then --address http://127.0.0.1:8265"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="submit a Ray job over HTTPS or a tunnel, without secrets in its runtime environment",
        description="Submits ENTRYPOINT (e.g. pnn-cluster train CONFIG) as a Ray job with --runtime-env's runtime "
                    "environment. The address must be https:// (the dashboard behind the lab's HTTPS proxy; "
                    f"--ca-cert, default {DEFAULT_CA}, names the CA that signed its certificate) or on loopback "
                    "(an SSH tunnel to the dashboard): the cluster's token goes with every request. The job's "
                    "runtime environment may hold no secret (Ray writes it to its logs): jobs log to MLflow with "
                    "each node's ~/.mlflow/credentials, and their runs are tagged pnn.submitter with your login "
                    "name. Ray's token authentication works as for `ray job submit` (RAY_AUTH_MODE=token, the "
                    "token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN; a token file must be "
                    "yours alone, chmod 600). Follows the job's log and exits with 0 when the job succeeded, 1 "
                    "when it failed or was stopped (--no-wait: exits once submitted).",
    )
    p.add_argument("--address", default=None,
                   help="the cluster's job API: https://ray-head.lab.example:8443 (the HTTPS proxy) or "
                        "http://127.0.0.1:8265 (an SSH tunnel); default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS")
    p.add_argument("--ca-cert", metavar="FILE", type=Path, default=None,
                   help=f"CA certificate an https:// address's certificate must chain to (default: {DEFAULT_CA} "
                        "if it exists, else the system's CAs)")
    p.add_argument("--runtime-env", metavar="FILE", type=Path, default=None,
                   help="runtime environment YAML (env_vars, pip, working_dir, ...), e.g. deploy/ray/runtime-env.yaml")
    p.add_argument("--working-dir", metavar="DIR", default=None,
                   help="upload this directory and run the job in it (runtime_env.working_dir)")
    p.add_argument("--submission-id", default=None, help="the job's id (default: Ray chooses one)")
    p.add_argument("--no-wait", action="store_true", help="exit once the job is submitted")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, metavar="-- ENTRYPOINT",
                   help="the job's command, after --")
    p.set_defaults(func=run)


def job_address(given: str | None, env: dict[str, str] | None = None) -> str | None:
    """The job API's address as Ray's client will use it (``--address``, else ``RAY_API_SERVER_ADDRESS``, else
    ``RAY_ADDRESS``; None: the cluster on this machine), refused (:class:`UsageError`) when the token would cross
    the network in clear: plain HTTP, or an address Ray turns into plain HTTP, to a host that is not loopback."""
    from pnn_cluster.commands import UsageError
    from pnn_cluster.servers import is_loopback_host

    env = os.environ if env is None else env
    address = given or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS") or None
    if address is None or address == "auto":
        return address
    scheme, rest = address.split("://", 1) if "://" in address else ("", address)
    scheme = scheme.lower()
    host = urlsplit(f"//{rest}").hostname or ""
    if scheme == "https":
        return address
    if scheme not in ("", "http", "ray"):
        raise UsageError(f"--address {address}: scheme {scheme}://; allowed: https://HOST:PORT (the dashboard's "
                         f"HTTPS proxy) or http://127.0.0.1:PORT (an SSH tunnel)")
    if not is_loopback_host(host):
        raise UsageError(f"--address {address}: plain HTTP to {host or 'another machine'} would send the cluster's "
                         "token in clear; allowed: an https:// address (the dashboard's HTTPS proxy, deploy/README.md "
                         f"step 4) or an SSH tunnel to the dashboard on loopback ({_TUNNEL})")
    return address


def ca_verify(address: str | None, ca_cert: Path | None) -> str | bool:
    """What Ray's client checks an https:// address's certificate against: ``--ca-cert``, else the lab CA's
    certificate if this machine has it, else the system's CAs (True)."""
    from pnn_cluster.commands import UsageError

    if ca_cert is not None:
        ca_cert = ca_cert.expanduser()
        if not ca_cert.is_file():
            raise UsageError(f"--ca-cert {ca_cert}: no such file; allowed: the lab CA's certificate "
                             f"({DEFAULT_CA}, from deploy/ray/make-tls.sh)")
        return str(ca_cert)
    default = Path(DEFAULT_CA).expanduser()
    if address is not None and address.lower().startswith("https://") and default.is_file():
        return str(default)
    return True


def check_token_file(env: dict[str, str] | None = None) -> Path | None:
    """The Ray token file this process would send (None: token authentication is off, or the token is given
    in ``RAY_AUTH_TOKEN``, or there is no file), refused when its group or others may read it."""
    from pnn_cluster.commands import UsageError
    from pnn_cluster.secret_files import SharedSecretFile, check_owner_only

    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() != "token" or env.get("RAY_AUTH_TOKEN"):
        return None
    given = env.get("RAY_AUTH_TOKEN_PATH")
    path = Path(given).expanduser() if given else Path.home() / ".ray" / "auth_token"
    try:
        return check_owner_only(path, "RAY_AUTH_TOKEN_PATH" if given else "Ray token file")
    except FileNotFoundError:
        return None  # Ray says the token is missing, in its own words
    except SharedSecretFile as exc:
        raise UsageError(str(exc)) from None


def job_runtime_env(runtime_env_file: Path | None, working_dir: str | None,
                    submitter: str | None = None) -> dict[str, Any]:
    """The job's runtime environment: the file's, refused if a variable holds a secret, with the submitter's
    name added to ``env_vars``."""
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
    for name in env_vars:
        if _SECRET_NAME.search(str(name)) and not _PATH_NAME.search(str(name)):
            raise UsageError(f"--runtime-env {runtime_env_file}: env_vars.{name}: a secret in the job's runtime "
                             "environment, which Ray writes to its logs on every node; allowed: no secrets (jobs "
                             "read MLflow credentials from ~/.mlflow/credentials on each node, deploy/README.md "
                             "step 2; a variable may name a file, *_PATH or *_FILE)")
    env["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    if submitter:
        env["env_vars"][SUBMITTER_ENV] = submitter
    if working_dir is not None:
        env["working_dir"] = working_dir
    return env


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.commands import UsageError

    entry = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not entry:
        raise UsageError("no entrypoint; allowed: the job's command after --, e.g. -- pnn-cluster train CONFIG")
    address = job_address(args.address)
    verify = ca_verify(address, args.ca_cert)
    check_token_file()
    submitter = _login_name()
    runtime_env = job_runtime_env(args.runtime_env, args.working_dir, submitter)
    if args.address:  # Ray's client lets these override its address argument; --address is what was checked
        for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            os.environ.pop(name, None)

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address, verify=verify)
        job_id = client.submit_job(entrypoint=shlex.join(entry), runtime_env=runtime_env,
                                   submission_id=args.submission_id, metadata={"submitter": submitter})
    except AuthenticationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"the cluster refused the job: {first}; with RAY_AUTH_MODE=token, give the cluster's "
                         "token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN") from None
    except (OSError, RuntimeError, ValueError) as exc:  # requests' errors are OSErrors
        # unreachable dashboard or proxy, an untrusted certificate, bad runtime environment: Ray says which
        trusted = "the system's CAs" if verify is True else verify
        hint = f" (its certificate is checked against {trusted}; --ca-cert names the CA that signed it)" \
            if str(address).lower().startswith("https://") else ""
        print(f"pnn-cluster submit: error: {' '.join(str(exc).split())[:600]}{hint}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id} as {submitter} (its runs are tagged pnn.submitter={submitter}; MLflow "
          "credentials: each node's ~/.mlflow/credentials)", flush=True)
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


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container without a passwd entry)
        return f"uid {os.getuid()}"


def _follow(client: Any, job_id: str) -> None:
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())

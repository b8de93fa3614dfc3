"""Finding a run, and what it keeps where: this machine's run directory first, then the tracking server.

Every command that takes a run (``train --resume``, ``evaluate``, ``twins``) looks it up with
:func:`find_run`, in one order: ``source`` as a run directory (``pnn-runs/...``); else ``source`` as a run id
whose run directory this machine has (the newest record, and no server needed); else the run of that id on
the tracking server. What went wrong is an exception of its own, so each command words it for what it was
asked; what a run keeps (checkpoint, configuration, twin versions) is named here once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pnn_cluster.tracking.access import TrackingAccessDenied, denied_status, tracking_user
from pnn_cluster.tracking.outbox import bound_http, is_outage, short_reason
from pnn_cluster.tracking.rundir import RunDir, find_run_dir

__all__ = ["CHECKPOINT_ARTIFACT", "CONFIG_ARTIFACT", "OPERATING_ARTIFACT", "TWIN_VERSIONS_ARTIFACT", "FoundRun",
           "NoSuchRun", "NotARunDir", "RunUnreachable", "download_text", "find_run", "load_run_checkpoint",
           "resolve_tracking_uri", "tracking_client", "twin_state_artifact"]

#: where a run keeps its latest checkpoint and its configuration
CHECKPOINT_ARTIFACT = "checkpoints/last.pt"
CONFIG_ARTIFACT = "config/config.yaml"
#: where a PAT run's training ran each physical layer (pnn_cluster.twins.operating.OperatingRegion, .npz)
OPERATING_ARTIFACT = "operating/region.npz"
#: every version of every twin of a run (fits and refits, accepted or not), rewritten whole at each new one
TWIN_VERSIONS_ARTIFACT = "twins/versions.json"


def twin_state_artifact(device: str, version: int) -> str:
    """Where a run keeps the tensors of one twin version (``circuit/1`` -> ``twins/circuit_1/v3.pt``)."""
    return f"twins/{device.replace('/', '_')}/v{int(version)}.pt"


def resolve_tracking_uri(cli_uri: str | None = None, config_uri: str | None = None,
                         env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None) -> str:
    """``--tracking-uri``, else the configuration's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``,
    else ``sqlite:///mlflow.db`` in the working directory."""
    env = os.environ if env is None else env
    uri = cli_uri or config_uri or env.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def tracking_client(uri: str):
    """An :class:`mlflow.MlflowClient` whose HTTP calls are bounded (seconds, not minutes)."""
    from mlflow import MlflowClient

    bound_http()
    return MlflowClient(tracking_uri=uri)


def download_text(client: Any, run_id: str, artifact: str) -> str | None:
    """A run's text artifact from the server; None when it has none or cannot be asked."""
    try:
        with tempfile.TemporaryDirectory(prefix="pnn-artifact-") as tmp:
            return Path(client.download_artifacts(run_id, artifact, tmp)).read_text()
    except Exception:  # noqa: BLE001 -- no such artifact, or no server: either way, nothing to continue from
        return None


def load_run_checkpoint(client: Any, run_id: str, dest: str | os.PathLike) -> Path | None:
    """Download a run's latest checkpoint into ``dest``; None when the run has none yet."""
    names = {f.path for f in client.list_artifacts(run_id, "checkpoints")}
    if CHECKPOINT_ARTIFACT not in names:
        return None
    return Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(dest)))


# -- one lookup ---------------------------------------------------------------------------------------------


class NotARunDir(ValueError):
    """``source`` is a path that exists but holds no run directory (no ``run.json``)."""


class NoSuchRun(LookupError):
    """Neither this machine nor the tracking server has the run. ``uri``: the server asked, None when none was."""

    def __init__(self, run_id: str, uri: str | None) -> None:
        self.run_id, self.uri = run_id, uri
        super().__init__(f"{run_id}: no run directory of it here" + (f", and no run in {uri}" if uri else ""))


class RunUnreachable(RuntimeError):
    """This machine has no run directory of the run and the tracking server at ``uri`` cannot be reached."""

    def __init__(self, run_id: str, uri: str, reason: str) -> None:
        self.run_id, self.uri, self.reason = run_id, uri, reason
        super().__init__(f"{run_id}: tracking server {uri} unreachable ({reason})")


@dataclass(frozen=True)
class FoundRun:
    """A run found by :func:`find_run` from ``source``: this machine's run directory of it (``local``), or the
    server's record (``local`` None; ``client`` and ``uri`` the server that has it, ``tags`` the run's tags)."""

    source: str
    local: RunDir | None = None
    client: Any = None
    uri: str | None = None
    tags: Mapping[str, str] | None = None

    @property
    def run_id(self) -> str | None:
        """The run's id: the server's once it has the run, else the local one (read when asked: a run
        directory's record may be unreadable, and a command says so in its own words)."""
        return self.local.run_id if self.local is not None else self.source


def find_run(source: str | os.PathLike, connect: Callable[[str], Any] | None, tracking_uri: str | None = None,
             runs_root: str | os.PathLike | None = None) -> FoundRun:
    """The run ``source`` names: a run directory, a run id with a run directory here, or a run on the server.

    ``connect`` makes a client for a tracking URI (:func:`tracking_client`; None: the server is not asked);
    the server's URI is ``tracking_uri`` resolved as :func:`resolve_tracking_uri` does. ``runs_root`` is where
    run directories are searched (default :func:`~pnn_cluster.tracking.rundir.default_runs_root`). Raises
    :class:`NotARunDir` for a path that is no run directory, :class:`RunUnreachable` when only the server could
    answer and it cannot be reached, :class:`~pnn_cluster.tracking.access.TrackingAccessDenied` when it refuses
    this user, :class:`NoSuchRun` when nobody has the run.
    """
    path = Path(source)
    local = None
    if RunDir.is_run_dir(path):
        local = RunDir.open(path)
    elif path.exists():
        raise NotARunDir(str(source))
    else:
        local = find_run_dir(str(source), runs_root)
    if local is not None:
        return FoundRun(str(source), local=local)
    if connect is None:
        raise NoSuchRun(str(source), None)
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    client = connect(uri)
    try:
        run = client.get_run(str(source))
    except MlflowException as exc:
        status = denied_status(exc)
        if status is not None:
            # MLflow's basic-auth app answers 403 for a run it does not have, too (no oracle of run ids)
            needs = f"READ on the experiment of run {source} (if the run exists there)"
            raise TrackingAccessDenied(uri, tracking_user(), status, needs) from None
        if is_outage(exc):
            raise RunUnreachable(str(source), uri, short_reason(exc)) from None
        raise NoSuchRun(str(source), uri) from None
    return FoundRun(str(source), client=client, uri=uri, tags=dict(run.data.tags))

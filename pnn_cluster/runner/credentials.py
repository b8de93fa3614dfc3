"""The MLflow credentials a run presents come from MLflow's own file, and only its owner may read it.

On the lab's cluster every job runs as the user that runs Ray on each node, and logs to MLflow with that
node's ``~/.mlflow/credentials`` (the jobs' service account; MLflow reads the file itself, in every process
that talks to the server), never with a password in the job's runtime environment: Ray writes a job's
runtime environment, its variables included, to the logs in its temporary directory, which other users of
the machine may read. The submitter is a tag of the run, not an account (``pnn-cluster submit``).

A run that would send those credentials to a server refuses, before it starts, a file that its group or
others may read, in one line naming the file, its mode and the ``chmod`` that fixes it.
"""

from __future__ import annotations

from pathlib import Path

from pnn_cluster.config import ConfigError, Problem
from pnn_cluster.secret_files import SharedSecretFile, check_owner_only

__all__ = ["SharedCredentialsFile", "check_tracking_credentials", "mlflow_credentials_file"]


def mlflow_credentials_file() -> Path:
    """Where MLflow reads a user's tracking credentials (``[mlflow]`` ``mlflow_tracking_username`` and
    ``mlflow_tracking_password``): ``~/.mlflow/credentials`` of the process's home directory."""
    return Path.home() / ".mlflow" / "credentials"


class SharedCredentialsFile(ConfigError):
    """The MLflow credentials file may be read by others than its owner: a configuration error, one line."""

    def __init__(self, path: str, problem: str, allowed: str) -> None:
        self.path, self.problem, self.allowed = path, problem, allowed
        super().__init__(f"MLflow credentials file {path}", [Problem("", problem, allowed)])

    def __reduce__(self):  # rebuilt from its fields: raised in a trainer actor, it crosses processes pickled
        return type(self), (self.path, self.problem, self.allowed)


def check_tracking_credentials(tracking_uri: str | None) -> None:
    """Refuse to track to an ``http(s)://`` server with a credentials file that others may read
    (:class:`SharedCredentialsFile`); a local store (``sqlite:``, a directory) uses no credentials."""
    if not str(tracking_uri or "").lower().startswith(("http://", "https://")):
        return
    path = mlflow_credentials_file()
    try:
        check_owner_only(path, "MLflow credentials file")
    except FileNotFoundError:
        return
    except SharedSecretFile as exc:
        raise SharedCredentialsFile(str(exc.path), exc.problem, exc.allowed) from None

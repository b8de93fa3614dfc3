"""A tracking server that says no to this user (HTTP 401 or 403): a configuration error, not an outage.

MLflow's basic-auth app answers 401 when the credentials are missing or wrong and 403 when the user
lacks a permission (creating a run in an experiment needs EDIT on it; the lab's ``basic_auth.ini``
gives everyone READ). Retrying never helps: somebody has to fix the credentials or grant the
permission. So the outbox stops sending, says so once in one line naming the user, the server and
what is needed, and keeps the run directory for ``pnn-cluster sync``; a run refused at its creation
stops the command at once (nothing was measured yet). Connection refused, timeouts and 5xx remain
outages (:func:`pnn_cluster.tracking.outbox.is_outage`).

MLflow raises a refusal in two ways: its REST client as an :class:`~mlflow.exceptions.MlflowException`
whose ``error_code`` is ``UNAUTHENTICATED`` or ``PERMISSION_DENIED``, and its artifact client
(``--serve-artifacts``) as a :class:`requests.HTTPError` whose ``response`` has the status.
"""

from __future__ import annotations

from pnn_cluster.config import ConfigError, Problem

__all__ = ["TrackingAccessDenied", "denied_status", "tracking_user"]

_CODES = {"UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401, "PERMISSION_DENIED": 403}

#: where a lab's MLflow admin grants a permission (deploy/README.md, step 2, says how)
GRANT_HOW = "deploy/mlflow/grant-access.py"


def denied_status(exc: BaseException) -> int | None:
    """401 or 403 when ``exc`` is the tracking server refusing this user; None for anything else."""
    status = _CODES.get(getattr(exc, "error_code", None))
    if status is None:
        response = getattr(exc, "response", None)  # requests.HTTPError: an artifact upload or download
        code = getattr(response, "status_code", None)
        status = code if code in (401, 403) else None
    return status


def tracking_user() -> str | None:
    """The user this process presents to the tracking server (``MLFLOW_TRACKING_USERNAME``, or MLflow's
    credentials file), None when it presents none."""
    try:
        from mlflow.utils.credentials import read_mlflow_creds

        return read_mlflow_creds().username or None
    except Exception:  # noqa: BLE001 -- naming the user is a courtesy; an unreadable credentials file is no user
        return None


class TrackingAccessDenied(ConfigError):
    """The tracking server at ``uri`` refused ``user`` (``status`` 401 or 403) what ``needs`` names
    (e.g. ``EDIT on experiment 'lab-hybrid'``). One line; the command line reports it as a
    configuration error (exit 2)."""

    def __init__(self, uri: str, user: str | None, status: int, needs: str) -> None:
        self.uri, self.user, self.status, self.needs = uri, user, int(status), needs
        who = f"user {user!r}" if user else "a client without a user name"
        if self.status == 401:
            message = (f"refused {who} (401: not authenticated, a wrong or missing password): set "
                       "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (a Ray job: your secrets file) to an "
                       f"account of that server with {needs}")
        else:
            message = (f"refused {who} (403: permission denied): {needs} is needed; an MLflow admin grants it "
                       f"with {GRANT_HOW} (deploy/README.md, step 2)")
        super().__init__(f"tracking server {uri}", [Problem("", message)])

    def __reduce__(self):  # rebuilt from its fields (a Ray actor's error crosses processes pickled)
        return type(self), (self.uri, self.user, self.status, self.needs)

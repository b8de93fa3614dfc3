"""A run's local record, and the outbox that uploads it to MLflow without ever blocking or losing a training.

Every tracking operation of a run (create the run, a batch of metrics,
parameters or tags, an artifact, a logged model, the end status) is first
appended to the run's **journal** in its local run directory, then sent to
the tracking server by one background thread, in order. Artifacts are
files inside the run directory (the checkpoint is written there, atomically
and fsynced, before anything is uploaded). So:

- a training step never waits for the server: it appends to a list; the
  outbox thread does the network calls;
- every call to the server is bounded (``MLFLOW_HTTP_REQUEST_TIMEOUT`` and
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` default to 5 s and no retries here,
  instead of MLflow's 120 s and 7 retries; the outbox retries itself);
- when the server cannot be reached the outage is reported once, the
  training goes on, and the journal keeps growing; the thread tries again
  every ``retry_every_s`` and uploads the backlog when the server is back;
- what was still not uploaded when the process ended (or died) stays in the
  journal: ``pnn-cluster sync`` uploads it later, from the same directory;
- a server that refuses this user (401, 403) is no outage: nothing more is
  sent and that is said once (:mod:`pnn_cluster.tracking.access`); the
  journal waits for ``pnn-cluster sync`` once the permission is granted.

Exactly once: an operation may reach the server and its reply be lost (a
timeout, a crash before ``ids.json`` or ``sent.json`` is written), and then it
is sent again. Metrics, parameters, tags, artifacts and end states are
idempotent; what creates something is made so by its local id: a run carries
its local id in the tag ``pnn.local_id`` and a logged model the local id of its
``log_model`` operation, and both are looked up by it before they are created
again (an operation this process already tried, or one journaled by an earlier
process: a first try costs no lookup); a resume's local id is kept in the run's
``pnn.resume_ids`` tag, so ``pnn.resumed`` counts it once.

The run directory the journal lives in, and its files: :mod:`.rundir`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from pnn_cluster.tracking.access import TrackingAccessDenied, denied_status, tracking_user
from pnn_cluster.tracking.rundir import (
    RunDir,
    RunDirError,
    is_local_id,
    new_local_id,
    server_ids_near,
)

__all__ = ["LOCAL_ID_TAG", "Outbox", "bound_http", "is_outage", "short_reason"]

#: bounded calls to a tracking server (MLflow's defaults are a 120 s timeout and 7 retries with backoff)
HTTP_TIMEOUT_S, HTTP_MAX_RETRIES = 5, 0
#: what the server refuses for the operation itself: retrying it would never help
_REJECTED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
             "INVALID_STATE", "INVALID_REQUEST"}
#: the tag a run or logged model carries its local id in (looked up before creating it again)
LOCAL_ID_TAG = "pnn.local_id"
#: the local ids of the resumes a run has counted in ``pnn.resumed`` (the latest few: a replay is of a recent one)
RESUME_IDS_TAG, _RESUME_IDS_KEPT = "pnn.resume_ids", 64
#: operations that create or count something: each gets a local id when it is journaled
_KEYED = {"log_model", "resume_run"}


def bound_http(timeout_s: float = HTTP_TIMEOUT_S, max_retries: int = HTTP_MAX_RETRIES) -> None:
    """Bound every MLflow HTTP call of this process, unless the user set these variables themselves."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(max_retries)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` says the server (or store) could not be reached; False when it refused the operation
    or this user (401, 403: :func:`~pnn_cluster.tracking.access.denied_status`)."""
    if isinstance(exc, FileNotFoundError) or type(exc) is ValueError:
        return False  # a file gone from the run directory, an operation this version does not know
    if denied_status(exc) is not None:
        return False
    code = getattr(exc, "error_code", None)
    return code not in _REJECTED


def short_reason(exc: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(exc).split())
    m = re.search(r"(Connection refused|Max retries exceeded|timed out|Name or service not known|"
                  r"Temporary failure in name resolution|No route to host|Connection reset|Remote end closed|"
                  r"status code 5\d\d|error code 5\d\d|database is locked|unable to open database)", msg)
    if m:
        return m.group(1)
    return (msg[: limit - 3] + "...") if len(msg) > limit else msg


class _NotYet(Exception):
    """An operation that names a run not created yet (its parent's directory has not been uploaded)."""


class Outbox:
    """Sends a run directory's journal to a tracking server, in order, from one background thread.

    ``submit`` journals an operation and returns at once; ``call`` also waits
    (bounded) for its result. ``drain`` waits until everything is sent, or
    the server has failed once more, or a deadline. ``thread=False`` gives a
    synchronous outbox (``replay``), for ``pnn-cluster sync``. ``denied`` is
    the server's refusal of this user (401, 403), once it has refused: from
    then on this outbox sends nothing. The refusal is said once: by ``warn``,
    or, when it is of an operation a ``call`` is waiting for, by that caller.
    """

    def __init__(self, run_dir: RunDir, client: Any, uri: str, *, retry_every_s: float = 15.0,
                 warn: Callable[[str], None] | None = None, thread: bool = True) -> None:
        self.dir = run_dir
        self.client = client
        self.uri = uri
        self.retry_every_s = float(retry_every_s)
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        journal = run_dir.read_journal()
        self._next = len(journal)
        self._sent = min(run_dir.sent(), self._next)
        #: operations that may have reached the server already: journaled by an earlier process, or tried here
        self._journaled_before, self._tried = self._next, set()
        self._queue: deque[tuple[int, dict[str, Any]]] = deque(
            (i, op) for i, op in enumerate(journal) if i >= self._sent)
        self._last_upload: dict[tuple, int] = {}  # each artifact's latest upload in the journal
        for i, op in self._queue:
            self._note_upload(i, op)
        self._ids = run_dir.ids()
        self._experiments: dict[str, str] = {}
        self._results: dict[int, Any] = {}
        self._waited: set[int] = set()  # operations a call() is waiting for
        self._cv = threading.Condition()
        self._failures = 0  # attempts that met an outage; drain() waits for the next one
        self.offline_since: float | None = None
        self.denied: TrackingAccessDenied | None = None
        self.outages = 0
        self.rejected = 0
        self.uploaded = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self._loop, name="pnn-tracking-outbox", daemon=True)
            self._thread.start()

    # -- the caller's side ---------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._queue)

    @property
    def online(self) -> bool:
        return self.offline_since is None

    def submit(self, op: dict[str, Any]) -> int:
        if op.get("op") in _KEYED and "id" not in op:
            op = {**op, "id": new_local_id()}  # journaled with it: a replay is known for the same operation
        with self._cv:
            seq = self._next
            self._next += 1
            self.dir.append([op])
            self._queue.append((seq, op))
            self._note_upload(seq, op)
            self._cv.notify_all()
        return seq

    def call(self, op: dict[str, Any], wait_s: float) -> tuple[bool, Any]:
        """Submit and wait up to ``wait_s`` (less when the server is known to be away): (done, result)."""
        failures = self._failures
        with self._cv:
            seq = self.submit(op)
            self._waited.add(seq)
            deadline = time.monotonic() + max(0.0, wait_s)
            try:
                while seq not in self._results:
                    left = deadline - time.monotonic()
                    if (left <= 0 or self._failures > failures or not self.online or self.denied is not None
                            or self._thread is None):
                        return False, None
                    self._cv.wait(left)
                return True, self._results.pop(seq)
            finally:
                self._waited.discard(seq)

    def drain(self, wait_s: float) -> bool:
        """Wait until everything journaled is sent (True), the server fails once more, or ``wait_s`` passes."""
        deadline = time.monotonic() + max(0.0, wait_s)
        with self._cv:
            failures = self._failures
            if not self.online:
                self._retry_now = True
                self._cv.notify_all()
            while self._queue:
                left = deadline - time.monotonic()
                if left <= 0 or self._failures > failures or self.denied is not None:
                    return False
                self._cv.wait(left)
            return True

    def close(self, wait_s: float = 0.0) -> int:
        """Drain for up to ``wait_s``, stop the thread; the number of operations left for ``pnn-cluster sync``."""
        self.drain(wait_s)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=HTTP_TIMEOUT_S + 1)
        self.dir.set_sent(self._sent)
        return self.pending

    def replay(self) -> int:
        """Send the whole backlog now, in this thread (``thread=False``); the number left (0: all sent)."""
        while self._queue and self.denied is None:
            if not self._send_one():
                break
        self.dir.set_sent(self._sent)
        return len(self._queue)

    # -- the thread's side ----------------------------------------------------------------------------------------

    _retry_now = False

    def _loop(self) -> None:
        last_try = 0.0
        while True:
            with self._cv:
                while True:
                    if self._closing:
                        return
                    if self._queue and self.denied is None:  # refused: nothing is retried
                        if self.online or self._retry_now:
                            break
                        wait = last_try + self.retry_every_s - time.monotonic()
                        if wait <= 0:
                            break  # retry_every_s has passed: try the server again
                        self._cv.wait(wait)
                    else:
                        self._cv.wait()
                self._retry_now = False
            while self._send_one():
                with self._cv:
                    if not self._queue or self._closing:
                        break
            last_try = time.monotonic()
            self.dir.set_sent(self._sent)

    def _send_one(self) -> bool:
        """Send the head of the queue: True if it is done (sent, or refused for good), False on an outage."""
        with self._cv:
            if not self._queue:
                return False
            seq, op = self._queue[0]
            superseded = self._superseded(seq, op)
            again = seq < self._journaled_before or seq in self._tried
        result = None
        try:
            if not superseded:
                result = self._execute(op, again)
        except _NotYet:
            self._outage(f"run {op.get('run')} is not on the server yet (upload its parent's run directory first)")
            return False
        except Exception as exc:  # noqa: BLE001 -- whatever a tracking store raises, the training goes on
            self._tried.add(seq)  # it may have been done, and only its reply lost
            status = denied_status(exc)
            if status is not None:
                self._deny(TrackingAccessDenied(self.uri, tracking_user(), status, self._needs(op)), seq)
                return False
            if is_outage(exc):
                self._outage(short_reason(exc))
                return False
            self.rejected += 1
            self.warn(f"pnn-cluster: tracking server refused {op.get('op')} ({short_reason(exc)}); skipped")
        with self._cv:
            self._queue.popleft()
            self._sent = seq + 1
            self._results[seq] = result
            self.uploaded += 1
            if self.offline_since is not None:
                self.warn(f"pnn-cluster: tracking server {self.uri} is back after "
                          f"{time.monotonic() - self.offline_since:.0f} s; uploading {len(self._queue) + 1} "
                          "operation(s) kept meanwhile")
                self.offline_since = None
            self._cv.notify_all()
        return True

    def _outage(self, reason: str) -> None:
        with self._cv:
            self._failures += 1
            if self.offline_since is None:
                self.offline_since = time.monotonic()
                self.outages += 1
                self.warn(f"pnn-cluster: tracking server {self.uri} unreachable ({reason}); training goes on, "
                          f"the run is kept in {self.dir.path} and uploaded when the server is back "
                          f"(or by `pnn-cluster sync {self.dir.path}`)")
            self._cv.notify_all()

    def _deny(self, denied: TrackingAccessDenied, seq: int) -> None:
        with self._cv:
            self._failures += 1
            if self.denied is None:
                self.denied = denied
                if seq not in self._waited:  # else the caller waiting for that operation says it
                    self.warn(f"pnn-cluster: {denied}; nothing more is sent: the run is kept in {self.dir.path} "
                              f"and `pnn-cluster sync {self.dir.path}` uploads it once that is fixed")
            self._cv.notify_all()

    def _needs(self, op: Mapping[str, Any]) -> str:
        """The permission ``op`` needs, in the words of MLflow's basic-auth app: writing to a run, a model or an
        experiment's list of runs is EDIT on the experiment."""
        name = op.get("experiment")
        if name is None:
            with contextlib.suppress(RunDirError):
                name = self.dir.meta().get("experiment")
        return f"EDIT on experiment {name!r}" if name else "EDIT on the run's experiment"

    @staticmethod
    def _upload_key(op: Mapping[str, Any]) -> tuple | None:
        if op.get("op") != "log_artifact":
            return None
        return op.get("run"), op["file"], op.get("artifact_path")

    def _note_upload(self, seq: int, op: Mapping[str, Any]) -> None:
        key = self._upload_key(op)
        if key is not None:
            self._last_upload[key] = seq

    def _superseded(self, seq: int, op: Mapping[str, Any]) -> bool:
        # a backlog holding several uploads of checkpoints/last.pt sends the file once: it is the latest anyway
        key = self._upload_key(op)
        return key is not None and self._last_upload.get(key, seq) > seq

    def _run_id(self, rid: str | None) -> str | None:
        if rid is None or not is_local_id(rid):
            return rid
        if rid in self._ids:
            return self._ids[rid]
        near = server_ids_near(self.dir)
        if rid in near:
            self._ids[rid] = near[rid]
            return near[rid]
        raise _NotYet(rid)

    def _experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            exp = self.client.get_experiment_by_name(name)
            self._experiments[name] = exp.experiment_id if exp else self.client.create_experiment(name)
        return self._experiments[name]

    def _find_run(self, experiment_id: str, local: str) -> str | None:
        """The server's id of the run tagged with local id ``local``: one a lost reply left behind."""
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{LOCAL_ID_TAG}` = '{local}'",
                                        max_results=1)
        return found[0].info.run_id if found else None

    def _execute(self, op: Mapping[str, Any], again: bool = False) -> Any:
        """Send ``op``; ``again``: it may have reached the server before (what it creates is looked up first)."""
        from mlflow.entities import Metric, Param, RunTag

        kind = op["op"]
        c = self.client
        if kind == "create_run":
            local = op["run"]
            if local in self._ids:  # created before a crash cut the acknowledgement short
                return self._ids[local]
            tags = {**(op.get("tags") or {}), LOCAL_ID_TAG: local}
            if "mlflow.parentRunId" in tags:
                tags["mlflow.parentRunId"] = self._run_id(tags["mlflow.parentRunId"])
            experiment_id = self._experiment_id(op["experiment"])
            rid = self._find_run(experiment_id, local) if again else None
            if rid is None:
                rid = c.create_run(experiment_id, start_time=op.get("start_time"), run_name=op.get("run_name"),
                                   tags=tags).info.run_id
            self._ids[local] = rid
            self.dir.add_id(local, rid)
            return rid
        run = self._run_id(op.get("run"))
        if kind == "log_batch":
            c.log_batch(run, metrics=[Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in op.get("metrics", ())],
                        params=[Param(k, v) for k, v in op.get("params", ())],
                        tags=[RunTag(k, v) for k, v in op.get("tags", ())])
        elif kind == "resume_run":
            self._resume(run, op.get("id"))
        elif kind == "set_terminated":
            c.set_terminated(run, op["status"], end_time=op.get("end_time"))
        elif kind == "log_artifact":
            path = self.dir.path / op["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} (removed from the run directory)")
            c.log_artifact(run, str(path), op.get("artifact_path"))
        elif kind == "log_model":
            return self._log_model(op, run, again)
        else:
            raise ValueError(f"journal operation {kind!r} unknown")  # a journal from a newer version
        return None

    def _resume(self, run: str, local: str | None) -> None:
        """Mark ``run`` RUNNING again and count the resume in ``pnn.resumed``, once per resume's local id."""
        from mlflow.entities import RunTag

        tags = self.client.get_run(run).data.tags
        counted = tags.get(RESUME_IDS_TAG, "").split()
        if local is None or local not in counted:
            resumed = int(tags.get("pnn.resumed", "0")) + 1
            new = [RunTag("pnn.resumed", str(resumed))]
            if local is not None:
                new.append(RunTag(RESUME_IDS_TAG, " ".join([*counted, local][-_RESUME_IDS_KEPT:])))
            if "pnn.error" in tags:  # what stopped it last time stays on record, under another name
                new.append(RunTag(f"pnn.interrupted.{resumed}", tags["pnn.error"]))
            self.client.log_batch(run, tags=new)  # one write: counted and marked as counted together
        if "pnn.error" in tags:
            self.client.delete_tag(run, "pnn.error")
        self.client.update_run(run, status="RUNNING")

    def _log_model(self, op: Mapping[str, Any], run: str | None, again: bool) -> str:
        """A logged model from a folder of the run directory; one a lost reply left behind (found by the
        operation's local id) is completed rather than made again."""
        from mlflow.entities import LoggedModelStatus

        c = self.client
        experiment_id = self._experiment_id(op["experiment"])
        local = op.get("id")  # None in a journal of before local ids: created as it was then
        model = None
        if local is not None and again:
            found = c.search_logged_models([experiment_id], filter_string=f"tags.`{LOCAL_ID_TAG}` = '{local}'",
                                           max_results=1)
            model = found[0] if found and found[0].status != LoggedModelStatus.FAILED else None
            if model is not None and model.status == LoggedModelStatus.READY:
                return model.model_id
        if model is None:
            tags = {**(op.get("tags") or {}), **({LOCAL_ID_TAG: local} if local is not None else {})}
            model = c.create_logged_model(experiment_id, name=op["name"], source_run_id=run, tags=tags)
        try:
            c.log_model_artifacts(model.model_id, str(self.dir.path / op["dir"]))
        except Exception as exc:
            if denied_status(exc) is None and not is_outage(exc):  # refused for good: it will not be retried
                with contextlib.suppress(Exception):
                    c.finalize_logged_model(model.model_id, "FAILED")
            raise  # else it stays PENDING, and the retry completes this one
        c.finalize_logged_model(model.model_id, "READY")
        return model.model_id

"""The outbox of a run directory, against a stand-in tracking client that can be switched off and on, and
against a real MLflow store whose replies are lost on purpose (the operation done, the client told it failed)."""

from __future__ import annotations

import re
import threading
from types import SimpleNamespace
from unittest import mock

import pytest

pytest.importorskip("mlflow")  # imported here, not first in an outbox's thread (urllib3 probes IPv6 with a socket)

from pnn_cluster.tracking.access import TrackingAccessDenied, denied_status
from pnn_cluster.tracking.outbox import Outbox, is_outage
from pnn_cluster.tracking.rundir import RunDir, RunDirError, default_runs_root


class Down(Exception):
    """What an unreachable server raises: an MLflow exception without a refusal code."""

    error_code = "INTERNAL_ERROR"


class Refused(Exception):
    error_code = "INVALID_PARAMETER_VALUE"


class FakeClient:
    def __init__(self):
        self.up = threading.Event()
        self.up.set()
        self.calls: list[tuple] = []
        self.runs = 0
        self.created: dict[str, dict] = {}
        self.refuse = set()
        self.deny: Exception | None = None
        self.attempts = 0

    def _call(self, *what):
        self.attempts += 1
        if not self.up.is_set():
            raise Down("API request to http://x failed with exception Connection refused")
        if self.deny is not None:
            raise self.deny
        if what[0] in self.refuse:
            raise Refused("bad value")
        if what[0] != "search_runs":
            self.calls.append(what)

    def get_experiment_by_name(self, name):
        return SimpleNamespace(experiment_id="1")

    def search_runs(self, experiment_ids, filter_string="", max_results=None):
        self._call("search_runs")
        local = re.search(r"'(local-[0-9a-f]+)'", filter_string).group(1)
        return [SimpleNamespace(info=SimpleNamespace(run_id=rid)) for rid, tags in self.created.items()
                if tags.get("pnn.local_id") == local]

    def create_run(self, experiment_id, start_time=None, run_name=None, tags=None):
        self._call("create_run", run_name, dict(tags or {}))
        self.runs += 1
        self.created[f"server-{self.runs}"] = dict(tags or {})
        return SimpleNamespace(info=SimpleNamespace(run_id=f"server-{self.runs}"))

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._call("log_batch", run_id, len(metrics), len(params), len(tags))

    def log_artifact(self, run_id, path, artifact_path=None):
        self._call("log_artifact", run_id, path.rsplit("/", 1)[-1], artifact_path)

    def set_terminated(self, run_id, status, end_time=None):
        self._call("set_terminated", run_id, status)


def metrics(n, step=0):
    return [("loss", 1.0, 0, step + i) for i in range(n)]


def test_operations_reach_the_server_in_order_with_local_ids_mapped(tmp_path):
    client = FakeClient()
    d = RunDir.create(tmp_path, "run", {"tracking_uri": "x"})
    box = Outbox(d, client, "x")
    done, rid = box.call({"op": "create_run", "run": "local-a", "experiment": "e", "run_name": "parent"}, 5)
    assert done and rid == "server-1"
    box.submit({"op": "create_run", "run": "local-b", "experiment": "e", "run_name": "child",
                "tags": {"mlflow.parentRunId": "local-a"}})
    box.submit({"op": "log_batch", "run": "local-b", "metrics": metrics(3)})
    box.submit({"op": "set_terminated", "run": "local-a", "status": "FINISHED"})
    assert box.drain(10) and box.close() == 0
    assert client.calls[1] == ("create_run", "child", {"mlflow.parentRunId": "server-1", "pnn.local_id": "local-b"})
    assert client.calls[2:] == [("log_batch", "server-2", 3, 0, 0), ("set_terminated", "server-1", "FINISHED")]
    assert d.ids() == {"local-a": "server-1", "local-b": "server-2"} and d.sent() == 4 and d.pending() == 0


def test_an_outage_is_reported_once_and_the_backlog_goes_when_the_server_is_back(tmp_path):
    client = FakeClient()
    d = RunDir.create(tmp_path, "run", {})
    warnings = []
    box = Outbox(d, client, "http://x", retry_every_s=0.05, warn=warnings.append)
    box.call({"op": "create_run", "run": "local-a", "experiment": "e"}, 5)
    client.up.clear()
    for i in range(5):
        box.submit({"op": "log_batch", "run": "local-a", "metrics": metrics(2, 2 * i)})
    assert not box.drain(10)  # returns once the server has failed again, not after the deadline
    assert not box.online and box.pending == 5
    assert sum("unreachable" in w for w in warnings) == 1
    client.up.set()
    assert box.drain(10) and box.online
    assert [c[0] for c in client.calls[1:]] == ["log_batch"] * 5
    assert sum("unreachable" in w for w in warnings) == 1 and any("is back" in w for w in warnings)
    box.close()


def test_a_refused_operation_is_skipped_not_retried(tmp_path):
    client = FakeClient()
    client.refuse.add("log_batch")
    warnings = []
    box = Outbox(RunDir.create(tmp_path, "run", {}), client, "x", warn=warnings.append)
    box.submit({"op": "log_batch", "run": "r1", "metrics": metrics(1)})
    box.submit({"op": "set_terminated", "run": "r1", "status": "FINISHED"})
    assert box.drain(10) and box.online and box.rejected == 1
    assert client.calls == [("set_terminated", "r1", "FINISHED")] and "refused log_batch" in warnings[0]
    box.close()


def test_what_a_dead_process_left_is_replayed_and_a_checkpoint_sent_once(tmp_path):
    client = FakeClient()
    client.up.clear()
    d = RunDir.create(tmp_path, "run", {"run_id": "local-a"})  # as a tracker records a run not yet created
    d.lock()
    box = Outbox(d, client, "x", warn=lambda m: None)
    box.submit({"op": "create_run", "run": "local-a", "experiment": "e"})
    (d.path / "checkpoints").mkdir()
    (d.path / "checkpoints" / "last.pt").write_bytes(b"epoch 3")
    for _ in range(3):  # three epochs' uploads of the same file while the server was away
        box.submit({"op": "log_artifact", "run": "local-a", "file": "checkpoints/last.pt",
                    "artifact_path": "checkpoints"})
    box.submit({"op": "log_batch", "run": "local-a", "metrics": metrics(4)})
    assert box.close(1) == 5
    d.unlock()  # the process is gone; a later `pnn-cluster sync` opens the directory
    client.up.set()
    later = RunDir.open(d.path)
    later.lock()
    assert Outbox(later, client, "x", thread=False).replay() == 0
    assert [c[0] for c in client.calls] == ["create_run", "log_artifact", "log_batch"]
    assert later.run_id == "server-1" and later.pending() == 0
    later.unlock()


def test_one_writer_per_run_directory(tmp_path):
    d = RunDir.create(tmp_path, "run", {})
    d.lock()
    with pytest.raises(RunDirError, match="in use by pid"):
        RunDir(d.path).lock()
    d.unlock()
    RunDir(d.path).lock()
    with pytest.raises(RunDirError, match="not a run directory"):
        RunDir.open(tmp_path)


def test_outage_or_refusal():
    assert is_outage(Down("Connection refused")) and is_outage(ConnectionError("reset"))
    assert not is_outage(Refused("bad")) and not is_outage(FileNotFoundError("gone"))


# -- exactly once: a reply lost after the server did the work ------------------------------------------------------


class Crash(BaseException):
    """The process dying right after a call returned, before anything else was written."""


class LostReply:
    """A real MLflow client whose ``lose`` method is done by the server and then reported failed: the reply
    lost to a timeout (``crash=False``: an outage, retried) or to the process dying (``crash=True``); once."""

    def __init__(self, client, lose: str, crash: bool = False) -> None:
        self.client, self.lose, self.crash, self.lost = client, lose, crash, 0

    def __getattr__(self, name):
        real = getattr(self.client, name)
        if name != self.lose:
            return real

        def done_then_lost(*args, **kwargs):
            out = real(*args, **kwargs)
            if not self.lost:
                self.lost += 1
                if self.crash:
                    raise Crash(name)
                from mlflow.exceptions import MlflowException

                raise MlflowException(f"API request to http://mlflow.lab.example:5000/api/2.0/mlflow/{name} failed "
                                      "with timeout exception Read timed out. (read timeout=5)")
            return out

        return done_then_lost


def replay_until_done(d: RunDir, client) -> None:
    """Send the journal as often as it takes, each time from a fresh outbox after a crash (a new process)."""
    for _ in range(3):
        try:
            d.lock()
            if Outbox(RunDir.open(d.path), client, "x", thread=False, warn=lambda m: None).replay() == 0:
                return
        except Crash:
            pass
        finally:
            d.unlock()
    pytest.fail("the journal was not sent in three tries")


@pytest.mark.parametrize("crash", [False, True], ids=["reply-timed-out", "crashed-before-ids-written"])
def test_a_run_whose_creation_reply_was_lost_is_created_once(tmp_path, mlflow_store, crash):
    from mlflow import MlflowClient

    real = MlflowClient(mlflow_store)
    d = RunDir.create(tmp_path / "runs", "run", {"run_id": "local-0a"})
    d.append([{"op": "create_run", "run": "local-0a", "experiment": "e", "run_name": "r"},
              {"op": "log_batch", "run": "local-0a", "metrics": metrics(2)},
              {"op": "set_terminated", "run": "local-0a", "status": "FINISHED"}])
    replay_until_done(d, LostReply(real, "create_run", crash))
    (run,) = real.search_runs([real.get_experiment_by_name("e").experiment_id])
    assert d.run_id == run.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["pnn.local_id"] == "local-0a" and run.data.metrics["loss"] == 1.0


@pytest.mark.parametrize("lose", ["create_logged_model", "log_model_artifacts", "finalize_logged_model"])
def test_a_logged_model_whose_reply_was_lost_is_logged_once_and_ready(tmp_path, mlflow_store, lose):
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    real = MlflowClient(mlflow_store)
    run = real.create_run(real.create_experiment("e"))
    d = RunDir.create(tmp_path / "runs", "run", {"run_id": run.info.run_id})
    (d.path / "models" / "stack").mkdir(parents=True)
    (d.path / "models" / "stack" / "state_dict.pt").write_bytes(b"weights")
    d.lock()
    Outbox(d, real, "x", thread=False).submit(  # as the tracker journals it: the outbox gives it its local id
        {"op": "log_model", "run": run.info.run_id, "experiment": "e", "name": "stack", "dir": "models/stack"})
    d.unlock()
    replay_until_done(d, LostReply(real, lose))
    (model,) = real.search_logged_models([run.info.experiment_id])
    assert model.status == LoggedModelStatus.READY and model.name == "stack"
    assert [f.path for f in real.list_logged_model_artifacts(model.model_id)] == ["state_dict.pt"]


@pytest.mark.parametrize("lose", ["log_batch", "delete_tag", "update_run"])
def test_a_resume_whose_reply_was_lost_is_counted_once(tmp_path, mlflow_store, lose):
    from mlflow import MlflowClient

    real = MlflowClient(mlflow_store)
    run = real.create_run(real.create_experiment("e"), tags={"pnn.error": "KeyboardInterrupt: "})
    real.set_terminated(run.info.run_id, "KILLED")
    d = RunDir.create(tmp_path / "runs", "run", {"run_id": run.info.run_id})
    d.lock()
    Outbox(d, real, "x", thread=False).submit({"op": "resume_run", "run": run.info.run_id})
    d.unlock()
    replay_until_done(d, LostReply(real, lose, crash=True))
    after = real.get_run(run.info.run_id)
    assert after.info.status == "RUNNING" and after.data.tags["pnn.resumed"] == "1"
    assert after.data.tags["pnn.interrupted.1"] == "KeyboardInterrupt: " and "pnn.error" not in after.data.tags


# -- who the server refuses: a configuration error, not an outage ----------------------------------------------------


def raised_by_mlflow(status: int | None = None, body: str = "", exc: Exception | None = None) -> Exception:
    """What ``MlflowClient.create_run`` raises when the server answers ``status`` with ``body`` (or the
    transport raises ``exc``): MLflow's own client and error handling, only the HTTP exchange stood in for."""
    import requests
    from mlflow import MlflowClient

    def answer(*args, **kwargs):
        if exc is not None:
            raise exc
        response = requests.Response()
        response.status_code, response._content, response.url = status, body.encode(), "http://mlflow/api"
        return response

    with mock.patch("mlflow.utils.rest_utils._get_http_response_with_retries", answer), \
            pytest.raises(Exception) as caught:
        MlflowClient("http://mlflow.lab.example:5000").create_run("1")
    return caught.value


def artifact_refused(status: int) -> Exception:
    """What an artifact upload through the server (``--serve-artifacts``) raises on ``status``."""
    import requests
    from mlflow.utils.rest_utils import augmented_raise_for_status

    response = requests.Response()
    response.status_code, response._content, response.url = status, b"Permission denied", "http://mlflow/a"
    with pytest.raises(requests.HTTPError) as caught:
        augmented_raise_for_status(response)
    return caught.value


def test_401_and_403_are_refusals_of_the_user_and_outages_stay_outages():
    import requests

    denied = {403: raised_by_mlflow(403, "Permission denied"),
              401: raised_by_mlflow(401, "You are not authenticated."),
              -403: artifact_refused(403)}
    for status, exc in denied.items():
        assert denied_status(exc) == abs(status) and not is_outage(exc), exc
    outages = [raised_by_mlflow(503, "busy"), raised_by_mlflow(502, "<html>bad gateway</html>"),
               raised_by_mlflow(500, '{"error_code": "INTERNAL_ERROR", "message": "database is locked"}'),
               raised_by_mlflow(exc=requests.exceptions.ConnectionError("[Errno 111] Connection refused")),
               raised_by_mlflow(exc=requests.exceptions.ReadTimeout("Read timed out. (read timeout=5)")),
               artifact_refused(503)]
    for exc in outages:
        assert is_outage(exc) and denied_status(exc) is None, exc
    rejected = raised_by_mlflow(400, '{"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}')
    assert not is_outage(rejected) and denied_status(rejected) is None


def test_a_refused_user_is_told_once_in_one_line_and_nothing_is_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    client = FakeClient()
    client.deny = raised_by_mlflow(403, "Permission denied")
    d = RunDir.create(tmp_path, "run", {"experiment": "lab"})
    warnings = []
    box = Outbox(d, client, "https://mlflow.lab.example:5000", retry_every_s=0.01, warn=warnings.append)
    box.submit({"op": "create_run", "run": "local-a", "experiment": "lab"})
    box.submit({"op": "log_batch", "run": "local-a", "metrics": metrics(2)})
    assert not box.drain(30) and isinstance(box.denied, TrackingAccessDenied)  # at once, not after 30 s
    assert box.online  # not an outage
    done, _ = box.call({"op": "log_batch", "run": "local-a", "metrics": metrics(1)}, 30)
    assert not done and box.close() == 3 and client.attempts == 1 and client.calls == []
    (line,) = warnings
    assert "\n" not in line and "tracking server https://mlflow.lab.example:5000: refused user 'bob' (403" in line
    assert "EDIT on experiment 'lab' is needed" in line and f"pnn-cluster sync {d.path}" in line
    # the permission granted, a new outbox (pnn-cluster sync) sends the whole journal
    client.deny = None
    assert Outbox(RunDir.open(d.path), client, "x", thread=False).replay() == 0
    assert [c[0] for c in client.calls] == ["create_run", "log_batch", "log_batch"]


def test_a_refusal_of_what_a_caller_waits_for_is_the_callers_to_say(tmp_path):
    client = FakeClient()
    client.deny = raised_by_mlflow(401, "You are not authenticated.")
    warnings = []
    box = Outbox(RunDir.create(tmp_path, "run", {}), client, "x", warn=warnings.append)
    done, _ = box.call({"op": "create_run", "run": "local-a", "experiment": "lab"}, 30)
    assert not done and box.denied.status == 401 and warnings == []
    box.close()


def test_a_refusal_crosses_processes_whole():
    import pickle

    denied = TrackingAccessDenied("https://mlflow.lab.example:5000", "bob", 403, "EDIT on experiment 'lab'")
    again = pickle.loads(pickle.dumps(denied))
    assert str(again) == str(denied) and again.user == "bob" and again.status == 403
    assert "401: not authenticated" in str(TrackingAccessDenied("https://m", None, 401, "EDIT on experiment 'x'"))


# -- where run directories go ------------------------------------------------------------------------------------


def test_runs_directory_is_persistent_even_in_a_ray_jobs_temporary_working_dir(tmp_path):
    home = tmp_path / "home"
    ray_copy = tmp_path / "ray/session_latest/runtime_resources/working_dir_files/_ray_pkg_0123"
    assert default_runs_root({"HOME": str(home)}, cwd=tmp_path) == tmp_path.resolve() / "pnn-runs"
    assert default_runs_root({"HOME": str(home)}, cwd=ray_copy) == home.resolve() / "pnn-runs"
    assert default_runs_root({"HOME": str(home), "PNN_RUNS_DIR": str(tmp_path / "r")}, cwd=ray_copy) == \
        (tmp_path / "r").resolve()

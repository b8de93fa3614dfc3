"""The outbox of a run directory, against a stand-in tracking client that can be switched off and on."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from pnn_cluster.tracking.outbox import Outbox, RunDir, RunDirError, is_outage


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
        self.refuse = set()

    def _call(self, *what):
        if not self.up.is_set():
            raise Down("API request to http://x failed with exception Connection refused")
        if what[0] in self.refuse:
            raise Refused("bad value")
        self.calls.append(what)

    def get_experiment_by_name(self, name):
        return SimpleNamespace(experiment_id="1")

    def create_run(self, experiment_id, start_time=None, run_name=None, tags=None):
        self._call("create_run", run_name, dict(tags or {}))
        self.runs += 1
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
    assert client.calls[1] == ("create_run", "child", {"mlflow.parentRunId": "server-1"})
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

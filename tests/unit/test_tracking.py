"""MLflow tracking without a store to create: a training step never touches the store, and which tracking URI
wins (`pnn-cluster train` recorded in MLflow and read back: ``tests/system/test_tracking.py``)."""

from __future__ import annotations

import pytest

pytest.importorskip("mlflow")


def test_a_training_step_never_touches_the_store(tmp_path):
    from types import SimpleNamespace

    from pnn_cluster.tracking import MlflowCallback

    cb = MlflowCallback("sqlite:///unused.db", flush_every_s=3600, runs_root=tmp_path / "runs")
    cb.start()
    cb.outbox.close()  # nothing reaches a store: what a step does is all in the journal, or not
    journaled = len(cb.dir.read_journal())
    trainer = SimpleNamespace(global_step=0)
    for step in range(1, 201):
        trainer.global_step = step
        cb.on_step_end(trainer, {"train_loss": 1.0, "train_acc": 0.5, "lr": 0.01})
    assert len(cb.dir.read_journal()) == journaled  # 200 steps: list appends only, not even the journal
    cb.flush()
    (batch,) = cb.dir.read_journal()[journaled:]  # then one batch of 600 metrics, for the outbox to send
    assert batch["op"] == "log_batch" and len(batch["metrics"]) == 600
    assert cb.dir.metric_history(cb.run_id, ["train_loss"])["train_loss"][-1] == (200, 1.0)


def test_tracking_uri_precedence(tmp_path):
    from pnn_cluster.tracking import resolve_tracking_uri

    env = {"MLFLOW_TRACKING_URI": "http://env:5000"}
    assert resolve_tracking_uri("http://cli:5000", "http://cfg:5000", env) == "http://cli:5000"
    assert resolve_tracking_uri(None, "http://cfg:5000", env) == "http://cfg:5000"
    assert resolve_tracking_uri(None, None, env) == "http://env:5000"
    assert resolve_tracking_uri(None, None, {}, cwd=tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def forbidden(*args, **kwargs):
    """Every HTTP exchange of MLflow's client, answered as its basic-auth app answers a user without permission."""
    import requests

    response = requests.Response()
    response.status_code, response._content, response.url = 403, b"Permission denied", "https://mlflow/api"
    return response


def test_a_run_the_server_refuses_to_create_stops_at_once_in_one_line(tmp_path, monkeypatch):
    """403 is a configuration error: the command stops (exit 2) with one line naming the user, the server and
    the permission, at once (not after the wait for the server), and leaves no run directory to upload."""
    import time
    from unittest import mock

    from pnn_cluster.cli import explain
    from pnn_cluster.tracking import MlflowCallback
    from pnn_cluster.tracking.access import TrackingAccessDenied

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-this-one")
    uri = "https://mlflow.lab.example:5000"
    cb = MlflowCallback(uri, experiment="lab-hybrid", runs_root=tmp_path / "runs", start_wait_s=60)
    t0 = time.monotonic()
    with mock.patch("mlflow.utils.rest_utils._get_http_response_with_retries", forbidden), \
            pytest.raises(TrackingAccessDenied) as refused:
        cb.start()
    assert time.monotonic() - t0 < 30
    code, lines = explain(refused.value)
    assert code == 2 and lines == [
        f"error: tracking server {uri}: refused user 'bob' (403: permission denied): EDIT on experiment 'lab-hybrid' "
        "is needed; an MLflow admin grants it with deploy/mlflow/grant-access.py (deploy/README.md, step 2)"]
    assert list((tmp_path / "runs").iterdir()) == []
    cb.end()  # nothing to end: the run never was


def test_a_run_looked_up_on_a_server_that_refuses_the_user_says_so(tmp_path, monkeypatch):
    from unittest import mock

    from pnn_cluster.tracking import tracking_client
    from pnn_cluster.tracking.access import TrackingAccessDenied
    from pnn_cluster.tracking.runs import find_run

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    uri = "https://mlflow.lab.example:5000"
    with mock.patch("mlflow.utils.rest_utils._get_http_response_with_retries", forbidden), \
            pytest.raises(TrackingAccessDenied) as refused:
        find_run("0123456789abcdef0123456789abcdef", tracking_client, uri, runs_root=tmp_path)
    assert str(refused.value).startswith(f"tracking server {uri}: refused user 'bob' (403: permission denied): "
                                         "READ on the experiment of run 0123456789abcdef0123456789abcdef")

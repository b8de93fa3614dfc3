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

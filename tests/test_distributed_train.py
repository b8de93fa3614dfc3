"""`pnn-cluster train` on the shared test cluster: every device in an actor on its instrument's node."""

from __future__ import annotations

import json

import pytest
import yaml

from pnn_cluster.cli import main

pytestmark = pytest.mark.system

CONFIG = {
    "name": "tiny-cluster",
    "dataset": {"name": "digits", "train_subset": 120, "test_subset": 60},
    "devices": {"circuit": {
        "driver": {"kind": "simulated", "system": "circuit", "options": {"n_in": 8, "n_out": 8},
                   "imperfections": {"latency_call_s": 0, "latency_sample_s": 0}},
        "placement": {"instrument": "circuit-bench-2"},
        "twin": {"kind": "physics", "groups": 5, "batch": 24, "epochs": 4}}},
    "stack": [{"kind": "linear", "size": 8}, {"kind": "rescale"}, {"kind": "physical", "device": "circuit"},
              {"kind": "linear", "size": 10}],
    "optimizer": {"lr": 0.05},
    "schedule": {"epochs": 2, "batch_size": 40, "eval_batch": 60},
}


def _run(tmp_path, capsys, *extra):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert main(["train", str(path), "--no-track", "--no-progress", "--json", *extra]) == 0
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


def test_train_runs_devices_in_actors_and_matches_in_process(ray_cluster, tmp_path, capsys):
    out, dist = _run(tmp_path, capsys)
    assert "1 device actor(s) on Ray" in out
    assert dist["device_actors"] == 1 and dist["steps"] == 6
    _, local = _run(tmp_path, capsys, "--in-process")
    assert local["device_actors"] == 0 and local["steps"] == 6
    # the same devices (same seeds) measured through the pipeline: the same training within noise
    assert dist["device_samples"] == local["device_samples"]
    assert abs(dist["test_acc"] - local["test_acc"]) <= 0.1, (dist, local)

"""`pnn-cluster train` on the shared test cluster: every device in an actor on its instrument's node."""

from __future__ import annotations

import json
import types

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
    assert "1 device actor(s) on Ray" in out and "the loop runs in a trainer actor" in out
    assert dist["device_actors"] == 1 and dist["steps"] == 6
    assert dist["twin_actors"] == 1 and dist["trainer_actor"] is True
    assert dist["nodes"] == {"circuit": ray_cluster.lab_nodes["circuit-bench-2"]}
    _, local = _run(tmp_path, capsys, "--in-process")
    assert local["device_actors"] == 0 and local["steps"] == 6
    assert local["twin_actors"] == 0 and local["trainer_actor"] is False
    # the same devices (same seeds) measured through the pipeline: the same training within noise
    assert dist["device_samples"] == local["device_samples"]
    assert abs(dist["test_acc"] - local["test_acc"]) <= 0.1, (dist, local)


def test_placement_labels_and_resources_reach_the_device_actor(monkeypatch, tmp_path):
    """Without a cluster: what a device actor asks Ray for, for a device placed by instrument, labels, resources."""
    import actors.device
    from pnn_cluster.config import parse_config
    from pnn_cluster.runner import device_recipes

    raw = {**CONFIG, "devices": {"circuit": {**CONFIG["devices"]["circuit"], "placement": {
        "instrument": "circuit-bench-2", "labels": {"lab": "optics-room"}, "resources": {"scope": 1}}}}}
    cfg = parse_config(raw, source=str(tmp_path / "inline.yaml"))
    asked = []

    class FakeActorClass:
        def options(self, **opts):
            asked.append(opts)
            return types.SimpleNamespace(remote=lambda recipe: ("actor", recipe))

    monkeypatch.setattr(actors.device, "DeviceActor", FakeActorClass())
    recipe, = device_recipes(cfg)["circuit"]
    assert actors.device.start_device(recipe) == ("actor", recipe)
    opts, = asked
    assert opts["resources"] == {"scope": 1.0, "instrument:circuit-bench-2": 1.0}
    assert opts["label_selector"] == {"lab": "optics-room"}
    assert opts["num_cpus"] == 0 and opts["max_concurrency"] == 2

"""What a device actor asks Ray for, without a cluster (`pnn-cluster train` on the shared test cluster:
``tests/system/test_distributed_train.py``)."""

from __future__ import annotations

import types

from helpers import tiny_config


def test_placement_labels_and_resources_reach_the_device_actor(monkeypatch, tmp_path):
    """Without a cluster: what a device actor asks Ray for, for a device placed by instrument, labels, resources."""
    import actors.device
    from pnn_cluster.config import parse_config
    from pnn_cluster.runner import device_recipes

    raw = tiny_config(name="tiny-cluster", dataset={"train_subset": 120, "test_subset": 60},
                      imperfections={"latency_call_s": 0, "latency_sample_s": 0}, placement={
                          "instrument": "circuit-bench-2", "labels": {"lab": "optics-room"}, "resources": {"scope": 1}},
                      twin={"kind": "physics", "groups": 5, "batch": 24, "epochs": 4}, optimizer={"lr": 0.05},
                      schedule={"epochs": 2, "batch_size": 40, "eval_batch": 60})
    cfg = parse_config(raw, source=str(tmp_path / "inline.yaml"))
    asked = []

    class FakeActorClass:
        def options(self, **opts):
            asked.append(opts)
            return types.SimpleNamespace(remote=lambda recipe, lease=None: ("actor", recipe))

    monkeypatch.setattr(actors.device, "DeviceActor", FakeActorClass())
    recipe, = device_recipes(cfg)["circuit"]
    assert actors.device.start_device(recipe) == ("actor", recipe)
    opts, = asked
    assert opts["resources"] == {"scope": 1.0, "instrument:circuit-bench-2": 1.0}
    assert opts["label_selector"] == {"lab": "optics-room"}
    assert opts["num_cpus"] == 0 and opts["max_concurrency"] == 2

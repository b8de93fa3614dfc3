"""The shipped demo stack trained end to end in this process, one run per method (a few seconds each)."""

import pytest

from pnn_cluster.config import example_config_path, load_config
from pnn_cluster.runner import InProcessPlacement, run_experiment

#: the shipped demo stack (hybrid_mnist.yaml) on 560 small digits, 60 of them (dataset.val_fraction 0.1,
#: six of each class) the validation split: 500 train, 32 steps of 16 an epoch, seconds per method
SMALL = ["dataset.name=digits", "dataset.train_subset=560", "dataset.test_subset=200", "dataset.split_seed=1",
         "schedule.epochs=2", "schedule.batch_size=16", "tracking.enabled=false",
         *(f"devices.{d}.twin.{k}" for d in ("optics", "circuit") for k in ("groups=4", "batch=64", "epochs=20"))]


@pytest.mark.parametrize("method", ["oracle", "pat", "in_silico"])
def test_hybrid_stack_end_to_end_on_a_small_subset(method):
    cfg = load_config(example_config_path("hybrid_mnist"), [*SMALL, f"method={method}"])
    r = run_experiment(cfg, InProcessPlacement(), echo=False)
    assert r.state == "finished" and r.steps == 2 * 32 and len(r.history) == 2
    assert r.val_acc == r.history[-1]["val_acc"] and "test_acc" not in r.history[-1]
    assert r.test_acc > 0.35  # ten classes: chance is 0.1
    if method == "in_silico":
        # trained on twins only: the devices saw calibration, validation and the test set, never a training step
        assert r.device_samples == 0 and r.history[0]["device_samples"] == 0
        assert r.executor["calls"] > 0 and r.executor["steps"] == r.steps  # evaluation went through the devices
    else:
        # every training sample is measured on both physical layers, once per epoch
        assert r.history[0]["device_samples"] == 2 * 500 and r.device_samples == 2 * 2 * 500
    if method == "oracle":
        assert r.calibration_samples == 0 and r.twins == {}
    else:
        assert r.calibration_samples > 0 and set(r.twins) == {"optics", "circuit"}
    assert r.device_samples_total == r.device_samples + r.calibration_samples + r.init_samples

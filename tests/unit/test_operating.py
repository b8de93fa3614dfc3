"""Operating regions: recorded from what training measures, saved and loaded, measured with their own floor."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_config

from pnn_cluster.config.loader import parse_config
from pnn_cluster.devices import make_device
from pnn_cluster.devices.simulated import Imperfections
from pnn_cluster.runner import InProcessPlacement, run_experiment
from pnn_cluster.training.operating import OperatingRecorder
from pnn_cluster.twins import build_twin, evaluate_twin
from pnn_cluster.twins.operating import LayerRegion, OperatingRegion, RegionDraw, measure_region, region_figures


def _device(n: int = 4):
    imp = Imperfections(latency_call_s=0.0, latency_sample_s=0.0, seed=3)
    return make_device("circuit", n_in=n, n_out=n, imperfections=imp)


def _region(spec, steps: int = 5, rows: int = 6, seed: int = 0) -> LayerRegion:
    rng = np.random.default_rng(seed)
    params = {p.name: rng.uniform(p.low, p.high, size=(steps, *p.shape)) * 0.1 for p in spec.params}
    x = rng.uniform(0.3, 0.4, size=(steps, rows, spec.input.size))
    return LayerRegion(params, x, np.arange(steps) * 10)


class _Trainer:
    """What the recorder reads of a trainer: its executor (with an observer), the step and the planned steps."""

    class config:  # noqa: N801
        epochs = 2

    steps_per_epoch = 5

    def __init__(self, observer=None) -> None:
        self.executor = type("Executor", (), {"observer": observer})()
        self.global_step = 0


class _Counting:
    def __init__(self) -> None:
        self.calls = 0

    def observe(self, *args) -> None:
        self.calls += 1


def test_a_region_saved_and_loaded_is_the_same_and_checks_the_device_it_is_used_on(tmp_path):
    spec = _device().spec
    region = OperatingRegion({"circuit": _region(spec)}, {"task": "t"})
    back = OperatingRegion.load(region.save(tmp_path / "r.npz"))
    assert back.meta == {"task": "t"} and list(back.layers) == ["circuit"]
    np.testing.assert_array_equal(back["circuit"].x, region["circuit"].x)
    for k, v in region["circuit"].params.items():
        np.testing.assert_array_equal(back["circuit"].params[k], v)
    back["circuit"].check(spec)
    with pytest.raises(ValueError, match="inputs are 4 wide.*takes 6"):
        back["circuit"].check(_device(6).spec)
    with pytest.raises(KeyError, match="no layer 'optics'.*circuit"):
        back["optics"]


def test_the_recorder_keeps_each_layers_settings_and_inputs_and_passes_every_measurement_on(tmp_path):
    before = _Counting()
    trainer = _Trainer(before)
    rec = OperatingRecorder(rows=3, max_steps=4, skip_fraction=0.2, path=tmp_path / "region.npz")
    rec.on_train_start(trainer)
    assert trainer.executor.observer is rec
    for step in range(10):
        theta = {"drive": np.full(4, float(step))}
        for micro in range(2):  # two micro-batches a step: rows of both count towards the step's rows
            rec.observe("circuit", None, theta, np.full((2, 4), step + micro / 10), np.zeros((2, 4)), np.zeros((2, 4)))
        trainer.global_step = step + 1
        rec.on_step_end(trainer, {})
    rec.on_train_end(trainer, {})
    assert before.calls == 20 and trainer.executor.observer is before  # handed on, then put back
    region = OperatingRegion.load(tmp_path / "region.npz")["circuit"]
    assert len(region) == 4 and region.x.shape == (4, 3, 4)
    assert set(region.steps) <= set(range(2, 10))  # the first 20 % of the 10 planned steps are not kept
    for s, x, drive in zip(region.steps, region.x, region.params["drive"]):
        assert np.all(drive == s) and np.all(np.floor(x) == s)  # each step's inputs with its own settings


def test_a_training_run_records_the_inputs_its_physical_layer_measured_at_its_settings():
    cfg = parse_config(tiny_config(width=4), source="tiny")
    cfg = cfg.with_overrides(["tracking.enabled=false"])
    rec = OperatingRecorder(rows=8)
    run_experiment(cfg, InProcessPlacement(), echo=False, callbacks=[rec])
    region = rec.region()["circuit"]
    assert len(region) == 2  # 60 digits in batches of 30
    assert region.x.shape == (2, 8, 4) and np.all((region.x >= 0) & (region.x <= 1))
    drives = region.params["drive"]
    assert not np.allclose(drives[0], drives[-1])  # training moved the settings between the recorded steps


def test_region_samples_pair_a_recorded_steps_settings_with_its_own_inputs_and_give_its_floor():
    device = _device()
    region = _region(device.spec)
    samples = measure_region(device, region, groups=6, batch=4, repeats=2, seed=1)
    assert samples.device_samples == 6 * 4 * 2
    for x, p in zip(samples.x, samples.params):
        s = [i for i in range(len(region)) if np.array_equal(region.params["drive"][i], p["drive"])]
        assert len(s) == 1
        assert all(any(np.array_equal(row, r) for r in region.x[s[0]]) for row in x)
    twin = build_twin("physics", device.spec, device.model())
    figures = region_figures({"physics": twin}, samples)
    assert figures["noise_floor"] == samples.noise_floor() > 0
    assert figures["physics"] == evaluate_twin(twin, samples)


def test_drawing_near_a_region_stays_within_the_devices_limits():
    spec = _device().spec
    draw = RegionDraw(_region(spec), spec, spread=0.5)
    rng = np.random.default_rng(0)
    low, high = spec.params[0].low, spec.params[0].high
    values = np.stack([draw.params(rng)["drive"] for _ in range(200)])
    assert values.min() >= low and values.max() <= high and values.std() > 0.1 * (high - low)
    with pytest.raises(ValueError, match="spread must be in"):
        RegionDraw(_region(spec), spec, spread=2.0)

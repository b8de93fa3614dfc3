"""Drift of the simulated systems: realistic default rates, the random walk's growth, step changes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pnn_cluster.config import ConfigError, ImperfectionsConfig, load_config
from pnn_cluster.devices import SYSTEMS, Imperfections, make_device, simulated
from pnn_cluster.runner.build import device_recipes

#: no noise, miscalibration or unmodelled physics: a measurement is the true model, exactly
CLEAN = dict(noise=0.0, shot=0.0, gap=0.0, drift=0.0, unmodelled=0.0, latency_call_s=0.0, latency_sample_s=0.0)


def shg(**imperfections) -> simulated.SimulatedDevice:
    return make_device("shg", n_in=8, n_out=8, imperfections=Imperfections(**{**CLEAN, **imperfections}))


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, 8))


def calibration(dev) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in dev.true_model().calibration.items()}


def moved(dev, before: dict[str, torch.Tensor]) -> np.ndarray:
    """How far every calibration constant has moved since ``before``, in its own spread."""
    spread = dev.calibration_spread()
    now = calibration(dev)
    return np.concatenate([((now[k] - before[k]) / torch.as_tensor(spread[k])).reshape(-1).numpy() for k in now])


# -- default rates ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_every_system_drifts_by_default_at_the_rate_its_lab_physics_and_sample_rate_give(system):
    cls = type(make_device(system))
    lab = cls.lab_drift
    assert lab is not None and lab.per_sqrt_hour > 0 and lab.samples_per_s > 0
    assert "K" in lab.reason and "Rate:" in lab.reason  # the physics and the sample rate, stated
    rate = cls.default_imperfections.drift
    assert rate == lab.drift > 0
    assert rate == pytest.approx(lab.per_sqrt_hour * math.sqrt(10_000 / lab.samples_per_s / 3600), rel=0.05)
    # modest: a run of 70,000 samples on the device walks its constants a small fraction of a spread
    assert rate * math.sqrt(70_000 / 10_000) < 0.25


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_the_drift_table_of_the_lab_module_states_each_systems_figures(system):
    from pnn_cluster.devices import lab as labs

    lab = type(make_device(system)).lab_drift
    assert lab is labs.LABS[system]
    row = re.search(rf"^\s+{system}\s+(\S+)\s+(\S+)\s+(\S+)\s", labs.__doc__, re.M)
    assert row, f"no row for {system} in the table of pnn_cluster.devices.lab"
    assert [float(v) for v in row.groups()] == [lab.per_sqrt_hour, lab.samples_per_s, lab.drift]


# -- the random walk ------------------------------------------------------------------------------------------


def test_the_drift_walk_grows_as_the_square_root_of_the_samples_measured():
    drift = 0.5
    early, late = [], []
    for seed in range(6):
        dev = shg(drift=drift, seed=seed)
        start = calibration(dev)
        for k in range(40):  # 40 calls of 250 samples: 2,500 then 10,000 measured
            dev.forward(inputs(250, seed=k))
            if k == 9:
                early.append(moved(dev, start))
        late.append(moved(dev, start))
    rms_early = float(np.sqrt(np.mean(np.concatenate(early) ** 2)))
    rms_late = float(np.sqrt(np.mean(np.concatenate(late) ** 2)))
    # 6 devices x 43 constants: the rms is known to about 5 %
    assert rms_late == pytest.approx(drift * math.sqrt(10_000 / 10_000), rel=0.2)
    assert rms_early == pytest.approx(drift * math.sqrt(2_500 / 10_000), rel=0.2)
    assert rms_late / rms_early == pytest.approx(2.0, rel=0.2)


def test_a_device_without_drift_or_steps_keeps_its_calibration():
    dev = shg(seed=1)
    start = calibration(dev)
    dev.forward(inputs(500))
    assert not np.any(moved(dev, start))
    assert dev.drift_events == [] and dev.health()["drift_events"] == 0


# -- step changes ----------------------------------------------------------------------------------------------


def test_a_step_change_happens_once_at_its_sample_count_between_two_samples_of_a_batch():
    dev = shg(steps=((1000, 1.0),), seed=3)
    start = calibration(dev)
    dev.forward(inputs(600, seed=1))
    assert not np.any(moved(dev, start)) and dev.drift_events == []
    old = dev.true_model()
    x = inputs(600, seed=2)  # samples 600..1199: the jump falls before sample 1000, the 400th of this batch
    y = dev.forward(x)
    new = dev.true_model()
    jump = moved(dev, start)
    assert 0.5 < np.sqrt(np.mean(jump**2)) < 1.6  # one spread, drawn: every constant moved
    assert np.all(jump != 0)
    assert dev.drift_events == [{"samples": 1000, "size": 1.0, "kind": "step"}]
    params = {k: torch.from_numpy(v) for k, v in dev.params.items()}
    with torch.no_grad():
        before = old(torch.from_numpy(x[:400]), params).double().numpy()
        after = new(torch.from_numpy(x[400:]), params).double().numpy()
    # float32 sums in another batch size differ in the last digits; the jump moves outputs by percents
    np.testing.assert_allclose(y[:400], before, atol=1e-6)
    np.testing.assert_allclose(y[400:], after, atol=1e-6)
    with torch.no_grad():
        assert np.abs(y[400:] - old(torch.from_numpy(x[400:]), params).double().numpy()).max() > 1e-3
    # never again
    settled = calibration(dev)
    dev.forward(inputs(2000, seed=3))
    assert not np.any(moved(dev, settled))
    assert len(dev.drift_events) == 1
    assert dev.health()["drift_events"] == 1
    ident = dev.identity()
    assert ident["drift_events"] == dev.drift_events
    assert ident["imperfections"]["steps"] == [{"at_samples": 1000, "size": 1.0}]
    json.dumps(ident)


def test_a_step_at_the_end_of_a_batch_applies_after_it_and_one_at_zero_before_the_first_sample():
    dev = shg(steps=((0, 2.0), (500, 0.5)), seed=4)
    assert dev.drift_events == [{"samples": 0, "size": 2.0, "kind": "step"}]
    assert dev.true_model().calibration_values() != make_device(
        "shg", n_in=8, n_out=8, imperfections=Imperfections(**CLEAN, seed=4)).true_model().calibration_values()
    dev.forward(inputs(500))
    assert [e["samples"] for e in dev.drift_events] == [0, 500]


def test_step_changes_are_reproducible_from_the_seed_and_differ_between_seeds():
    def after_step(seed: int) -> dict:
        dev = shg(steps=((100, 1.0),), seed=seed)
        dev.forward(inputs(250))
        return dev.true_model().calibration_values()

    assert after_step(7) == after_step(7)
    assert after_step(7) != after_step(8)


def test_a_step_change_leaves_the_drift_walk_as_it_was():
    def walked(steps) -> np.ndarray:
        dev = shg(drift=0.3, steps=steps, seed=2)
        start = calibration(dev)
        for k in range(4):
            dev.forward(inputs(100, seed=k))
        return moved(dev, start)

    plain, stepped = walked(()), walked(((400, 0.0),))  # a step of size 0: the same draws for the walk
    np.testing.assert_allclose(plain, stepped)


def test_ideal_imperfections_have_no_steps_and_to_dict_round_trips_as_json():
    assert Imperfections.ideal().steps == ()
    imp = Imperfections(steps=[(40_000, 1.0), {"at_samples": 5, "size": 2}])
    assert imp.steps == ((40_000, 1.0), (5, 2.0))
    d = json.loads(json.dumps(imp.to_dict()))
    assert d["steps"] == [{"at_samples": 40_000, "size": 1.0}, {"at_samples": 5, "size": 2.0}]
    assert Imperfections(**d) == imp


@pytest.mark.parametrize("steps, words", [
    ([(-1, 1.0)], ["Imperfections.steps[0].at_samples", "-1", "an integer from 0 to"]),
    ([(10, 1.0), (2.5, 1.0)], ["Imperfections.steps[1].at_samples", "2.5", "an integer"]),
    ([(True, 1.0)], ["Imperfections.steps[0].at_samples", "True"]),
    ([(10, -0.5)], ["Imperfections.steps[0].size", "-0.5", "a finite number from 0 to 100"]),
    ([(10, float("nan"))], ["Imperfections.steps[0].size", "nan"]),
    ([(10, 1e3)], ["Imperfections.steps[0].size", "1000.0", "from 0 to 100"]),
    ([(10,)], ["Imperfections.steps[0]", "(at_samples, size) pair", "(10,)"]),
    ([{"at": 10, "size": 1.0}], ["Imperfections.steps[0]", "keys at_samples and size", "'at'"]),
    ("40000", ["Imperfections.steps", "a list of (at_samples, size) pairs", "'40000'"]),
])
def test_bad_step_changes_are_refused_naming_the_field_the_value_and_what_is_allowed(steps, words):
    with pytest.raises(ValueError) as info:
        Imperfections(steps=steps)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


# -- configuration -----------------------------------------------------------------------------------------------


def experiment(imperfections: dict) -> dict:
    return {
        "name": "drifting",
        "dataset": {"name": "digits", "train_subset": 60, "test_subset": 30},
        "devices": {"circuit": {"driver": {"kind": "simulated", "system": "circuit",
                                           "options": {"n_in": 8, "n_out": 8},
                                           "imperfections": imperfections},
                                "twin": {"kind": "physics", "groups": 4, "batch": 16, "epochs": 2}}},
        "stack": [{"kind": "linear", "size": 8}, {"kind": "rescale"}, {"kind": "physical", "device": "circuit"},
                  {"kind": "linear", "size": 10}],
        "schedule": {"epochs": 1, "batch_size": 30},
    }


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_steps_in_a_yaml_config_build_a_device_that_applies_them(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment({}), sort_keys=False).replace(
        "imperfections: {}", "imperfections: {steps: [{at_samples: 40, size: 1.0}], latency_call_s: 0}"))
    cfg = load_config(path)
    assert cfg.devices["circuit"].driver.imperfections.overrides()["steps"] == ((40, 1.0),)
    dev = device_recipes(cfg)["circuit"][0].build()
    assert dev.imperfections.steps == ((40, 1.0),)
    assert dev.imperfections.drift == type(dev).default_imperfections.drift  # the system's own rate, kept
    dev.forward(np.full((30, 8), 0.5))
    assert dev.drift_events == []
    dev.forward(np.full((30, 8), 0.5))
    assert dev.drift_events == [{"samples": 40, "size": 1.0, "kind": "step"}]


def test_a_config_without_steps_keeps_the_systems_default_of_none():
    assert "steps" not in ImperfectionsConfig(noise=0.1).overrides()
    assert ImperfectionsConfig(steps=[]).overrides()["steps"] == ()


@pytest.mark.parametrize("steps, key, words", [
    ([{"at_samples": -1, "size": 1.0}], "steps.0.at_samples", ["out of range: -1", ">= 0"]),
    ([{"at_samples": 10, "size": 1.0}, {"at_samples": 5.5, "size": 1.0}], "steps.1.at_samples", ["5.5"]),
    ([{"at_samples": 10, "size": 101}], "steps.0.size", ["out of range: 101", ">= 0 and <= 100"]),
    ([{"at_samples": 10, "size": -1}], "steps.0.size", ["out of range: -1", ">= 0 and <= 100"]),
    ([{"at_samples": 10, "size": float("inf")}], "steps.0.size", ["not a finite number: inf"]),
    ([{"at": 10, "size": 1.0}], "steps.0.at", ["unknown key", "allowed: at_samples, size"]),
    ([{"size": 1.0}], "steps.0.at_samples", ["missing required key"]),
    ({"at_samples": 10, "size": 1.0}, "steps", ["wrong type"]),
])
def test_bad_steps_in_a_config_are_refused_naming_the_key(tmp_path, steps, key, words):
    path = write(tmp_path, experiment({"steps": steps}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    full = f"devices.circuit.driver.imperfections.{key}"
    assert full in info.value.keys, (full, str(info.value))
    line = next(p.format(str(path)) for p in info.value.problems if p.key == full)
    for w in words:
        assert w in line, (w, line)


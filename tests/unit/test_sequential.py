"""Sequential calibration: rounds measured where an ensemble disagrees, within a budget, until near the floor."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from pnn_cluster.devices import make_device
from pnn_cluster.devices.simulated import Imperfections
from pnn_cluster.twins import build_twin, collect, evaluate_twin
from pnn_cluster.twins.operating import LayerRegion
from pnn_cluster.twins.sequential import SequentialPlan, calibrate_sequential, disagreement

#: a plan small enough for the unit tier: rounds of a few settings, one or two epochs each
TINY = {"initial_groups": 3, "holdout_groups": 3, "ensemble": 2, "candidates": 3, "round_epochs": 1,
        "first_epochs": 2, "batch": 8}


def _device(seed: int = 5):
    imp = Imperfections(latency_call_s=0.0, latency_sample_s=0.0, seed=seed)
    return make_device("shg", n_in=4, n_out=4, imperfections=imp)


class _Counting:
    """``collect`` on the device, counting what it measured."""

    def __init__(self, device) -> None:
        self.device, self.samples, self.calls = device, 0, 0

    def __call__(self, **kw):
        out = collect(self.device, **kw)
        self.samples += out.device_samples
        self.calls += 1
        return out


def test_a_plan_out_of_bounds_names_the_setting_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"SequentialPlan.ensemble must be a number >= 2 and <= 16, got 1"):
        SequentialPlan(ensemble=1)
    with pytest.raises(ValueError, match=r"SequentialPlan.growth must be a number > 0"):
        SequentialPlan(growth=0.0)


def test_it_stops_at_its_budget_having_measured_every_sample_it_counts():
    device = _device()
    measure = _Counting(device)
    twin = build_twin("physics", device.spec, device.model())
    plan = SequentialPlan(budget=200, factor=0.0, **TINY)
    res = calibrate_sequential(twin, plan, measure=measure, seed=2, progress=False)
    assert res.reason == "the budget of 200 device samples"
    assert res.device_samples == measure.samples <= 200
    assert 200 - res.device_samples < plan.batch * plan.repeats  # no room left for one more setting
    assert [r["device_samples"] for r in res.rounds] == sorted({r["device_samples"] for r in res.rounds})
    assert len(res.rounds) >= 3 and res.holdout.device_samples == 3 * 8 * 2  # the held-out set measured twice
    assert all(y.shape[0] == 1 for y in res.train.y)  # the fit's settings once each
    assert res.nmse == pytest.approx(evaluate_twin(twin, res.holdout))
    fit = res.twin_fit("shg")
    assert (fit.source, fit.device_samples, fit.nmse_val) == ("sequential", res.device_samples, res.nmse)


@pytest.mark.parametrize("share", [0.0, 0.3])
def test_the_kept_twin_stops_early_on_the_held_out_set_and_its_share_of_the_measured_groups(monkeypatch, share):
    from pnn_cluster.twins import sequential

    seen = []

    def recording(twin, data, val, stop=None, **kw):
        if stop is not None:  # the kept twin's fit (the ensemble's others run every epoch on bootstrap draws)
            seen.append((len(data), len(stop)))
        return fit(twin, data, val, stop=stop, **kw)

    fit = sequential.fit_twin
    monkeypatch.setattr(sequential, "fit_twin", recording)
    device = _device()
    plan = SequentialPlan(budget=400, factor=0.0, stop_share=share, **{**TINY, "initial_groups": 10})
    res = calibrate_sequential(build_twin("physics", device.spec, device.model()), plan, device=device, seed=2,
                               progress=False)
    groups = [r["groups"] for r in res.rounds]
    assert len(seen) == len(groups) >= 2
    for (fitted, stopped), n in zip(seen, groups):
        apart = int(round(share * n))
        assert (fitted, stopped) == (n - apart, 3 + apart)  # the 3 held-out settings, and the share apart
    with pytest.raises(ValueError, match=r"SequentialPlan.stop_share must be a number >= 0 and <= 0.5, got 0.6"):
        SequentialPlan(stop_share=0.6)


def test_it_stops_once_the_held_out_error_is_within_its_factor_of_the_floor():
    device = _device()
    twin = build_twin("physics", device.spec, device.model())
    res = calibrate_sequential(twin, SequentialPlan(budget=10_000, factor=1e6, **TINY), device=device,
                               progress=False)
    assert len(res.rounds) == 1 and res.reason == "held-out NMSE within 1e+06 x the noise floor"
    seen = []
    res = calibrate_sequential(build_twin("physics", device.spec, device.model()),
                               SequentialPlan(budget=10_000, factor=0.0, **TINY), device=device, progress=False,
                               stop=lambda t, n: seen.append(n) or len(seen) == 2)
    assert len(res.rounds) == 2 and res.reason == "the caller's stopping rule" and seen[1] > seen[0]


def test_disagreement_is_zero_between_equal_twins_and_scores_each_candidate_alike_batched_or_not():
    device = _device()
    a = build_twin("mlp", device.spec, hidden=(8,))
    b = build_twin("mlp", device.spec, hidden=(8,))
    with torch.no_grad():
        for p in b.parameters():
            p.normal_()  # a twin that predicts more than the mean
    rng = np.random.default_rng(0)
    settings = [{"phase": rng.uniform(-1, 1, size=device.spec.params[0].shape)} for _ in range(5)]
    inputs = [rng.uniform(0, 1, size=(3, 4)) for _ in range(5)]
    assert np.all(disagreement([a, a], settings, inputs) == 0)
    batched = disagreement([a, b], settings, inputs)
    a.batched_params = b.batched_params = False
    one_by_one = disagreement([a, b], settings, inputs)
    assert np.all(batched > 0) and np.allclose(batched, one_by_one, rtol=1e-5)


def test_the_settings_it_measures_are_the_most_disputed_of_its_candidates():
    device = _device()
    twin = build_twin("physics", device.spec, device.model())
    plan = SequentialPlan(budget=200, factor=0.0, **{**TINY, "candidates": 8})
    res = calibrate_sequential(twin, plan, device=device, seed=1, progress=False)
    scored = [r for r in res.rounds if "chosen_disagreement" in r]
    assert scored and all(r["chosen_disagreement"] > r["candidate_disagreement"] > 0 for r in scored)


def test_near_draws_needs_a_region_and_uses_its_settings():
    device = _device()
    spec = device.spec
    with pytest.raises(ValueError, match="near is 0.5 but no operating region"):
        calibrate_sequential(build_twin("physics", spec, device.model()), SequentialPlan(near=0.5, **TINY),
                             device=device, progress=False)
    shape = spec.params[0].shape
    region = LayerRegion({"phase": np.full((2, *shape), 0.25)}, np.full((2, 4, 4), 0.5), np.arange(2))
    plan = SequentialPlan(budget=200, factor=0.0, near=1.0, spread=0.0, **TINY)
    res = calibrate_sequential(build_twin("physics", spec, device.model()), plan,
                               measure=functools.partial(collect, device), region=region, progress=False)
    added = res.train.subset(range(TINY["initial_groups"], len(res.train)))
    assert len(added) > 0
    assert all(np.all(p["phase"] == 0.25) for p in added.params) and all(np.all(x == 0.5) for x in added.x)


def test_a_twin_sections_sequential_settings_give_its_plan_and_only_for_a_kind_that_is_fitted():
    from pnn_cluster.config import example_config_path, load_config
    from pnn_cluster.config.errors import ConfigError
    from pnn_cluster.config.loader import parse_config

    raw = load_config(example_config_path("circuit_mnist")).resolved()
    twin = raw["devices"]["circuit"]["twin"]
    twin["sequential"] = {"budget": 3000, "factor": 1.2}
    plan = parse_config(raw, source="t").devices["circuit"].twin.sequential.plan(twin["batch"])
    assert plan == SequentialPlan(budget=3000, factor=1.2, batch=twin["batch"])
    twin["kind"] = "best"
    with pytest.raises(ConfigError, match="sequential calibration fits one twin kind; twin.kind is 'best'"):
        parse_config(raw, source="t")
    twin["kind"], twin["sequential"] = "physics", {"ensemble": 1}
    with pytest.raises(ConfigError, match=r"sequential.ensemble: out of range: 1 \(allowed: >= 2 and <= 16\)"):
        parse_config(raw, source="t")


def test_a_run_whose_twin_section_asks_for_it_calibrates_sequentially_within_its_budget():
    from pnn_cluster.config import TwinConfig
    from pnn_cluster.runner.build import DeviceRecipe
    from pnn_cluster.runner.placement import InProcessPlacement
    from pnn_cluster.runner.twins import make_twin, twin_shell

    placement = InProcessPlacement()
    try:
        from pnn_cluster.config import SimulatedDriver

        driver = SimulatedDriver(kind="simulated", system="shg", options={"n_in": 4, "n_out": 4},
                                 imperfections={"latency_call_s": 0.0, "latency_sample_s": 0.0})
        ref, = placement.start_devices([DeviceRecipe("optics", 0, driver, seed=3)])
        plan = {k: v for k, v in TINY.items() if k != "batch"}
        tc = TwinConfig(kind="physics", batch=8, sequential={"budget": 300, "factor": 0.0, **plan})
        fit = make_twin(ref, tc, twin_shell(tc, ref), None, seed=1)
    finally:
        placement.close()
    assert fit.source == "sequential" and fit.kind == "physics"
    assert 0 < fit.device_samples <= 300
    assert fit.twin is not None and not any(p.requires_grad for p in fit.twin.parameters())
    assert fit.ideal_nmse is not None and np.isfinite(fit.nmse_val) and fit.noise_floor > 0

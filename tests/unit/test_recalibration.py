"""The twin watch during training: what it observes, when it raises an alarm, and what each policy then does.

A small noisy gain device (``y = a tanh(g x) + noise``) stands in for a physical layer; its drift is a
change of ``a`` made by the test between steps, like a bumped fibre. Steps are driven through the real
pipeline and the watch's callback, in this process (a whole run with a bumped device:
``tests/system/test_recalibration.py``).
"""

from __future__ import annotations

import concurrent.futures
import threading
import types

import numpy as np
import pytest
import torch
from lab_devices import GainModel

from pnn_cluster.config import parse_config
from pnn_cluster.devices import Device, DeviceSpec, ParamSpec, Port
from pnn_cluster.fsio import atomic_torch_save, torch_load_tensors
from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
from pnn_cluster.training.pipeline import (
    LocalDeviceHandle,
    LocalTwinHandle,
    PipelineConfig,
    PipelineExecutor,
    Replica,
    TwinPool,
)
from pnn_cluster.training.recalibration import (
    RANGE_BATCH,
    AroundParams,
    Recalibration,
    RecalibrationWatch,
    WatchedReplica,
)
from pnn_cluster.training.workers import TwinWorker, twin_payload
from pnn_cluster.twins import build_twin
from pnn_cluster.twins.collect import Samples, collect
from pnn_cluster.twins.versions import twin_digest

NOISE = 0.01


class NoisyGain(Device):
    spec = DeviceSpec("gain", Port(4, -2.0, 2.0), Port(4), (ParamSpec("g", (4,), 0.1, 3.0, init=1.0),))

    def __init__(self, a: float = 1.0, seed: int = 0):
        super().__init__()
        self.a, self.rng = a, np.random.default_rng(seed)
        self.asked: list[np.ndarray] = []

    def measure(self, x, params):
        self.asked.append(np.array(params["g"]))
        return self.a * np.tanh(params["g"] * x) + NOISE * self.rng.standard_normal(x.shape)

    def model(self):
        return GainModel(1.0).double()


def twin_of(a: float):
    return build_twin("physics", NoisyGain.spec, GainModel(a).double()).requires_grad_(False)


class Setup:
    """One gain layer, its pipeline and its watch, stepped by hand (``dev``, ``twin``: another device and twin of
    the gain layer's spec; ``nmse``: the first calibration's NMSE, which a range check compares with)."""

    def __init__(self, policy: str, backward: str = "batch", copies: int = 2, dev=None, twin=None, nmse=None,
                 **settings):
        torch.manual_seed(0)
        self.dev = NoisyGain(1.0) if dev is None else dev
        self.twin = twin_of(1.0) if twin is None else twin
        self.layer = PhysicalLayer(self.dev, twin=self.twin, name="gain")
        self.model = Stack(Rescale(4, -1.5, 1.5), self.layer, Affine(4)).double()
        pool = None
        if backward == "stream":
            handles = [LocalTwinHandle(TwinWorker.from_twin(self.twin), name=f"twin{i}") for i in range(copies)]
            pool = TwinPool(handles, twin_payload(self.twin), twin_digest(self.twin.state_dict()))
        self.rep = Replica(LocalDeviceHandle(self.dev), twin=self.twin, twins=pool, name="gain")
        s = Recalibration(policy=policy, warmup=20, **settings)
        ys = np.tanh(np.linspace(-2, 2, 400))
        floor = NOISE**2 / ys.var()  # the floor a calibration of this device measures (noise over signal variance)
        self.watched = WatchedReplica("gain", self.rep, self.layer, s,
                                      lambda **kw: collect(self.dev, progress=False, **kw), floor, nmse=nmse,
                                      output_var=float(ys.var()),
                                      calibration={"groups": 6, "batch": 32, "repeats": 2, "epochs": 20})
        self.records = []
        self.watch = RecalibrationWatch([self.watched], report=self.records.append, seed=1,
                                        on_version=lambda rec, state: self.records.append(rec))
        self.ex = PipelineExecutor(pools={"gain": [self.rep]}, config=PipelineConfig(backward=backward),
                                   observer=self.watch)
        self.trainer = types.SimpleNamespace(global_step=0, extra_state={})
        self.metrics = []
        self.rng = torch.Generator().manual_seed(3)

    def step(self):
        x = torch.rand(32, 4, generator=self.rng, dtype=torch.float64) * 2 - 1
        y = torch.randint(0, 4, (32,), generator=self.rng)
        self.model.zero_grad(set_to_none=True)
        self.ex.forward_backward(self.model, x, y, torch.nn.CrossEntropyLoss(), 8)
        self.trainer.global_step += 1
        metrics = {}
        self.watch.on_step_end(self.trainer, metrics)
        self.metrics.append(metrics)
        return metrics

    def close(self):
        self.watch.close()
        self.ex.close()
        if self.rep.twins is not None:
            for h in self.rep.twins.handles:
                h.close()


@pytest.mark.parametrize("backward", ["batch", "stream"])
def test_the_watch_sees_the_twin_at_the_measured_points_at_no_extra_device_call(float64, backward):
    s = Setup("monitor", backward=backward)
    seen = []
    observe = s.watch.observe

    def spy(stage, rep, params, x, y, y_twin):
        seen.append((np.array(x), np.array(y), np.array(y_twin), {k: np.array(v) for k, v in params.items()}))
        observe(stage, rep, params, x, y, y_twin)

    s.watch.observe = spy
    calls = s.dev.stats["calls"]
    m = s.step()
    assert s.dev.stats["calls"] - calls == 4  # four micro-batches measured, nothing more
    assert sum(len(x) for x, *_ in seen) == 32
    for x, y, y_twin, params in seen:
        with torch.no_grad():
            expected = s.twin(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in params.items()}).numpy()
        np.testing.assert_allclose(y_twin, expected, rtol=1e-12)
        assert (y - y_twin).std() == pytest.approx(NOISE, rel=0.35)  # a true twin: the residual is the noise
    assert m["drift/gain/ratio"] == pytest.approx(1.0, rel=0.35)
    s.close()


def test_monitor_raises_no_alarm_without_drift_and_one_soon_after_a_step_change(float64):
    s = Setup("monitor")
    for _ in range(80):
        s.step()
    assert s.watched.alarm_steps == []
    state = {k: v.clone() for k, v in s.twin.state_dict().items()}
    s.dev.a = 1.3  # a bumped fibre: 30 % more light through
    for _ in range(10):
        s.step()
    assert s.watched.alarm_steps and s.watched.alarm_steps[0] <= 83, s.watched.alarm_steps
    assert any("policy monitor: nothing changed" in r for r in s.records if isinstance(r, str))
    assert all(torch.equal(v, state[k]) for k, v in s.twin.state_dict().items())  # monitor changes nothing
    # the reference kept at the end of the warm-up, measured again, says the device itself changed
    step, change, needed, confirmed = s.watched.confirmations[0]
    assert confirmed and change > needed and s.watched.region_steps == []
    assert s.watched.reference[0] == 20 and s.watched.reference_samples == 32
    assert s.metrics[-1]["drift/gain/alarms"] >= 1
    s.close()


class Kinked(NoisyGain):
    """Its response steepens beyond g = 1.5, which its twin (``a tanh(g x)``) does not know: exact where the
    baseline is set (g = 1), off where training may go later."""

    def measure(self, x, params):
        g = params["g"]
        self.asked.append(np.array(g))
        return self.a * np.tanh(np.minimum(g, 1.5) * x + 0.5 * np.maximum(g - 1.5, 0.0) * x) \
            + NOISE * self.rng.standard_normal(x.shape)


@pytest.mark.parametrize("policy", ["monitor", "pause"])
def test_an_alarm_where_the_device_measures_as_it_did_is_not_drift_and_sets_a_new_baseline(float64, policy):
    s = Setup(policy, dev=Kinked(1.0))
    for _ in range(30):
        s.step()
    assert s.watched.reference is not None and s.watched.reference[0] == 20 and s.watched.alarm_steps == []
    with torch.no_grad():
        s.layer.theta["g"].fill_(3.0)  # training has moved where the twin is off; the device has not changed
    for _ in range(15):
        s.step()
        if s.watched.alarm_steps:
            break
    w = s.watched
    assert w.alarm_steps and w.region_steps == w.alarm_steps
    step, change, needed, confirmed = w.confirmations[0]
    assert not confirmed and change < needed
    lines = [r for r in s.records if isinstance(r, str)]
    assert any("not drift" in line and "a new baseline is set" in line for line in lines), lines
    # no recalibration for a device that has not changed: the baseline and the reference are set afresh
    assert w.version == 0 and w.recalibration_samples == 0 and w.reference_samples == 32
    assert not w.detector.ready and w.reference is None
    assert s.metrics[-1]["drift/gain/region_alarms"] == 1.0
    for _ in range(25):
        s.step()
    assert w.detector.ready and w.reference is not None and w.reference[0] > step
    assert np.allclose(w.reference[2]["g"], 3.0) and len(w.alarm_steps) == 1  # the new region is the new normal
    s.close()


def test_a_reference_measured_again_leaves_trainings_noise_stream_as_it_was():
    from pnn_cluster.devices import make_device
    from pnn_cluster.training.explore import AtSetting, TheseRows

    x = np.random.default_rng(0).uniform(0, 1, (8, 6))
    outs = []
    for check in (False, True):
        dev = make_device("circuit", n_in=6, n_out=6)
        dev.noise_stream("training")
        dev.set_params({"drive": np.zeros(6)})
        first = dev.forward(x)
        if check:
            ref = collect(dev, groups=1, batch=8, repeats=1, sample_params=AtSetting({"drive": np.zeros(6)}),
                          sample_inputs=TheseRows(x), progress=False, purpose="drift reference")
            assert dev.noise_purpose == "training"
            assert not np.array_equal(ref.y[0][0], first)  # a measurement of its own, with noise of its own
            dev.set_params({"drive": np.zeros(6)})
        outs.append((first, dev.forward(x)))
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_the_change_at_a_reference_is_its_power_beyond_the_noise_in_units_of_the_noise():
    from pnn_cluster.training.recalibration import NoiseModel, reference_change

    rng = np.random.default_rng(1)
    y = rng.uniform(0.2, 1.0, (64, 24))
    sigma = 0.01
    then = y + sigma * rng.standard_normal(y.shape)
    same, se = reference_change(then, y + sigma * rng.standard_normal(y.shape), None, sigma**2)
    assert abs(same) < 3 * se and se == pytest.approx(2 * np.sqrt(2 / y.size), rel=0.3)  # independent values
    shifted = y + 2 * sigma * rng.choice([-1.0, 1.0], y.shape)  # a change of power 4 sigma^2 on every value
    change, _ = reference_change(then, shifted + sigma * rng.standard_normal(y.shape), NoiseModel(sigma**2, 0.0), 0.0)
    assert change == pytest.approx(4.0, abs=0.4)
    # shot noise moves a row's outputs together: over many draws of an unchanged device, the change scatters
    # about zero as far as the standard error given says, not as far as the count of values would say
    shot, model = 0.02, NoiseModel(sigma**2, 0.02**2)
    draws = [reference_change(*(y * (1 + shot * rng.standard_normal((64, 1))) + sigma * rng.standard_normal(y.shape)
                                for _ in range(2)), model, 0.0) for _ in range(400)]
    changes, ses = np.array([c for c, _ in draws]), np.array([e for _, e in draws])
    assert abs(changes.mean()) < 3 * changes.std() / np.sqrt(len(changes))  # no change: zero on average
    assert changes.std() == pytest.approx(np.median(ses), rel=0.25)
    assert changes.std() > 2 * 2 * np.sqrt(2 / y.size)  # what independent values would have given


def test_refine_fits_a_copy_beside_training_and_swaps_it_in_on_every_copy_at_a_step_boundary(float64):
    s = Setup("refine", backward="stream", explore_fraction=0.1, explore_groups=4, epochs=20)
    for _ in range(30):
        s.step()
    s.dev.a = 1.3
    for _ in range(200):
        s.step()
        if s.watched.version > 0:
            break
    assert s.watched.version == 1, s.records
    rec = [r for r in s.records if isinstance(r, dict)][0]
    assert rec["source"] == "refine" and rec["accepted"] and rec["parent"] == 0
    assert rec["nmse"] < rec["nmse_before"] / 3  # the refit predicts the device as it is now
    # the twin in use, in the trainer and on every copy: the refit, the same state everywhere
    assert float(s.twin.model.cal("a")) == pytest.approx(1.3, rel=0.05)
    assert all(h.worker.version == s.rep.twins.version for h in s.rep.twins.handles)
    assert s.rep.twins.version == twin_digest(s.twin.state_dict())
    # exploration: within the budget, and every setting within the device's limits
    assert 0 < s.watched.explore_samples <= 0.1 * s.watched.trained_rows
    assert rec["samples"]["device_samples"] == s.watched.explore_samples
    assert all(((g >= 0.1) & (g <= 3.0)).all() for g in s.dev.asked)
    # the error went back down: no alarm long after the swap
    swapped = s.trainer.global_step
    for _ in range(40):
        s.step()
    assert not [a for a in s.watched.alarm_steps if a > swapped + 5]
    s.close()


def test_a_resumed_watch_has_its_buffer_and_history_and_asks_again_for_the_refinement_in_flight(float64, tmp_path):
    s = Setup("refine", explore_fraction=0.1, explore_groups=4, epochs=20)
    for _ in range(30):
        s.step()
    s.dev.a = 1.3
    for _ in range(100):
        s.step()
        if s.watched.pending is not None:
            break
    assert s.watched.pending is not None and s.watched.version == 0
    since = s.watched.pending_info["since"]
    # through a checkpoint file: tensors and plain containers only
    path = atomic_torch_save(s.watch.state_dict(), tmp_path / "watch.pt")
    state = torch_load_tensors(path)
    before, step = s.watched, s.trainer.global_step
    s.close()

    r = Setup("refine", explore_fraction=0.1, explore_groups=4, epochs=20)
    r.dev.a, r.trainer.global_step = 1.3, step
    r.watch.load_state_dict(state)
    w = r.watched
    assert w.pending is None and w.refine_due == since
    assert w.history == before.history and w.zero_step == before.zero_step
    assert [e[0] for e in w.buffer] == [e[0] for e in before.buffer] and w.buffered_rows == before.buffered_rows
    for (_, x0, p0, y0), (_, x1, p1, y1) in zip(before.buffer, w.buffer):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)
        np.testing.assert_array_equal(p0["g"], p1["g"])
    # the reference and what it said go on too
    assert w.reference[0] == before.reference[0] and w.confirmations == before.confirmations
    assert w.drift_confirmed == before.drift_confirmed is not None and w.reference_samples == before.reference_samples
    np.testing.assert_array_equal(w.reference[1], before.reference[1])
    np.testing.assert_array_equal(w.reference[3], before.reference[3])
    np.testing.assert_array_equal(w.reference[2]["g"], before.reference[2]["g"])
    for _ in range(50):
        r.step()
        if w.pending is not None:
            break
    concurrent.futures.wait([w.pending])  # the refit runs on a thread: wait for it, not for a number of steps
    r.step()
    assert w.version == 1 and float(r.twin.model.cal("a")) == pytest.approx(1.3, rel=0.05)
    r.close()


def test_pause_recalibrates_in_full_before_the_next_step_and_counts_its_samples(float64):
    s = Setup("pause")
    for _ in range(30):
        s.step()
    s.dev.a = 0.7
    for _ in range(20):
        s.step()
        if s.watched.version:
            break
    assert s.watched.version == 1
    assert s.watched.recalibration_samples == 6 * 32 * 2  # the first calibration's size, measured again
    assert float(s.twin.model.cal("a")) == pytest.approx(0.7, rel=0.05)
    assert s.watch.summary()["gain"]["recalibration_samples"] == s.watched.recalibration_samples
    s.close()


def test_pause_takes_only_the_drifted_replica_out_of_its_pool_and_the_other_trains_on_meanwhile(float64):
    torch.manual_seed(0)
    devs = [NoisyGain(1.0, seed=i) for i in range(2)]
    twins = [twin_of(1.0) for _ in devs]
    layer = PhysicalLayer(devs[0], twin=twins[0], name="gain")
    model = Stack(Rescale(4, -1.5, 1.5), layer, Affine(4)).double()
    reps = [Replica(LocalDeviceHandle(d), twin=t, name=f"gain/{i}") for i, (d, t) in enumerate(zip(devs, twins))]
    ex = PipelineExecutor(pools={"gain": reps}, config=PipelineConfig(backward="batch"))
    pool = ex.pool(layer)
    go = threading.Event()

    def held(dev):
        def measure(**kw):
            if kw.get("purpose") is None:  # the reference measured again at the alarm is not held
                assert go.wait(timeout=60)  # the recalibration waits until the test has seen training go on
            return collect(dev, progress=False, **kw)
        return measure

    ys = np.tanh(np.linspace(-2, 2, 400))
    watched = [WatchedReplica(r.name, r, layer, Recalibration(policy="pause", warmup=20), held(d), NOISE**2 / ys.var(),
                              output_var=float(ys.var()), calibration={"groups": 6, "batch": 32, "repeats": 2,
                                                                       "epochs": 20}, pool=pool)
               for r, d in zip(reps, devs)]
    watch = RecalibrationWatch(watched, report=lambda line: None, seed=1)
    ex.observer = watch
    trainer = types.SimpleNamespace(global_step=0, extra_state={})
    rng = torch.Generator().manual_seed(3)

    def step():
        x = torch.rand(32, 4, generator=rng, dtype=torch.float64) * 2 - 1
        model.zero_grad(set_to_none=True)
        ex.forward_backward(model, x, torch.randint(0, 4, (32,), generator=rng), torch.nn.CrossEntropyLoss(), 8)
        trainer.global_step += 1
        watch.on_step_end(trainer, {})

    for _ in range(30):
        step()
    devs[1].a = 0.7
    for _ in range(20):
        step()
        if watched[1].paused:
            break
    assert watched[1].paused and pool.active == [reps[0]] and "gain/1" in pool.suspended
    calls = [d.stats["calls"] for d in devs]
    for _ in range(3):
        step()  # training goes on with the other replica alone
    assert devs[1].stats["calls"] == calls[1] and devs[0].stats["calls"] >= calls[0] + 3 * 4
    go.set()
    concurrent.futures.wait([watched[1].pending])
    step()
    assert not watched[1].paused and pool.active == reps and not pool.suspended
    assert watched[1].version == 1 and watched[0].version == 0 and watched[0].alarm_steps == []
    assert float(twins[1].model.cal("a")) == pytest.approx(0.7, rel=0.05)
    assert float(twins[0].model.cal("a")) == 1.0
    assert watched[1].recalibration_samples == 6 * 32 * 2
    watch.close()
    ex.close()


def test_exploratory_settings_stay_within_limits_and_near_the_current_ones():
    rng = np.random.default_rng(0)
    around = AroundParams({"g": np.array([0.12, 1.5, 2.95, 3.0])}, NoisyGain.spec, 0.1)
    draws = np.stack([around(rng)["g"] for _ in range(2000)])
    assert draws.min() >= 0.1 and draws.max() <= 3.0
    assert np.abs(draws[:, 1].mean() - 1.5) < 0.02 and draws[:, 1].std() == pytest.approx(0.29, rel=0.1)


def test_the_noise_model_recovers_additive_and_shot_noise_from_a_calibrations_repeats():
    from pnn_cluster.training.recalibration import NoiseModel

    rng = np.random.default_rng(0)
    ys = []
    for _ in range(40):
        clean = rng.uniform(-2, 2, size=(64, 4))
        ys.append(np.stack([clean * (1 + 0.05 * rng.standard_normal((64, 1))) + 0.02 * rng.standard_normal(clean.shape)
                            for _ in range(2)]))
    noise = NoiseModel.from_repeats(Samples([None] * 40, [{}] * 40, ys))
    assert noise.additive == pytest.approx(0.02**2, rel=0.25) and noise.relative == pytest.approx(0.05**2, rel=0.25)
    y = np.full((10, 4), 2.0)
    assert noise.power(y) == pytest.approx(40 * (noise.additive + 4 * noise.relative))


def test_a_policy_the_configuration_does_not_know_is_refused_naming_the_choices():
    from pnn_cluster.config import ConfigError

    cfg = {"name": "x", "dataset": {"name": "digits"},
           "devices": {"c": {"driver": {"kind": "simulated", "system": "circuit"},
                             "recalibration": {"policy": "sometimes"}}},
           "stack": [{"kind": "physical", "device": "c"}]}
    allowed = r"devices\.c\.recalibration\.policy: 'sometimes'.*allowed: none, monitor, refine, pause"
    with pytest.raises(ConfigError, match=allowed):
        parse_config(cfg, source="x.yaml")
    cfg["devices"]["c"]["recalibration"] = {"policy": "refine", "rise": 1.0}
    with pytest.raises(ConfigError, match=r"recalibration\.rise"):
        parse_config(cfg, source="x.yaml")




class KneeModel(GainModel):
    """y = a tanh(g x) + k relu(g - 2) x: ``k`` shows only at gains over 2, which training (at g = 1) never sets."""

    def __init__(self, a: float = 1.0, k: float = 0.0):
        super().__init__(a)
        self.add_calibration("k", k)

    def forward(self, x, params):
        return super().forward(x, params) + self.cal("k") * torch.relu(params["g"] - 2.0) * x


class NoisyKnee(NoisyGain):
    """The gain device with a knee: bumped, its gain over 2 changes as well as its overall gain."""

    def __init__(self, a: float = 1.0, k: float = 0.0, seed: int = 0):
        super().__init__(a, seed)
        self.k = k

    def measure(self, x, params):
        return super().measure(x, params) + self.k * np.maximum(params["g"] - 2.0, 0.0) * x


WIDEN = {"explore_groups": 2, "explore_spread": 0.01, "explore_fraction": 0.1, "epochs": 30, "check_groups": 4,
         "widen_groups": 16, "widen_fraction": 1.0}


def _knee_floor():
    ys = np.tanh(np.linspace(-2, 2, 400))
    return NOISE**2 / ys.var()


def _run_until(s, done, steps=300):
    for _ in range(steps):
        if s.watched.pending is not None:
            concurrent.futures.wait([s.watched.pending])  # the refit runs on a thread: wait on it, not on steps
        s.step()
        if done():
            return True
    return False


def _knee_bumped():
    """30 refined steps on a knee device, then its gain and its knee bumped: (setup, the watched replica)."""
    twin = build_twin("physics", NoisyGain.spec, KneeModel().double()).requires_grad_(False)
    s = Setup("refine", dev=NoisyKnee(), twin=twin, nmse=_knee_floor(), **WIDEN)
    for _ in range(30):
        s.step()
    s.dev.a, s.dev.k = 1.3, 1.0
    return s, s.watched


def test_a_refit_that_fits_trainings_region_only_is_checked_over_the_range_and_widened_within_its_budget(float64):
    # training's gains stay at 1 and its refinement explores no further (spread 0.01): a bump of the gain and
    # of the knee leaves a refit that fits training's region and misses every gain over 2
    s, w = _knee_bumped()
    assert _run_until(s, lambda: w.version >= 2 and w.pending is None), s.records
    recs = [r for r in s.records if isinstance(r, dict)]
    assert [r["source"] for r in recs[:2]] == ["refine", "widen"] and recs[0]["accepted"] and recs[1]["accepted"]
    assert recs[1]["parent"] == 1
    # the first refit: right in training's region, far off over the range; the widened one: right over both
    (_, first), (_, second) = w.range_checks[:2]
    assert first > s.watched.settings.widen_factor and second <= s.watched.settings.widen_factor, w.range_checks
    assert float(s.twin.model.cal("a")) == pytest.approx(1.3, rel=0.05)
    assert float(s.twin.model.cal("k")) == pytest.approx(1.0, rel=0.1)
    # every setting within the device's limits, the widened ones spread over the range; each budget kept
    asked = np.concatenate(s.dev.asked)
    assert asked.min() >= 0.1 and asked.max() <= 3.0 and (asked > 2.5).any()
    assert 0 < w.widen_samples <= w.settings.widen_fraction * w.trained_rows
    assert w.widen_samples == (2 * 4 + 16) * RANGE_BATCH  # two checks and one widened refit
    assert w.explore_samples - w.widen_samples <= w.settings.explore_fraction * w.trained_rows
    assert s.watch.summary()["gain"]["widen_samples"] == w.widen_samples
    assert any("widening the refinement" in r for r in s.records if isinstance(r, str))
    s.close()


def test_a_refit_that_is_right_over_the_range_is_checked_once_and_not_widened(float64):
    s = Setup("refine", nmse=_knee_floor(), **WIDEN)
    for _ in range(30):
        s.step()
    s.dev.a = 1.3  # the gain alone: training's region pins it down
    w = s.watched
    assert _run_until(s, lambda: w.range_checks and w.pending is None), s.records
    for _ in range(5):
        s.step()
    assert w.version == 1 and len(w.range_checks) == 1 and w.range_checks[0][1] <= w.settings.widen_factor
    assert w.widen_samples == 4 * RANGE_BATCH and w.widen_due is None
    s.close()


def test_a_widened_refinement_in_flight_is_asked_again_after_a_resume_not_the_first_refinement(float64, tmp_path):
    s, w = _knee_bumped()
    assert _run_until(s, lambda: w.pending is not None and w.pending_info["source"] == "widen"), s.records
    since = w.pending_info["since"]
    path = atomic_torch_save(s.watch.state_dict(), tmp_path / "watch.pt")
    state = torch_load_tensors(path)
    assert state["gain"]["widen_due"] == since and state["gain"]["refine_due"] is None
    spent, checks, step = w.widen_samples, list(w.range_checks), s.trainer.global_step
    concurrent.futures.wait([w.pending])
    s.close()

    twin = build_twin("physics", NoisyGain.spec, KneeModel(1.3).double()).requires_grad_(False)
    r = Setup("refine", dev=NoisyKnee(1.3, 1.0), twin=twin, nmse=_knee_floor(), **WIDEN)
    r.trainer.global_step = step
    r.watch.load_state_dict(state)
    v = r.watched
    assert v.widen_due == since and v.refine_due is None and v.widen_samples == spent and v.range_checks == checks
    r.step()
    assert v.pending is not None and v.pending_info["source"] == "widen" and v.widen_due is None
    assert v.widen_samples == spent + (4 + 16) * RANGE_BATCH  # its range check measured again with the rest
    concurrent.futures.wait([v.pending])
    r.step()
    assert v.version == state["gain"]["version"] + 1 and float(r.twin.model.cal("k")) == pytest.approx(1.0, rel=0.1)
    r.close()


def test_the_widening_settings_are_checked_naming_the_field():
    with pytest.raises(ValueError, match=r"recalibration\.widen_factor: 0\.5; allowed: >= 1\.0"):
        Recalibration(widen_factor=0.5)
    with pytest.raises(ValueError, match=r"recalibration\.widen_fraction: 2\.0"):
        Recalibration(widen_fraction=2.0)
    cfg = {"name": "x", "dataset": {"name": "digits"},
           "devices": {"c": {"driver": {"kind": "simulated", "system": "circuit"},
                             "recalibration": {"policy": "refine", "check_groups": 8, "widen_groups": 40}}},
           "stack": [{"kind": "physical", "device": "c"}]}
    settings = parse_config(cfg, source="x.yaml").devices["c"].recalibration.settings()
    assert (settings.check_groups, settings.widen_groups, settings.widen_factor) == (8, 40, 1.5)

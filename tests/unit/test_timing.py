"""Declared device timing, the lab clock of simulated devices, and the micro-batch count planned from them."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from pnn_cluster.devices import make_device
from pnn_cluster.devices.lab import LABS
from pnn_cluster.devices.spec import DeviceSpec, Timing
from pnn_cluster.layers import PhysicalLayer, Rescale, Stack
from pnn_cluster.runner.placement import InProcessPlacement
from pnn_cluster.training.pipeline import PipelineConfig, PipelineExecutor, planned_micro_batches


def test_timing_refuses_what_is_not_a_duration():
    for bad in (-1e-3, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="Timing.call_s"):
            Timing(call_s=bad)
    assert Timing(0.002, 1e-4).seconds(10) == pytest.approx(0.003)


def test_spec_timing_survives_the_wire_format_and_bad_timing_is_named():
    spec = make_device("shg", n_in=4, n_out=4).spec
    assert spec.timing == Timing(0.002, 5e-6)
    back = DeviceSpec.from_dict(spec.to_dict())
    assert back == spec
    d = spec.to_dict()
    d.pop("timing")  # a server of an older version sends none
    assert DeviceSpec.from_dict(d).timing is None
    d["timing"] = {"call_s": -1, "sample_s": 0}
    with pytest.raises(ValueError, match="call_s"):
        DeviceSpec.from_dict(d)
    d["timing"] = [0.1, 0.2]
    with pytest.raises(ValueError, match="timing"):
        DeviceSpec.from_dict(d)


def test_lab_clock_is_the_labs_own_rate_times_the_factor():
    base = make_device("circuit", n_in=4, n_out=4)
    fast = make_device("circuit", n_in=4, n_out=4, imperfections=base.imperfections.with_(lab_clock=10.0))
    rate = LABS["circuit"].samples_per_s
    assert fast.spec.timing.sample_s == pytest.approx(base.imperfections.latency_sample_s + 1 / (rate * 10.0))
    assert fast.spec.timing.call_s == base.imperfections.latency_call_s
    # the device takes that time: 40 samples at 10 x 1000 samples/s are at least 4 ms (plus the call's 2 ms)
    x = np.full((40, 4), 0.5)
    t0 = time.perf_counter()
    fast.forward(x)
    assert time.perf_counter() - t0 >= fast.spec.timing.seconds(40) * 0.99
    with pytest.raises(ValueError, match="lab_clock"):
        base.imperfections.with_(lab_clock=-1.0)


def test_devices_that_take_no_time_get_the_batch_whole():
    quick = [(Timing(0.0, 0.0), 1)] * 3
    assert planned_micro_batches(256, quick, 0.003) == 1
    # the default simulated devices (2 ms a call, microseconds a sample): still one call per batch
    assert planned_micro_batches(64, [(Timing(0.002, 5e-6), 1), (Timing(0.002, 2e-6), 1)], 0.003) == 1


def test_slow_stages_are_cut_finer_the_slower_they_are_and_replicas_take_more():
    slow = [(Timing(0.0, 0.01), 1)] * 3  # three equal stages, 10 ms a sample
    m = planned_micro_batches(64, slow, 0.003)
    assert m > 4
    # the plan is the minimum of its own cost model: no other count is quicker
    def cost(k):
        t = [tm.seconds(64 / k) + 0.003 for tm, _ in slow]
        return sum(t) + (k - 1) * max(t)
    assert all(cost(m) <= cost(k) + 1e-12 for k in range(1, 65))
    assert planned_micro_batches(64, [(Timing(0.0, 0.01), 4)] * 3, 0.003) >= m
    # one slow stage and a quick one: nothing to overlap but the quick one
    assert planned_micro_batches(64, [(Timing(0.0, 0.01), 1), (Timing(0.0, 0.0), 1)], 0.003) <= 2
    assert planned_micro_batches(1, slow, 0.003) == 1


def test_the_executor_plans_from_declared_timings_and_keeps_its_old_fill_without_them():
    torch.manual_seed(0)
    devices = [make_device("shg", n_in=4, n_out=4) for _ in range(2)]
    model = Stack(Rescale(4, 0.0, 1.0), PhysicalLayer(devices[0], name="a"),
                  Rescale(4, 0.0, 1.0), PhysicalLayer(devices[1], name="b"))
    ex = PipelineExecutor()
    assert ex._fill(model, 64) == 1
    slow = make_device("shg", n_in=4, n_out=4, imperfections=devices[0].imperfections.with_(lab_clock=1.0))
    model_slow = Stack(Rescale(4, 0.0, 1.0), PhysicalLayer(slow, name="a"),
                       Rescale(4, 0.0, 1.0), PhysicalLayer(make_device("shg", n_in=4, n_out=4,
                                                                      imperfections=slow.imperfections), name="b"))
    assert ex._fill(model_slow, 64) > 1
    devices[1].spec = DeviceSpec(**{**devices[1].spec.__dict__, "timing": None})  # a device that declares none
    assert ex._fill(model, 64) == 2 * (2 + 1 - 1)
    assert PipelineExecutor(config=PipelineConfig(micro_batches=3))._fill(model, 64) == 3
    # in one process: the same plan where every device declares its timing, the batch whole where one does not
    in_process = PipelineConfig(micro_batches=InProcessPlacement.micro_batches,
                                untimed_micro_batches=InProcessPlacement.untimed_micro_batches)
    assert PipelineExecutor(config=in_process)._fill(model_slow, 64) == ex._fill(model_slow, 64) > 1
    assert PipelineExecutor(config=in_process)._fill(model, 64) == 1
    with pytest.raises(ValueError, match="call_overhead_s"):
        PipelineConfig(call_overhead_s=-1)

"""The micro-batch pipeline, replica pools and the failure policy, in-process (no Ray).

Devices here are small and instant; where a test needs to know what runs at
the same time, the devices wait on events set by other devices, never on
the clock.
"""

import threading

import numpy as np
import pytest
import torch

from pnn_cluster.data import Dataset
from pnn_cluster.devices import Device, DeviceError, DeviceSpec, LimitError, ParamSpec, PhysicsModel, Port
from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
from pnn_cluster.training.faults import (
    FaultPolicy,
    NoReplicaLeft,
    ReplicaRetired,
    TrainingAborted,
    checkpoint_on_failure,
)
from pnn_cluster.training.pipeline import LocalDeviceHandle, PipelineConfig, PipelineExecutor, Replica
from pnn_cluster.training.trainer import SequentialExecutor, TrainConfig, Trainer
from pnn_cluster.training.workers import DeviceConfig, DeviceWorker, TrainerWorker, TwinWorker, params_version

WAIT = 10.0  # seconds an event may take before the test fails (it is never slept)


class GainModel(PhysicsModel):
    def __init__(self, a: float = 1.0):
        super().__init__()
        self.add_calibration("a", a)

    def forward(self, x, params):
        return self.cal("a") * torch.tanh(params["g"] * x)


class GainDevice(Device):
    """y = a tanh(g x); ``on_call(device, x)`` runs inside every measurement (under the device's lock)."""

    spec = DeviceSpec("gain", Port(3, -2.0, 2.0), Port(3), (ParamSpec("g", (3,), 0.1, 3.0, init=1.0),))

    def __init__(self, a: float = 1.0, on_call=None):
        super().__init__()
        self.a, self.on_call, self.log = a, on_call, []

    def measure(self, x, params):
        if self.on_call is not None:
            self.on_call(self, x)
        self.log.append(x.copy())
        return self.a * np.tanh(params["g"] * x)

    def model(self):
        return GainModel(self.a).double()


class RecordingTwin(GainModel):
    """A twin that remembers every input it differentiated at."""

    def __init__(self, a: float = 1.0):
        super().__init__(a)
        self.seen = []

    def forward(self, x, params):
        self.seen.append(x.detach().numpy().copy())
        return super().forward(x, params)


def fail_on(calls, error=DeviceError):
    """An on_call that raises on the given call numbers (1-based), or on every call from ``-n`` on."""
    count = {"n": 0}

    def on_call(dev, x):
        count["n"] += 1
        n = count["n"]
        if n in calls or any(c < 0 and n >= -c for c in calls):
            raise error(f"{dev.spec.name}: simulated fault on call {n}")

    return on_call


def make_stack(devices, twins=None):
    torch.manual_seed(0)
    layers = []
    for i, dev in enumerate(devices):
        twin = twins[i] if twins else GainModel(dev.a).double()
        layers += [Rescale(3, -1.5, 1.5), PhysicalLayer(dev, twin=twin, name=f"gain{i}")]
    layers.append(Affine(3))
    return Stack(*layers).double()


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def grads_of(executor, model, x, y, micro=4):
    model.zero_grad(set_to_none=True)
    res = executor.forward_backward(model, x, y, torch.nn.CrossEntropyLoss(), micro)
    return res, [p.grad.clone() for p in model.parameters() if p.requires_grad]


def assert_same_grads(a, b, rtol=1e-12):
    assert len(a) == len(b)
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=1e-15)


# -- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["pipelined", "sequential"])
def test_schedules_give_the_in_process_gradients(float64, schedule):
    x, y = batch()
    ref_res, ref = grads_of(SequentialExecutor(), make_stack([GainDevice(1.0), GainDevice(0.8)]), x, y)
    ex = PipelineExecutor(config=PipelineConfig(schedule=schedule))
    res, got = grads_of(ex, make_stack([GainDevice(1.0), GainDevice(0.8)]), x, y)
    assert_same_grads(got, ref)
    assert res.loss == pytest.approx(ref_res.loss, rel=1e-12) and res.correct == ref_res.correct
    assert res.device_samples == 2 * len(x)
    assert ex.stats["calls"] == 2 * 4  # 4 micro-batches on each of 2 stages


@pytest.mark.parametrize("backward_batch", [None, 6])
def test_replicas_and_backward_chunks_give_the_in_process_gradients(float64, backward_batch):
    x, y = batch(20)
    ref_res, ref = grads_of(SequentialExecutor(), make_stack([GainDevice(1.0), GainDevice(0.8)]), x, y)
    model = make_stack([GainDevice(1.0), GainDevice(0.8)])
    copies = [GainDevice(0.8) for _ in range(2)]  # exact copies: which one measures must not matter
    pool = [Replica(LocalDeviceHandle(model[3].device))] + [Replica(LocalDeviceHandle(d)) for d in copies]
    ex = PipelineExecutor(pools={"gain1": pool}, config=PipelineConfig(depth=1, backward_batch=backward_batch))
    res, got = grads_of(ex, model, x, y)
    assert_same_grads(got, ref)
    assert res.loss == pytest.approx(ref_res.loss, rel=1e-12) and res.correct == ref_res.correct
    logs = [len(d.log) for d in [model[3].device, *copies]]
    assert sum(logs) == 5 and all(logs)  # every replica measured some of the 5 micro-batches


def test_evaluate_returns_the_measured_outputs_in_order(float64):
    model = make_stack([GainDevice(1.0), GainDevice(0.8)])
    x, _ = batch(13)
    with torch.no_grad():
        expected = model(x)
        got = PipelineExecutor(config=PipelineConfig(eval_micro_batch=3)).evaluate(model, x)
    torch.testing.assert_close(got, expected)


def test_next_micro_batch_is_measured_on_stage_0_while_the_last_is_on_stage_1(float64):
    stage0_second_call = threading.Event()
    overlapped = []

    def stage0(dev, x):
        if len(dev.log) == 1:
            stage0_second_call.set()

    def stage1(dev, x):
        if not dev.log:
            # the first micro-batch waits on stage 1 until stage 0 has started on the next one
            overlapped.append(stage0_second_call.wait(WAIT))

    x, y = batch()
    model = make_stack([GainDevice(1.0, on_call=stage0), GainDevice(0.8, on_call=stage1)])
    grads_of(PipelineExecutor(config=PipelineConfig(depth=1)), model, x, y)
    assert overlapped == [True]


def test_sequential_schedule_runs_one_micro_batch_at_a_time(float64):
    order = []
    devs = [GainDevice(1.0, on_call=lambda d, x: order.append(0)),
            GainDevice(0.8, on_call=lambda d, x: order.append(1))]
    x, y = batch()
    grads_of(PipelineExecutor(config=PipelineConfig(schedule="sequential")), make_stack(devs), x, y)
    assert order == [0, 1] * 4


def test_parameters_are_written_once_per_step_on_each_replica(float64):
    main, copy = GainDevice(1.0), GainDevice(1.0)
    model = make_stack([main])
    ex = PipelineExecutor(pools={"gain0": [Replica(LocalDeviceHandle(main)), Replica(LocalDeviceHandle(copy))]})
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = batch(32)
    for _ in range(3):
        grads_of(ex, model, x, y, micro=2)
        opt.step()
    assert len(main.log) + len(copy.log) == 3 * 16
    assert main.stats["param_writes"] == 3 and copy.stats["param_writes"] == 3
    assert ex.stats["param_writes"] == 6


def test_micro_batches_go_to_the_free_replica_and_its_own_twin_differentiates_them(float64):
    copy_measured_3 = threading.Event()
    waited = []

    def slow(dev, x):
        if not dev.log:
            waited.append(copy_measured_3.wait(WAIT))

    def fast(dev, x):
        if len(dev.log) == 2:
            copy_measured_3.set()

    slow_dev, fast_dev = GainDevice(1.0, on_call=slow), GainDevice(0.7, on_call=fast)
    twins = {slow_dev: RecordingTwin(1.0).double(), fast_dev: RecordingTwin(0.7).double()}
    model = make_stack([slow_dev], twins=[twins[slow_dev]])
    pool = [Replica(LocalDeviceHandle(d), twin=twins[d], name=n) for d, n in ((slow_dev, "slow"), (fast_dev, "fast"))]
    ex = PipelineExecutor(pools={"gain0": pool}, config=PipelineConfig(depth=1))
    x, y = batch(12)
    grads_of(ex, model, x, y, micro=2)
    assert waited == [True]
    assert len(fast_dev.log) >= 3 and len(slow_dev.log) >= 1 and len(fast_dev.log) + len(slow_dev.log) == 6
    for dev, twin in twins.items():
        measured = np.sort(np.concatenate(dev.log), axis=0)
        differentiated = np.sort(np.concatenate(twin.seen), axis=0)
        np.testing.assert_allclose(differentiated, measured)


# -- faults ------------------------------------------------------------------------------------


def test_failed_measurement_is_retried_and_counted_once(float64):
    x, y = batch()
    _, ref = grads_of(SequentialExecutor(), make_stack([GainDevice(1.0), GainDevice(0.8)]), x, y)
    flaky = GainDevice(0.8, on_call=fail_on({2}))
    model = make_stack([GainDevice(1.0), flaky])
    ex = PipelineExecutor()
    res, got = grads_of(ex, model, x, y)
    assert_same_grads(got, ref)
    assert ex.stats["retries"] == 1
    assert res.device_samples == 2 * len(x) and model.samples_measured() == 2 * len(x)
    assert flaky.stats["param_writes"] == 2  # the write went again with the retried call


def test_replica_that_keeps_failing_leaves_its_pool_and_the_run_goes_on(float64):
    x, y = batch()
    _, ref = grads_of(SequentialExecutor(), make_stack([GainDevice(1.0)]), x, y)
    good, broken = GainDevice(1.0), GainDevice(1.0, on_call=fail_on({-1}))
    model = make_stack([good])
    pool = [Replica(LocalDeviceHandle(broken), name="broken"), Replica(LocalDeviceHandle(good), name="good")]
    ex = PipelineExecutor(pools={"gain0": pool}, policy=FaultPolicy(max_consecutive_failures=2))
    with pytest.warns(ReplicaRetired, match=r"stage gain0: replica broken failed 2 times in a row and leaves the pool"):
        res, got = grads_of(ex, model, x, y)
    assert_same_grads(got, ref)
    assert res.device_samples == len(x)
    assert [r.name for r in ex.pool(model[1]).active] == ["good"]


def test_refused_value_is_not_retried(float64):
    dev = GainDevice(1.0)
    model = Stack(PhysicalLayer(dev, twin=GainModel().double(), name="gain0")).double()
    x = torch.full((4, 3), 5.0, dtype=torch.float64)  # outside the input port's [-2, 2]
    ex = PipelineExecutor()
    with pytest.raises(LimitError, match=r"gain: input\[0,0\]: 12 value\(s\) out of range"):
        grads_of(ex, model, x, torch.zeros(4, dtype=torch.long))
    assert ex.stats["retries"] == 0 and dev.log == []


def test_micro_batch_that_fails_everywhere_stops_the_run(float64):
    devs = [GainDevice(1.0, on_call=fail_on({-1})) for _ in range(3)]
    model = make_stack(devs[:1])
    pool = [Replica(LocalDeviceHandle(d), name=f"r{i}") for i, d in enumerate(devs)]
    ex = PipelineExecutor(pools={"gain0": pool}, config=PipelineConfig(depth=1),
                          policy=FaultPolicy(max_consecutive_failures=5, max_attempts=3))
    with pytest.raises(DeviceError, match=r"stage gain0: micro-batch \d+ failed 3 times \(FaultPolicy.max_attempts"):
        grads_of(ex, model, *batch(4), micro=4)


def test_no_replica_left_stops_with_a_clear_error_after_saving_a_checkpoint(float64, tmp_path):
    x, y = batch(24)
    data = Dataset("toy", x.numpy(), y.numpy(), x.numpy(), y.numpy())
    dying = GainDevice(1.0, on_call=fail_on({-17}))  # 8 calls a step: two steps, then the instrument is gone
    model = make_stack([dying])
    ex = PipelineExecutor(policy=FaultPolicy(max_consecutive_failures=2))
    trainer = Trainer(model, data, TrainConfig(epochs=1, batch_size=8, micro_batch=1, lr=0.01), executor=ex,
                      progress=False)
    path = tmp_path / "ckpt.pt"
    with pytest.warns(ReplicaRetired), pytest.raises(TrainingAborted) as info:
        with checkpoint_on_failure(trainer, path):
            trainer.fit()
    msg = str(info.value)
    assert "stage gain0: no replica left to measure on (gain0: DeviceError: gain: simulated fault" in msg
    assert f"checkpoint of step 2 saved to {path}" in msg
    assert isinstance(info.value.__cause__, NoReplicaLeft) and info.value.checkpoint == path
    state = torch.load(path, weights_only=True)
    assert state["global_step"] == 2
    torch.testing.assert_close(state["model"]["1.theta.g"], model[1].theta["g"].detach())


# -- the device worker's parameter protocol ------------------------------------------------------


def test_device_worker_never_measures_with_parameters_nobody_asked_for(float64):
    cfg = DeviceConfig("shg", {"n_in": 4, "n_out": 4})
    worker = DeviceWorker(cfg)
    params = {"phase": np.full(16, 0.3)}
    v = params_version(params)
    x = np.full((2, 4), 0.5)
    assert worker.version is None
    assert worker.forward(x, None, v) is None  # after connecting, what the hardware holds is unknown
    y = worker.forward(x, params, v)
    assert worker.version == v and y.shape == (2, 4)
    assert worker.forward(x, None, v) is not None
    worker.device.set_params({"phase": np.zeros(16)})  # a write that bypassed the worker (a calibration)
    assert worker.forward(x, None, v) is None
    restarted = DeviceWorker(cfg)  # what Ray's restart does: the constructor again
    assert restarted.forward(x, None, v) is None and restarted.incarnation != worker.incarnation


def test_device_worker_serves_each_callers_calls_in_the_order_sent(float64):
    import concurrent.futures

    worker = DeviceWorker(GainDevice(1.0))
    params = {"g": np.full(3, 1.5)}
    v = params_version(params)
    # two threads take calls as an actor with max_concurrency=2 does; threads start in any order
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        calls = [pool.submit(worker.forward, np.full((1, 3), k / 100), params if k == 0 else None, v,
                             ("s", k + 1, k)) for k in range(60)]
        replies = [c.result() for c in calls]
    assert all(r is not None for r in replies)  # the write always landed before the calls meant for it
    measured = [float(x[0, 0]) * 100 for x in worker.device.log]
    assert measured == pytest.approx(list(range(60)))
    assert worker.device.stats["param_writes"] == 1


def test_restarted_device_gets_the_parameters_again_mid_step(float64):
    x, y = batch()
    _, ref = grads_of(SequentialExecutor(), make_stack([GainDevice(1.0)]), x, y)
    model = make_stack([GainDevice(1.0)])
    handle = LocalDeviceHandle(model[1].device)
    submit = handle.submit

    restarted = []

    def restart_after_first(x_, params, version):
        call = submit(x_, params, version)
        if not restarted:
            call.result()
            handle.worker = DeviceWorker(GainDevice(1.0))  # a fresh process: initial parameters
            restarted.append(True)
        return call

    handle.submit = restart_after_first
    ex = PipelineExecutor(pools={"gain0": [Replica(handle)]}, config=PipelineConfig(depth=1))
    _, got = grads_of(ex, model, x, y)
    assert_same_grads(got, ref)
    assert ex.stats["params_resent"] == 1


@pytest.mark.parametrize("kw, match", [
    ({"system": "laser"}, r"DeviceConfig.system: unknown system 'laser'; allowed: one of \['circuit'"),
    ({"system": "shg", "instrument": "bench 1"},
     r"DeviceConfig.instrument: 'bench 1' is not a valid instrument name; allowed: letters, digits"),
    ({"system": "mylab.devices:Amp", "imperfections": object()},
     r"DeviceConfig.imperfections: only simulated systems take imperfections"),
])
def test_device_config_errors_name_the_field_the_value_and_what_is_allowed(kw, match):
    with pytest.raises(ValueError, match=match):
        DeviceConfig(**kw)


def test_device_config_builds_a_user_device_class():
    dev = DeviceConfig(f"{__name__}:GainDevice", {"a": 0.5}).build()
    assert isinstance(dev, GainDevice) and dev.a == 0.5 and not dev.connected


@pytest.mark.parametrize("kw, match", [
    ({"schedule": "greedy"}, r"PipelineConfig.schedule: 'greedy' is not allowed; allowed: \('pipelined', 'seq"),
    ({"depth": 0}, r"PipelineConfig.depth: must be an integer >= 1, got 0"),
    ({"micro_batch": -2}, r"PipelineConfig.micro_batch: must be None or an integer >= 1, got -2"),
])
def test_pipeline_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        PipelineConfig(**kw)


def test_unknown_pool_name_is_refused(float64):
    ex = PipelineExecutor(pools={"optics": [Replica(LocalDeviceHandle(GainDevice()))]})
    with pytest.raises(ValueError, match=r"PipelineExecutor.pools: no physical layer named 'optics'; layers are"):
        grads_of(ex, make_stack([GainDevice()]), *batch(4))


# -- twin worker and trainer worker ------------------------------------------------------------


def test_twin_worker_vjp_equals_the_twin_and_fit_closes_the_gap(float64):
    from pnn_cluster.pat import twin_vjp
    from pnn_cluster.twins import build_twin, collect

    dev = GainDevice(1.3)
    twin = build_twin("physics", dev.spec, GainModel(1.0).double())
    worker = TwinWorker.from_twin(twin)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 3))
    p = {"g": np.array([0.5, 1.0, 2.0])}
    g = np.ones((5, 3))
    gx, gp = worker.vjp(x, p, g)
    ref_x, ref_p = twin_vjp(twin, torch.from_numpy(x), {"g": torch.from_numpy(p["g"])}, torch.from_numpy(g))
    np.testing.assert_allclose(gx, ref_x.numpy())
    np.testing.assert_allclose(gp["g"], ref_p["g"].numpy())
    samples = collect(dev, groups=6, batch=16, repeats=1, progress=False)
    fit = worker.fit(samples, epochs=40, lr=0.05)
    assert fit["nmse_val"] < 1e-3
    assert float(worker.payload()["state"]["model.calibration.a"]) == pytest.approx(1.3, rel=1e-2)
    assert not any(q.requires_grad for q in worker.twin.parameters())


def test_trainer_worker_gives_each_replica_its_own_twin_and_uses_them_all(float64):
    from pnn_cluster.experiments import LayerSpec, TaskSpec, physical

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4))
    y = (x[:, 0] > 0).astype(int)
    data = Dataset("toy", x, y, x[:16], y[:16])
    task = TaskSpec("toy", "toy", (LayerSpec("rescale"), physical("shg", n_in=4, n_out=4), LayerSpec("affine")),
                    train=TrainConfig(epochs=1, batch_size=16, lr=0.01),
                    quick_train=TrainConfig(epochs=1, batch_size=16, lr=0.01))
    from pnn_cluster.devices import Imperfections, make_device

    devices = [make_device("shg", n_in=4, n_out=4, imperfections=Imperfections.ideal(seed=s)) for s in range(3)]
    ex = PipelineExecutor(config=PipelineConfig(micro_batch=2))
    worker = TrainerWorker(devices[:1], ex, replicas={"shg1": devices[1:]})
    result = worker.run_method(task, "pat", data=data, twin="ideal")
    pool = ex.pool(worker.trainer.model[1])
    assert [r.name for r in pool.active] == ["shg1", "shg1/1", "shg1/2"]
    assert pool.active[1].twin is not None and pool.active[1].twin is not pool.active[2].twin
    assert all(r.measured > 0 for r in pool.active)
    assert worker.status()["global_step"] == 4 and result.history

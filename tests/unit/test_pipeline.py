"""The micro-batch pipeline, replica pools and the failure policy, in-process (no Ray).

Devices here are small and instant; where a test needs to know what runs at
the same time, the devices wait on events set by other devices, never on
the clock.
"""

import math
import threading

import numpy as np
import pytest
import torch
from lab_devices import GainModel

from pnn_cluster.devices import Device, DeviceError, DeviceSpec, LimitError, ParamSpec, Port
from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
from pnn_cluster.training.faults import (
    FaultPolicy,
    NoReplicaLeft,
    ReplicaRetired,
)
from pnn_cluster.training.pipeline import (
    LocalDeviceHandle,
    LocalTwinHandle,
    PipelineConfig,
    PipelineExecutor,
    Replica,
    TwinPool,
)
from pnn_cluster.training.trainer import SequentialExecutor
from pnn_cluster.training.workers import DeviceWorker, TwinWorker, params_version, twin_payload
from pnn_cluster.twins.versions import twin_digest

WAIT = 10.0  # seconds an event may take before the test fails (it is never slept)


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


def test_a_training_step_says_where_its_time_went_and_evaluation_adds_nothing(float64):
    ex = PipelineExecutor()
    model = make_stack([GainDevice(1.0), GainDevice(0.8)])
    x, y = batch()
    grads_of(ex, model, x, y)
    first = {k: ex.stats[k] for k in ("measure_s", "backward_s")}
    assert first["measure_s"] > 0 and first["backward_s"] > 0
    with torch.no_grad():
        ex.evaluate(model, x)
    assert {k: ex.stats[k] for k in first} == first
    grads_of(ex, model, x, y)
    assert all(ex.stats[k] > first[k] for k in first)  # totals over the steps, per executor


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


# -- the device worker's parameter protocol ------------------------------------------------------


def shg_recipe(**options):
    from pnn_cluster.config import SimulatedDriver
    from pnn_cluster.runner import DeviceRecipe

    return DeviceRecipe("shg", 0, SimulatedDriver(kind="simulated", system="shg", options=options))


def test_device_worker_never_measures_with_parameters_nobody_asked_for(float64):
    cfg = shg_recipe(n_in=4, n_out=4)
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


@pytest.mark.parametrize("handover_s", [0.0, 1e-3, math.inf], ids=["runner", "by-call-time", "own-thread"])
def test_ticketed_calls_run_one_at_a_time_in_order_raise_in_their_caller_and_a_lost_predecessor_is_waited_for_once(
        handover_s):
    import concurrent.futures

    from pnn_cluster.training.workers import InTurn

    runner = InTurn("dev", wait_s=30.0, handover_s=handover_s)  # far beyond how long the calls below take
    order, inside, threads = [], [], []

    def work(k, fail=False):
        inside.append(k)
        assert len(inside) == 1, inside  # one call at a time
        order.append(k)
        threads.append(threading.current_thread().name)
        inside.remove(k)
        if fail:
            raise DeviceError(f"call {k} failed")
        return k

    assert runner.run(("s", 1, 0), lambda: work(1)) == 1  # alone: on its caller's thread; the call time is known
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:  # a thread per call, as Ray's are
        # sent in order 2..7, arriving in reverse: each waits for the one before it
        calls = [pool.submit(runner.run, ("s", k, k - 1), lambda k=k: work(k, fail=k == 4)) for k in range(7, 1, -1)]
        outcomes = [c.exception() or c.result() for c in calls[::-1]]
    assert order == [1, 2, 3, 4, 5, 6, 7]
    assert [str(o) if isinstance(o, Exception) else o for o in outcomes] == [2, 3, "call 4 failed", 5, 6, 7]
    on_runner = [name == "device-dev" for name in threads[1:]]
    if handover_s == 0.0:
        assert all(on_runner[1:])  # the first may find the device idle; the rest are handed over
    elif handover_s == math.inf:
        assert not any(on_runner)  # every call on its caller's thread, in turn
    # a call whose predecessor was served by a process before a restart: it goes on after wait_s, not forever
    assert InTurn("restarted", wait_s=0.05).run(("r", 8, 7), lambda: work(8)) == 8
    runner.close()
    assert runner.run(("s", 8, 7), lambda: work(8)) == 8  # closed: a later call starts it again


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


def test_a_recipe_builds_a_user_device_class_without_connecting_it():
    from pnn_cluster.config import PythonDriver
    from pnn_cluster.runner import DeviceRecipe

    driver = PythonDriver.model_validate({"kind": "python", "class": f"{__name__}:GainDevice", "options": {"a": 0.5}})
    dev = DeviceRecipe("gain", 0, driver).build()
    assert isinstance(dev, GainDevice) and dev.a == 0.5 and not dev.connected
    worker = DeviceWorker(DeviceRecipe("gain", 2, driver))  # its owner connects it
    assert worker.device.connected and worker.name == "gain/2"


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


def test_replicas_of_a_device_each_measure_with_a_twin_of_their_own(tmp_path):
    from pnn_cluster.config import parse_config
    from pnn_cluster.runner import ExperimentRun, InProcessPlacement, device_recipes
    from pnn_cluster.twins import collect, evaluate_twin

    cfg = parse_config({
        # 74 digits, 10 of them (one per class) the validation split: 64 train, 4 steps of 16
        "name": "replicas", "dataset": {"name": "digits", "train_subset": 74, "test_subset": 16},
        "devices": {"shg": {"driver": {"kind": "simulated", "system": "shg", "options": {"n_in": 4, "n_out": 4},
                                       # the copies differ by their calibration, which each one's physics twin
                                       # learns (the physics the model lacks, the same in both, is left out here)
                                       "imperfections": {"latency_call_s": 0, "latency_sample_s": 0,
                                                         "unmodelled": 0}},
                            "twin": {"kind": "physics", "groups": 6, "batch": 32, "epochs": 80}, "replicas": 2}},
        "stack": [{"kind": "linear", "size": 4}, {"kind": "rescale"}, {"kind": "physical", "device": "shg"},
                  {"kind": "linear", "size": 10}],
        "schedule": {"epochs": 1, "batch_size": 16}, "tracking": {"enabled": False}})
    run = ExperimentRun(cfg, InProcessPlacement(), echo=False)
    result = run.run()
    assert result.steps == 4 and result.device_samples == 64
    pool = run.trainer.executor.pool(run.trainer.model[2])
    assert [r.name for r in pool.replicas] == ["shg", "shg/1"] and pool.active == pool.replicas
    assert all(r.measured > 0 for r in pool.replicas)  # micro-batches went to both copies
    twins = [r.twin for r in pool.replicas]
    assert twins[0] is run.trainer.model[2].twin and twins[1] is not twins[0]
    # each twin was fitted to its own copy: it describes that copy better than the other copy's twin does
    devices = [recipe.build() for recipe in device_recipes(cfg)["shg"]]  # the same copies again (same seeds)
    for d in devices:
        d.connect()
    samples = [collect(d, groups=3, batch=32, repeats=1, seed=5, progress=False) for d in devices]
    for own, other in ((0, 1), (1, 0)):
        assert evaluate_twin(twins[own], samples[own]) < 0.25 * evaluate_twin(twins[other], samples[own])


# -- twins elsewhere: the streamed backward pass ------------------------------------------------


def physics_twin(a):
    from pnn_cluster.twins import build_twin

    return build_twin("physics", GainDevice.spec, GainModel(a).double()).requires_grad_(False)


def twin_pool(twin, copies=1, state_of=None):
    """Twin copies on threads, as twin actors hold them; ``state_of`` starts them from another twin's state."""
    start = state_of or twin
    handles = [LocalTwinHandle(TwinWorker.from_twin(start), name=f"twin{i}") for i in range(copies)]
    return TwinPool(handles, twin_payload(twin), twin_digest(twin.state_dict()))


def test_streamed_backward_gives_the_batch_gradients(float64):
    x, y = batch(24)
    grads = {}
    for backward in ("batch", "stream"):
        devs = [GainDevice(1.0), GainDevice(0.8)]
        model = make_stack(devs)  # rescale, gain0, rescale, gain1, affine: digital layers between stages
        pools = {}
        for i, dev in enumerate(devs):
            twin = physics_twin(dev.a)
            pools[f"gain{i}"] = [Replica(LocalDeviceHandle(dev), twin=twin, twins=twin_pool(twin, copies=2))]
        ex = PipelineExecutor(pools=pools, config=PipelineConfig(backward=backward))
        res, grads[backward] = grads_of(ex, model, x, y, micro=4)
        grads[backward + " loss"] = (res.loss, res.correct)
        grads[backward + " twin calls"] = ex.stats["twin_calls"]
    assert_same_grads(grads["stream"], grads["batch"], rtol=1e-10)
    assert grads["stream loss"][0] == pytest.approx(grads["batch loss"][0], rel=1e-12)
    assert grads["stream loss"][1] == grads["batch loss"][1]
    # the streamed run asked the twin pools: one VJP per micro-batch and stage; the batch run never did
    assert grads["stream twin calls"] == 6 * 2 and grads["batch twin calls"] == 0


def test_a_twin_copy_restarted_from_older_state_is_restored_before_it_differentiates(float64):
    x, y = batch(16)
    old, new = physics_twin(0.5), physics_twin(1.0)
    stale = TwinWorker.from_twin(old)
    pool = TwinPool([LocalTwinHandle(stale)], twin_payload(new), twin_digest(new.state_dict()))
    # asked directly, the stale copy refuses rather than differentiate with the wrong twin
    p = {"g": np.ones(3)}
    assert stale.vjp(np.zeros((2, 3)), p, np.ones((2, 3)), version=pool.version) is None

    dev = GainDevice(1.0)
    ex = PipelineExecutor(pools={"gain0": [Replica(LocalDeviceHandle(dev), twin=new, twins=pool)]},
                          config=PipelineConfig(backward="stream"))
    _, got = grads_of(ex, make_stack([dev], twins=[new]), x, y)
    ref_dev = GainDevice(1.0)
    _, ref = grads_of(SequentialExecutor(), make_stack([ref_dev], twins=[physics_twin(1.0)]), x, y)
    assert_same_grads(got, ref, rtol=1e-10)
    assert ex.stats["twin_restores"] == 1 and pool.reloads == 1 and stale.version == pool.version


# -- a device that stops answering ---------------------------------------------------------------


def test_a_hung_device_times_out_leaves_its_pool_and_the_run_stops_naming_it(float64):
    released = threading.Event()
    hung = GainDevice(1.0, on_call=lambda dev, x: released.wait(WAIT))
    handle = LocalDeviceHandle(hung)
    model = make_stack([hung])
    ex = PipelineExecutor(pools={"gain0": [Replica(handle, name="hung", timeout_s=0.2)]},
                          config=PipelineConfig(depth=1), policy=FaultPolicy(max_consecutive_failures=2))
    try:
        with pytest.warns(ReplicaRetired, match=r"replica hung failed 2 times in a row"), \
                pytest.raises(NoReplicaLeft) as info:
            grads_of(ex, model, *batch(8), micro=4)
    finally:
        released.set()  # the device thread returns, and nothing is left waiting
        handle.close()
    assert "stage gain0: no replica left to measure on (hung: CallTimeout: device hung: no reply within its " \
           "timeout_s of 0.2 s)" in str(info.value)
    assert info.value.failures.keys() == {"hung"} and ex.stats["timeouts"] == 2


def test_a_hung_replica_times_out_and_the_others_finish_the_step(float64):
    released = threading.Event()
    x, y = batch(16)
    _, ref = grads_of(SequentialExecutor(), make_stack([GainDevice(1.0)]), x, y)
    good, hung = GainDevice(1.0), GainDevice(1.0, on_call=lambda dev, x: released.wait(WAIT))
    handles = [LocalDeviceHandle(good), LocalDeviceHandle(hung)]
    ex = PipelineExecutor(pools={"gain0": [Replica(handles[0], name="good"),
                                           Replica(handles[1], name="hung", timeout_s=0.2)]},
                          config=PipelineConfig(depth=1), policy=FaultPolicy(max_consecutive_failures=1))
    model = make_stack([good])
    try:
        with pytest.warns(ReplicaRetired, match=r"replica hung failed 1 times in a row .* CallTimeout"):
            res, got = grads_of(ex, model, x, y)
    finally:
        released.set()
        for h in handles:
            h.close()
    assert_same_grads(got, ref)
    assert res.device_samples == len(x) and len(good.log) == 4  # every micro-batch measured once, on the good one
    assert ex.stats["timeouts"] == 1 and [r.name for r in ex.pool(model[1]).active] == ["good"]

"""System tests of the distributed engine on the session's Ray cluster (see ``ray_cluster`` in conftest).

Every device here is noise-free (``Imperfections.ideal``), so a run that lost
or repeated a micro-batch would end with other parameters than the in-process
reference: comparing final parameters is how these tests count micro-batches.
"""

import numpy as np
import pytest
import torch

from pnn_cluster.config import ImperfectionsConfig, PlacementConfig, SimulatedDriver
from pnn_cluster.data import Dataset
from pnn_cluster.devices import DeviceError, Imperfections
from pnn_cluster.devices.shg import SHGDevice
from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
from pnn_cluster.runner import DeviceRecipe
from pnn_cluster.training.faults import FaultPolicy, ReplicaRetired
from pnn_cluster.training.pipeline import PipelineConfig, Replica, TwinPool
from pnn_cluster.training.trainer import SequentialExecutor, TrainConfig, Trainer
from pnn_cluster.training.workers import twin_payload
from pnn_cluster.twins import build_twin
from pnn_cluster.twins.versions import twin_digest

ray = pytest.importorskip("ray")

WIDTH = 4
OPTS = {"n_in": WIDTH, "n_out": WIDTH}


def ideal(seed: int, latency_s: float = 0.0) -> Imperfections:
    return Imperfections.ideal(seed=seed).with_(latency_call_s=latency_s)


def recipe(name: str, system: str = "shg", seed: int = 0, latency_s: float = 0.0, instrument: str | None = None,
           options=None, ideal_device: bool = True) -> DeviceRecipe:
    imp = ImperfectionsConfig(ideal=ideal_device, latency_call_s=latency_s)
    driver = SimulatedDriver(kind="simulated", system=system, options=dict(options or OPTS), imperfections=imp)
    return DeviceRecipe(name, 0, driver, seed=seed, placement=PlacementConfig(instrument=instrument))


def configs(n: int, latency_s: float = 0.0) -> list[DeviceRecipe]:
    return [recipe(f"shg{i}", seed=i, latency_s=latency_s) for i in range(n)]


def make_stack(devices) -> Stack:
    torch.manual_seed(0)
    layers = []
    for i, dev in enumerate(devices):
        # the model comes from the device's process, in that process's dtype; the twin works in ours
        twin = build_twin("physics", dev.spec, dev.model()).to(torch.get_default_dtype()).requires_grad_(False)
        layers += [Rescale(WIDTH, 0.0, 1.0, margin=0.02), PhysicalLayer(dev, twin=twin, name=f"shg{i}")]
    layers.append(Affine(WIDTH))
    return Stack(*layers)


def toy_data(n: int = 64) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, WIDTH))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    return Dataset("toy", x, y, x[:16], y[:16])


def train(model, executor, epochs: int = 2, micro: int = 4) -> Trainer:
    cfg = TrainConfig(epochs=epochs, batch_size=16, micro_batch=micro, lr=0.05, lr_schedule="constant")
    trainer = Trainer(model, toy_data(), cfg, executor=executor, progress=False)
    trainer.fit()
    return trainer


def reference(actors, epochs: int = 2) -> Trainer:
    """The same run with the in-process engine's schedule, through proxies of the same device actors.

    Measuring on the same actors keeps the devices' own arithmetic (their
    process's dtype) out of the comparison: only the schedule differs.
    """
    from actors.device import ActorDevice

    return train(make_stack([ActorDevice(a) for a in actors]), SequentialExecutor(), epochs)


def assert_same_params(a: Stack, b: Stack) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-12, msg=name)


def kill_all(actors) -> None:
    for a in actors:
        ray.kill(a, no_restart=True)


class KillingHandle:
    """A device actor's handle that kills the actor right after sending its ``at``-th call."""

    def __init__(self, actor, name: str, at: int, no_restart: bool):
        from actors.device import RayDeviceHandle

        self.inner = RayDeviceHandle(actor, name)
        self.name, self.at, self.no_restart, self.sent = name, at, no_restart, 0

    def submit(self, x, params, version):
        ref = self.inner.submit(x, params, version)
        self.sent += 1
        if self.sent == self.at:
            ray.kill(self.inner.actor, no_restart=self.no_restart)
        return ref

    def true_model(self):
        return self.inner.true_model()


class DyingSHG(SHGDevice):
    """An SHG bench whose instrument stops answering for good after ``calls`` measurements."""

    def __init__(self, calls: int, **kw):
        super().__init__(imperfections=Imperfections.ideal(seed=0), **kw)
        self.left = calls

    def measure(self, x, params):
        self.left -= 1
        if self.left < 0:
            raise DeviceError("shg: spectrometer not responding")
        return super().measure(x, params)


# -- placement -----------------------------------------------------------------------------------


def test_device_actors_run_on_the_node_that_declared_their_instrument(ray_cluster):
    from actors.cluster import node_instruments
    from actors.device import start_device

    assert {n: node_instruments()[node] for n, node in ray_cluster.lab_nodes.items()} == \
        {"shg-bench-1": ["amp-bench-1", "shg-bench-1"], "amp-bench-1": ["amp-bench-1", "shg-bench-1"],
         "circuit-bench-2": ["amp-bench-2", "circuit-bench-2"], "amp-bench-2": ["amp-bench-2", "circuit-bench-2"]}
    optics = start_device(recipe("optics", instrument="shg-bench-1"))
    circuit = start_device(recipe("circuit", "circuit", instrument="circuit-bench-2"))
    anywhere = start_device(recipe("anywhere"))
    try:
        where = [h["node_id"] for h in ray.get([a.health.remote() for a in (optics, circuit, anywhere)])]
        assert where[0] == ray_cluster.lab_nodes["shg-bench-1"]
        assert where[1] == ray_cluster.lab_nodes["circuit-bench-2"]
        assert where[2] in {ray_cluster.head_node, *ray_cluster.lab_nodes.values()}
        # one connection per instrument: a second owner waits until the first has gone
        second = start_device(recipe("optics-again", instrument="shg-bench-1"))
        ready, _ = ray.wait([second.health.remote()], timeout=1.0)
        assert ready == []
        ray.kill(optics, no_restart=True)
        assert ray.get(second.health.remote(), timeout=60)["node_id"] == ray_cluster.lab_nodes["shg-bench-1"]
        kill_all([second])
    finally:
        kill_all([optics, circuit, anywhere])


# -- schedules -----------------------------------------------------------------------------------


def test_pipelined_and_sequential_schedules_give_the_in_process_gradients(ray_cluster, float64):
    from actors.device import ActorDevice, start_device
    from actors.executor import RayExecutor
    from actors.twin import RayTwinHandle, start_twin

    x = torch.as_tensor(toy_data().x_train[:16])
    y = torch.as_tensor(toy_data().y_train[:16])

    def grads(model, executor):
        model.zero_grad(set_to_none=True)
        res = executor.forward_backward(model, x, y, torch.nn.CrossEntropyLoss(), 2)
        return res, [p.grad for p in model.parameters() if p.requires_grad]

    actors = [start_device(c) for c in configs(2)]
    twins = []
    try:
        model = make_stack([ActorDevice(a) for a in actors])
        ref_res, ref = grads(model, SequentialExecutor())
        runs = {s: grads(model, RayExecutor(config=PipelineConfig(schedule=s))) for s in ("pipelined", "sequential")}
        assert all(g is not r for g, r in zip(runs["pipelined"][1], ref))
        # the backward pass streamed to twin actors (two copies per layer) instead of run in the trainer
        pools = {}
        for layer, a in zip(model.physical_layers(), actors):
            copies = [start_twin(layer.twin) for _ in range(2)]
            twins += copies
            payload = twin_payload(layer.twin)
            pool = TwinPool([RayTwinHandle(t) for t in copies], payload, twin_digest(payload["state"]))
            pools[layer.name] = [Replica(ActorDevice(a).handle(), twins=pool)]
        ex = RayExecutor(pools=pools)
        runs["twin actors"] = grads(model, ex)
        assert ex.stats["twin_calls"] == 2 * 8  # each micro-batch's VJP on each layer, on the twin actors
        for name, (res, got) in runs.items():
            assert res.loss == pytest.approx(ref_res.loss, rel=1e-12), name
            assert res.device_samples == 2 * len(x), name
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14, msg=name)
    finally:
        kill_all(actors + twins)


# -- faults --------------------------------------------------------------------------------------


def test_device_actor_killed_mid_epoch_is_restarted_and_the_run_completes_exactly(ray_cluster, float64):
    from actors.device import ActorDevice, start_device
    from actors.executor import RayExecutor

    actors = [start_device(c) for c in configs(2, latency_s=0.005)]
    try:
        ref = reference(actors)
        model = make_stack([ActorDevice(a) for a in actors])
        before = ray.get(actors[1].health.remote())["incarnation"]
        # the 10th call to the second stage is in flight when its actor is killed (5 steps of 4 micro-batches)
        killer = KillingHandle(actors[1], "shg1", at=10, no_restart=False)
        ex = RayExecutor(pools={"shg1": [Replica(killer)]})
        trainer = train(model, ex)
        after = ray.get(actors[1].health.remote())["incarnation"]
        assert after != before  # it did die and come back
        assert trainer.global_step == ref.global_step == 8
        assert trainer.device_samples == ref.device_samples == 8 * 16 * 2
        assert_same_params(model, ref.model)
    finally:
        kill_all(actors)


def test_replica_that_dies_for_good_leaves_its_pool_and_the_others_finish_the_run(ray_cluster, float64):
    from actors.device import ActorDevice, start_device
    from actors.executor import RayExecutor

    # the second stage has three physical copies; copies of an ideal device measure alike
    actors = [start_device(c) for c in configs(2, latency_s=0.005)]
    copies = [start_device(recipe(f"copy{j}", seed=10 + j, latency_s=0.005)) for j in range(2)]
    try:
        ref = reference(actors)
        model = make_stack([ActorDevice(a) for a in actors])
        doomed = KillingHandle(copies[0], "shg1/doomed", at=3, no_restart=True)
        pool = [Replica(ActorDevice(actors[1]).handle(), name="shg1"), Replica(doomed, name="shg1/doomed"),
                Replica(ActorDevice(copies[1]).handle(), name="shg1/spare")]
        ex = RayExecutor(pools={"shg1": pool}, policy=FaultPolicy(max_consecutive_failures=2))
        with pytest.warns(ReplicaRetired, match=r"stage shg1: replica shg1/doomed failed 2 times in a row and "
                                                r"leaves the pool \(2 replica\(s\) left\); last error: .*Actor"):
            trainer = train(model, ex)
        assert [r.name for r in ex.pool(model[3]).active] == ["shg1", "shg1/spare"]
        assert all(r.measured > 0 for r in ex.pool(model[3]).active)
        assert trainer.global_step == 8 and trainer.device_samples == ref.device_samples
        assert_same_params(model, ref.model)
    finally:
        kill_all(actors + copies)


def toy_npz(tmp_path) -> str:
    data = toy_data()
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test)
    return str(path)


def toy_config(tmp_path, devices: dict, stack: list, **extra):
    from pnn_cluster.config import parse_config

    raw = {"name": "toy", "dataset": {"name": "npz", "path": toy_npz(tmp_path)}, "devices": devices,
           "stack": stack, **extra}
    return parse_config(raw, source="toy.yaml")


def test_trainer_actor_keeps_a_checkpoint_and_stops_clearly_when_a_stage_has_no_device_left(ray_cluster, tmp_path,
                                                                                             mlflow_store):
    import mlflow

    from actors.trainer import start_trainer
    from pnn_cluster.training.faults import TrainingAborted

    # twin checks (3 groups x 2 repeats) and initialisation (1 batch) take 7 calls, then 4 a step: dies in step 3
    cfg = toy_config(tmp_path, {"shg1": {
        "driver": {"kind": "python", "class": f"{__name__}:DyingSHG", "options": {"calls": 7 + 4 * 2, **OPTS}},
        "twin": {"kind": "ideal", "groups": 3, "batch": 8}}},
        [{"kind": "rescale"}, {"kind": "physical", "device": "shg1"}, {"kind": "affine"}],
        optimizer={"lr": 0.05}, schedule={"epochs": 2, "batch_size": 16, "micro_batch": 4})
    uri = mlflow_store
    trainer = start_trainer(cfg, tracking={"tracking_uri": uri})
    try:
        with pytest.raises(TrainingAborted, match=r"training stopped: stage shg1: no replica left to measure on "
                                                  r"\(shg1: DeviceError: shg: spectrometer not responding\); "
                                                  r"checkpoint of step 2 kept in run"):
            ray.get(trainer.run.remote())
        assert ray.get(trainer.status.remote())["global_step"] == 2
    finally:
        kill_all([trainer])
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pnn-cluster").experiment_id])
    run, = [r for r in runs if r.data.tags.get("pnn.command") == "train"]
    assert run.info.status == "FAILED"
    assert run.data.tags["pnn.checkpoint_step"] == "2"


def test_the_runner_on_ray_trains_like_the_runner_in_process(ray_cluster, tmp_path):
    from actors.launch import RayLauncher
    from pnn_cluster.runner import run_experiment

    # noisy devices this time (the systems' own imperfections): each device sees the same calls in the
    # same order either way, so it draws the same noise, and the runs agree to rounding. (SGD: Adam's
    # first steps turn any rounding difference in a near-zero gradient into a full step.) On Ray the twins
    # are fitted in twin actors and the backward pass streams to them; in process both run here.
    dev = {"driver": {"kind": "simulated", "system": "shg", "options": OPTS}, "twin": {"groups": 6, "batch": 16}}
    cfg = toy_config(tmp_path, {"a": dev, "b": dev},
                     [{"kind": "rescale"}, {"kind": "physical", "device": "a"}, {"kind": "rescale"},
                      {"kind": "physical", "device": "b"}, {"kind": "affine"}],
                     optimizer={"name": "sgd", "lr": 0.1}, schedule={"epochs": 1, "batch_size": 16, "micro_batch": 4})
    local = run_experiment(cfg)
    remote = RayLauncher().run(cfg)
    assert (remote.device_actors, remote.twin_actors, remote.trainer_actor) == (2, 2, True)
    assert (local.device_actors, local.twin_actors, local.trainer_actor) == (0, 0, False)
    assert remote.executor["twin_calls"] > 0 and "twin_calls" not in local.executor
    assert remote.device_samples_total == local.device_samples_total
    assert remote.twin_nmse == pytest.approx(local.twin_nmse, rel=1e-6)
    # float32, summed in another order in the twin actors: agreement to rounding, a few ulps per step
    assert remote.history[-1]["train_loss"] == pytest.approx(local.history[-1]["train_loss"], rel=1e-5)
    assert remote.history[-1]["val_loss"] == pytest.approx(local.history[-1]["val_loss"], rel=1e-5)
    assert remote.test_acc == local.test_acc


def test_a_restarted_twin_actor_gets_the_latest_twin_before_it_differentiates(ray_cluster, float64):
    from actors.device import ActorDevice, start_device
    from actors.executor import RayExecutor
    from actors.twin import RayTwinHandle, start_twin

    x = torch.as_tensor(toy_data().x_train[:16])
    y = torch.as_tensor(toy_data().y_train[:16])
    actor = start_device(recipe("shg0"))
    twin_actor = None
    try:
        model = make_stack([ActorDevice(actor)])
        layer = model.physical_layers()[0]
        twin_actor = start_twin(layer.twin)  # started with the twin as it was first
        payload = twin_payload(layer.twin)
        pool = TwinPool([RayTwinHandle(twin_actor)], payload, twin_digest(payload["state"]))
        # a refit elsewhere: the pool and the trainer's copy take the new state
        refit = {k: v + 0.05 if v.is_floating_point() else v for k, v in layer.twin.state_dict().items()}
        layer.twin.load_state_dict(refit)
        new = twin_payload(layer.twin)
        pool.update(new, twin_digest(new["state"]))
        model.zero_grad(set_to_none=True)
        SequentialExecutor().forward_backward(model, x, y, torch.nn.CrossEntropyLoss(), 4)
        want = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        # the twin actor dies and Ray rebuilds it from its constructor: the first state, not the latest
        ray.kill(twin_actor, no_restart=False)
        ex = RayExecutor(pools={layer.name: [Replica(ActorDevice(actor).handle(), twins=pool)]})
        model.zero_grad(set_to_none=True)
        ex.forward_backward(model, x, y, torch.nn.CrossEntropyLoss(), 4)
        got = [p.grad for p in model.parameters() if p.requires_grad]
        assert pool.reloads >= 1 and ex.stats["twin_restores"] >= 1
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
    finally:
        kill_all([actor] + ([twin_actor] if twin_actor is not None else []))


class HangingSHG(SHGDevice):
    """An SHG bench whose spectrometer hangs (never answers in time) from its ``after``-th measurement on."""

    def __init__(self, after: int, hang_s: float = 60.0, **kw):
        super().__init__(imperfections=Imperfections.ideal(seed=0), **kw)
        self.after, self.hang_s, self.calls = after, hang_s, 0

    def measure(self, x, params):
        import threading

        self.calls += 1
        if self.calls > self.after:
            threading.Event().wait(self.hang_s)  # an instrument that never answers: nothing will set this
        return super().measure(x, params)


def test_a_hung_device_ends_in_a_clear_error_naming_it_never_a_wait_without_end(ray_cluster, float64):
    from actors.device import ActorDevice, start_device
    from actors.executor import RayExecutor
    from pnn_cluster.config import PythonDriver
    from pnn_cluster.training.faults import NoReplicaLeft

    driver = PythonDriver.model_validate({"kind": "python", "class": f"{__name__}:HangingSHG",
                                          "options": {"after": 2, **OPTS}})
    actor = start_device(DeviceRecipe("shg0", 0, driver, timeout_s=2.0))
    try:
        device = ActorDevice(actor, name="shg0", timeout_s=2.0)
        x = np.random.default_rng(0).uniform(0, 1, (4, WIDTH))
        device.forward(x)
        device.forward(x)
        with pytest.raises(DeviceError, match=r"device shg0: a measurement got no reply within 2 s"):
            device.forward(x)
        model = make_stack([device])
        layer = model.physical_layers()[0]
        ex = RayExecutor(pools={layer.name: [Replica(device.handle(), name="shg0", timeout_s=2.0)]},
                         policy=FaultPolicy(max_consecutive_failures=2))
        with pytest.warns(ReplicaRetired), \
                pytest.raises(NoReplicaLeft, match=r"stage shg0: no replica left .*shg0: CallTimeout: device shg0: "
                                                   r"no reply within its timeout_s of 2 s"):
            ex.forward_backward(model, torch.as_tensor(x), torch.zeros(4, dtype=torch.long),
                                torch.nn.CrossEntropyLoss(), 2)
        assert ex.stats["timeouts"] == 2
    finally:
        kill_all([actor])


def test_on_ray_a_bumped_device_is_refined_in_its_twin_actor_while_training_goes_on(ray_cluster, tmp_path):
    from actors.launch import RayLauncher

    # two twin copies of the bumped device: the refit runs in the first, beside its VJPs, and both take it;
    # the bump comes after calibration (6 x 16 x 2 samples), initialisation and 12 steps of 16
    dev = {"driver": {"kind": "simulated", "system": "shg", "options": OPTS,
                      "imperfections": {"drift": 0, "steps": [{"at_samples": 192 + 64 + 12 * 16, "size": 2.0}]}},
           "twin": {"groups": 6, "batch": 16},
           "placement": {"twins": {"actors": 2}},
           "recalibration": {"policy": "refine", "warmup": 8, "explore_fraction": 0.2, "epochs": 5}}
    cfg = toy_config(tmp_path, {"a": dev}, [{"kind": "rescale"}, {"kind": "physical", "device": "a"},
                                            {"kind": "affine"}],
                     optimizer={"lr": 0.05}, schedule={"epochs": 12, "batch_size": 16, "micro_batch": 4})
    result = RayLauncher().run(cfg)
    assert result.twin_actors == 2
    watch = result.recalibration["a"]
    assert watch["alarm_steps"] and watch["alarm_steps"][0] >= 12, watch
    taken = [r for r in watch["versions_log"] if r["accepted"]]
    assert taken and taken[0]["source"] == "refine" and taken[0]["fitted_by"] == "a/twin0"
    assert taken[0]["nmse"] < taken[0]["nmse_before"]
    assert 0 < result.recalibration_samples <= 0.2 * watch["trained_rows"]
    assert result.state == "finished"

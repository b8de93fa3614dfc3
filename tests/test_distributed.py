"""System tests of the distributed engine on the session's Ray cluster (see ``ray_cluster`` in conftest).

Every device here is noise-free (``Imperfections.ideal``), so a run that lost
or repeated a micro-batch would end with other parameters than the in-process
reference: comparing final parameters is how these tests count micro-batches.
"""

import numpy as np
import pytest
import torch

from pnn_cluster.data import Dataset
from pnn_cluster.devices import DeviceError, Imperfections
from pnn_cluster.devices.shg import SHGDevice
from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
from pnn_cluster.training.faults import FaultPolicy, ReplicaRetired, TrainingAborted
from pnn_cluster.training.pipeline import PipelineConfig, Replica
from pnn_cluster.training.trainer import SequentialExecutor, TrainConfig, Trainer
from pnn_cluster.training.workers import DeviceConfig
from pnn_cluster.twins import build_twin

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.system

WIDTH = 4
OPTS = {"n_in": WIDTH, "n_out": WIDTH}


def ideal(seed: int, latency_s: float = 0.0) -> Imperfections:
    return Imperfections.ideal(seed=seed).with_(latency_call_s=latency_s)


def configs(n: int, latency_s: float = 0.0) -> list[DeviceConfig]:
    return [DeviceConfig("shg", OPTS, ideal(i, latency_s), name=f"shg{i}") for i in range(n)]


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
    from actors.device import RemoteDevice

    return train(make_stack([RemoteDevice(a) for a in actors]), SequentialExecutor(), epochs)


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
        super().__init__(**kw)
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
        {"shg-bench-1": ["shg-bench-1"], "circuit-bench-2": ["circuit-bench-2"]}
    optics = start_device(DeviceConfig("shg", OPTS, instrument="shg-bench-1"))
    circuit = start_device(DeviceConfig("circuit", {"n_in": 4, "n_out": 4}, instrument="circuit-bench-2"))
    anywhere = start_device(DeviceConfig("shg", OPTS))
    try:
        where = [h["node_id"] for h in ray.get([a.health.remote() for a in (optics, circuit, anywhere)])]
        assert where[0] == ray_cluster.lab_nodes["shg-bench-1"]
        assert where[1] == ray_cluster.lab_nodes["circuit-bench-2"]
        assert where[2] in {ray_cluster.head_node, *ray_cluster.lab_nodes.values()}
        # one connection per instrument: a second owner waits until the first has gone
        second = start_device(DeviceConfig("shg", OPTS, instrument="shg-bench-1"))
        ready, _ = ray.wait([second.health.remote()], timeout=1.0)
        assert ready == []
        ray.kill(optics, no_restart=True)
        assert ray.get(second.health.remote(), timeout=60)["node_id"] == ray_cluster.lab_nodes["shg-bench-1"]
        kill_all([second])
    finally:
        kill_all([optics, circuit, anywhere])


# -- schedules -----------------------------------------------------------------------------------


def test_pipelined_and_sequential_schedules_give_the_in_process_gradients(ray_cluster, float64):
    from actors.device import RemoteDevice, start_device
    from actors.executor import RayExecutor
    from actors.twin import remote_vjp, start_twin

    x = torch.as_tensor(toy_data().x_train[:16])
    y = torch.as_tensor(toy_data().y_train[:16])

    def grads(model, executor):
        model.zero_grad(set_to_none=True)
        res = executor.forward_backward(model, x, y, torch.nn.CrossEntropyLoss(), 2)
        return res, [p.grad for p in model.parameters() if p.requires_grad]

    actors = [start_device(c) for c in configs(2)]
    twins = []
    try:
        model = make_stack([RemoteDevice(a) for a in actors])
        ref_res, ref = grads(model, SequentialExecutor())
        runs = {s: grads(model, RayExecutor(config=PipelineConfig(schedule=s))) for s in ("pipelined", "sequential")}
        assert all(g is not r for g, r in zip(runs["pipelined"][1], ref))
        # the backward pass on twin actors instead of in the trainer
        twins = [start_twin(layer.twin) for layer in model.physical_layers()]
        pools = {layer.name: [Replica(RemoteDevice(a).handle(), vjp=remote_vjp(t))]
                 for layer, a, t in zip(model.physical_layers(), actors, twins)}
        runs["twin actors"] = grads(model, RayExecutor(pools=pools))
        for name, (res, got) in runs.items():
            assert res.loss == pytest.approx(ref_res.loss, rel=1e-12), name
            assert res.device_samples == 2 * len(x), name
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14, msg=name)
    finally:
        kill_all(actors + twins)


# -- faults --------------------------------------------------------------------------------------


def test_device_actor_killed_mid_epoch_is_restarted_and_the_run_completes_exactly(ray_cluster, float64):
    from actors.device import RemoteDevice, start_device
    from actors.executor import RayExecutor

    actors = [start_device(c) for c in configs(2, latency_s=0.005)]
    try:
        ref = reference(actors)
        model = make_stack([RemoteDevice(a) for a in actors])
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
    from actors.device import RemoteDevice, start_device
    from actors.executor import RayExecutor

    # the second stage has three physical copies; copies of an ideal device measure alike
    actors = [start_device(c) for c in configs(2, latency_s=0.005)]
    copies = [start_device(DeviceConfig("shg", OPTS, ideal(10 + j, 0.005))) for j in range(2)]
    try:
        ref = reference(actors)
        model = make_stack([RemoteDevice(a) for a in actors])
        doomed = KillingHandle(copies[0], "shg1/doomed", at=3, no_restart=True)
        pool = [Replica(RemoteDevice(actors[1]).handle(), name="shg1"), Replica(doomed, name="shg1/doomed"),
                Replica(RemoteDevice(copies[1]).handle(), name="shg1/spare")]
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


def test_trainer_actor_saves_a_checkpoint_and_stops_clearly_when_a_stage_has_no_device_left(ray_cluster, tmp_path):
    from actors.device import start_device
    from actors.trainer import start_trainer
    from pnn_cluster.experiments import LayerSpec, TaskSpec, physical

    task = TaskSpec("toy", "toy", (LayerSpec("rescale"), physical("shg", **OPTS), LayerSpec("affine")),
                    train=TrainConfig(epochs=2, batch_size=16, micro_batch=4, lr=0.05),
                    quick_train=TrainConfig(epochs=2, batch_size=16, micro_batch=4, lr=0.05))
    # calibration (8 groups) and initialisation (1 batch) take 9 calls, then 4 a step: it dies in step 3
    dying = DeviceConfig(f"{__name__}:DyingSHG", {"calls": 9 + 4 * 2, "imperfections": ideal(0), **OPTS})
    device = start_device(dying)
    path = tmp_path / "stopped.pt"
    trainer = start_trainer([device], checkpoint=path, policy=FaultPolicy(max_consecutive_failures=2))
    try:
        with pytest.raises(Exception, match=r"training stopped: stage shg1: no replica left to measure on "
                                            r"\(shg1: DeviceError: shg: spectrometer not responding\); "
                                            r"checkpoint of step 2 saved to") as info:
            ray.get(trainer.run_method.remote(task, "pat", data=toy_data(), twin="ideal"))
        assert isinstance(info.value, TrainingAborted)
        assert ray.get(trainer.status.remote())["global_step"] == 2
        assert torch.load(path, weights_only=True)["global_step"] == 2
    finally:
        kill_all([trainer, device])


def test_distributed_run_method_trains_exactly_like_the_in_process_pipeline(ray_cluster):
    from actors.trainer import run_method_distributed
    from pnn_cluster.experiments import LayerSpec, TaskSpec, physical, run_method
    from pnn_cluster.training.pipeline import PipelineExecutor

    # noisy devices this time (the systems' own imperfections): each device sees the same calls in the
    # same order either way, so it draws the same noise, and the runs agree to rounding. (SGD: Adam's
    # first steps turn any rounding difference in a near-zero gradient into a full step.)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, optimizer="sgd")
    task = TaskSpec("toy", "toy", (LayerSpec("rescale"), physical("shg", **OPTS), LayerSpec("rescale"),
                                   physical("shg", **OPTS), LayerSpec("affine")),
                    train=cfg, quick_train=cfg, calib_groups=6)
    local = run_method(task, "pat", data=toy_data(), executor=PipelineExecutor())
    remote = run_method_distributed(task, "pat", data=toy_data())
    assert remote.device_samples == local.device_samples
    assert remote.twin_nmse == pytest.approx(local.twin_nmse, rel=1e-6)
    assert remote.history[-1]["train_loss"] == pytest.approx(local.history[-1]["train_loss"], rel=1e-6)
    assert remote.history[-1]["test_loss"] == pytest.approx(local.history[-1]["test_loss"], rel=1e-6)
    assert remote.test_acc == local.test_acc

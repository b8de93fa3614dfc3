"""End to end: a 2-layer stack whose SHG layer is a VISA device on the simulated SCPI bench and whose
circuit layer is served over ZeroMQ trains to the accuracy of the same stack in process."""

from __future__ import annotations

import numpy as np
import torch

from pnn_cluster.data import Dataset
from pnn_cluster.devices import make_device
from pnn_cluster.drivers.visa import VisaDevice
from pnn_cluster.drivers.zmq_client import ZmqDevice
from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
from pnn_cluster.servers.scpi_bench import SimBench
from pnn_cluster.servers.zmq_server import DeviceServer
from pnn_cluster.training import TrainConfig, Trainer


def toy(seed=0):
    """Three classes from the sign pattern of two feature combinations: needs a nonlinear stack."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(480, 12)).astype(np.float32)
    a, b = x[:, 0] + x[:, 1], x[:, 2] - x[:, 3]
    y = np.where(a > 0.3, 0, np.where(b > 0, 1, 2))
    return Dataset("toy3", x[:360], y[:360], x[360:], y[360:])


def build(shg, circ) -> Stack:
    torch.manual_seed(0)
    return Stack(
        torch.nn.Linear(12, 12), Rescale(12, 0.0, 1.0, margin=0.02),
        PhysicalLayer(shg, twin=make_device("shg").model()),
        Rescale(12, 0.0, 1.0, weight=8.0, bias=-1.0, margin=0.02),
        PhysicalLayer(circ, twin=make_device("circuit", n_in=12, n_out=12).model()),
        Affine(12), torch.nn.Linear(12, 3),
    )


def train(stack: Stack, data: Dataset) -> float:
    tr = Trainer(stack, data, TrainConfig(epochs=4, batch_size=24, lr=0.02), progress=False)
    tr.fit()
    return tr.test()["acc"]


def test_visa_and_zmq_stack_trains_like_the_inprocess_stack():
    data = toy()
    # default imperfections (noise, gap, quantisation) on both sides: the devices are the same copies
    shg_imp = make_device("shg").imperfections.with_(seed=11, latency_call_s=0, latency_sample_s=0)
    circ_imp = make_device("circuit").imperfections.with_(seed=12, latency_call_s=0, latency_sample_s=0)
    local = train(build(make_device("shg", imperfections=shg_imp),
                        make_device("circuit", n_in=12, n_out=12, imperfections=circ_imp)), data)
    with SimBench("shg", port=0, imperfections=shg_imp) as bench, \
            DeviceServer(make_device("circuit", n_in=12, n_out=12, imperfections=circ_imp),
                         "tcp://127.0.0.1:0") as server:
        visa = VisaDevice.from_config(bench.visa_config(timeout_s=10)).connect()
        remote = ZmqDevice(server.endpoint).connect()
        try:
            remote_acc = train(build(visa, remote), data)
        finally:
            visa.close()
            remote.close()
    chance = np.bincount(data.y_test).max() / len(data.y_test)
    print(f"in process {local:.3f}, VISA + ZeroMQ {remote_acc:.3f}, chance {chance:.3f}")
    assert local > chance + 0.2, (local, chance)
    # 120 test samples: one binomial standard deviation is about 4 points
    assert abs(remote_acc - local) <= 0.08, (remote_acc, local)

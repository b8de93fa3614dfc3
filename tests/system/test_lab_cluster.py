"""The whole lab on the test cluster: every kind of device in its own actor on the PC that declared it.

A head node and two lab PCs (``ray_cluster``): the optics bench is a ZeroMQ device
server, the electronics bench a SCPI instrument pair reached through pyvisa, and
the amplifier a user's own Device class (``lab_devices:TanhAmp``, the README's
example) with two physical copies on two PCs serving one layer. The loop runs in
a trainer actor, every twin in twin actors; the same configuration run in this
process must train to the same accuracy within noise.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from pnn_cluster.config import parse_config
from pnn_cluster.devices import make_device
from pnn_cluster.servers.scpi_bench import SimBench
from pnn_cluster.servers.zmq_server import DeviceServer

OPTS = {"n_in": 8, "n_out": 8}


def toy_npz(path) -> str:
    """Three classes from the sign pattern of two feature combinations: needs a nonlinear stack."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(480, 12))
    a, b = x[:, 0] + x[:, 1], x[:, 2] - x[:, 3]
    y = np.where(a > 0.3, 0, np.where(b > 0, 1, 2))
    np.savez(path, x_train=x[:360], y_train=y[:360], x_test=x[360:], y_test=y[360:])
    return str(path)


def lab_config(zmq_endpoint: str, visa: dict, data: str) -> dict:
    twin = {"kind": "physics", "groups": 6, "batch": 32, "epochs": 12}
    amp = {"kind": "python", "class": "lab_devices:SizedTanhAmp", "options": {"size": 8, "seed": 1}}
    amp2 = {"kind": "python", "class": "lab_devices:SizedTanhAmp", "options": {"size": 8, "seed": 2}}
    return {
        "name": "lab-on-loopback",
        "dataset": {"name": "npz", "path": data},
        "devices": {
            "optics": {"driver": {"kind": "zmq", "address": zmq_endpoint, "timeout_s": 10,
                                  "model": {"system": "shg", "options": OPTS}},
                       "placement": {"instrument": "shg-bench-1"}, "twin": twin, "timeout_s": 30},
            "circuit": {"driver": {"kind": "visa", "source": visa["source"], "sink": visa["sink"],
                                   "model": {"system": "circuit", "options": OPTS}},
                        "placement": {"instrument": "circuit-bench-2"}, "twin": twin, "timeout_s": 30},
            "amp": {"driver": amp, "placement": {"instrument": "amp-bench-1"}, "twin": twin,
                    "pool": [{"driver": amp2, "placement": {"instrument": "amp-bench-2"}}]},
        },
        "stack": [{"kind": "linear", "size": 8}, {"kind": "rescale"}, {"kind": "physical", "device": "optics"},
                  {"kind": "rescale"}, {"kind": "physical", "device": "circuit"}, {"kind": "rescale"},
                  {"kind": "physical", "device": "amp"}, {"kind": "linear", "size": 3}],
        "init": {"spread": 1.5},
        "optimizer": {"lr": 0.05},
        "schedule": {"epochs": 6, "batch_size": 24, "micro_batch": 12},
    }


@contextlib.contextmanager
def lab_servers():
    """The optics bench's device server and the electronics bench, freshly started: the same devices (same
    seeds, same noise to come) for every run."""
    shg_imp = make_device("shg", **OPTS).imperfections.with_(seed=21, latency_call_s=0, latency_sample_s=0)
    circ_imp = make_device("circuit", **OPTS).imperfections.with_(seed=22, latency_call_s=0, latency_sample_s=0)
    with DeviceServer(make_device("shg", imperfections=shg_imp, **OPTS), "tcp://127.0.0.1:0") as server, \
            SimBench("circuit", port=0, imperfections=circ_imp, **OPTS) as bench:
        yield server.endpoint, bench.visa_config(timeout_s=10)


def test_zmq_visa_and_user_devices_each_in_an_actor_on_its_node_train_like_in_process(ray_cluster, tmp_path):
    from actors.launch import RayLauncher
    from pnn_cluster.runner import run_experiment

    data = toy_npz(tmp_path / "toy3.npz")
    with lab_servers() as (endpoint, visa):
        local = run_experiment(parse_config(lab_config(endpoint, visa, data), source="lab.yaml"))
    with lab_servers() as (endpoint, visa):
        remote = RayLauncher().run(parse_config(lab_config(endpoint, visa, data), source="lab.yaml"))
    labs = ray_cluster.lab_nodes
    assert remote.nodes == {"optics": labs["shg-bench-1"], "circuit": labs["circuit-bench-2"],
                            "amp": labs["amp-bench-1"], "amp/1": labs["amp-bench-2"]}
    assert (remote.device_actors, remote.twin_actors, remote.trainer_actor) == (4, 4, True)
    assert remote.executor["twin_calls"] > 0  # the backward passes ran on the twin actors
    assert remote.steps == local.steps == 6 * 14  # 324 train (36 validation) in batches of 24
    assert remote.device_samples_total == local.device_samples_total
    chance = 0.4  # the largest class of the 120 test samples
    print(f"in process {local.test_acc:.3f}, on the cluster {remote.test_acc:.3f}; twins "
          f"{local.twin_nmse:.4f} / {remote.twin_nmse:.4f}")
    assert local.test_acc > chance + 0.2 and remote.test_acc > chance + 0.2, (local.test_acc, remote.test_acc)
    # the same devices and seeds; what differs is which amplifier copy measures which micro-batch (whichever
    # is free first) and so the noise each draws: 120 test samples, one binomial s.d. of the difference ~6 points
    assert abs(remote.test_acc - local.test_acc) <= 0.12, (remote.test_acc, local.test_acc)
    assert remote.twin_nmse == pytest.approx(local.twin_nmse, rel=0.05)

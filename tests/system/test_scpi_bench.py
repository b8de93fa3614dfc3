"""The simulated SCPI bench through real pyvisa-py over TCP on 127.0.0.1 (OS-chosen ports)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import pyvisa

from pnn_cluster.devices import SYSTEMS, Imperfections, make_device
from pnn_cluster.devices.spec import LimitError
from pnn_cluster.drivers.visa import InstrumentError, InstrumentTimeout, Oscilloscope, VisaDevice, WaveformGenerator
from pnn_cluster.servers import BindError
from pnn_cluster.servers.scpi_bench import SimBench

IDEAL = Imperfections.ideal(seed=3)


@pytest.fixture(scope="module")
def rm():
    rm = pyvisa.ResourceManager("@py")
    yield rm
    rm.close()


@pytest.fixture(scope="module")
def shg_bench():
    with SimBench("shg", port=0, imperfections=IDEAL) as bench:
        yield bench


def raw(rm, resource, timeout_ms=3000):
    return rm.open_resource(resource, read_termination="\n", write_termination="\n", timeout=timeout_ms)


def error(res) -> tuple[int, str]:
    code, _, msg = res.query("SYST:ERR?").partition(",")
    return int(code), msg.strip('"')


@pytest.mark.parametrize("system", [s for s in ("shg", "circuit") if s in SYSTEMS])
def test_visa_device_on_bench_matches_inprocess(system):
    ref = make_device(system, imperfections=IDEAL)
    with SimBench(system, port=0, imperfections=IDEAL) as bench:
        dev = VisaDevice.from_config(bench.visa_config(timeout_s=10))
        with dev:
            assert dev.spec == ref.spec  # read from the bench (SYST:SPEC?)
            kinds = (dev.source.kind, dev.sink.kind)
            assert kinds == (("pulse_shaper", "spectrometer") if system == "shg" else ("awg", "scope"))
            rng = np.random.default_rng(0)
            x = rng.uniform(ref.spec.input.low, ref.spec.input.high, (32, ref.spec.input.size))
            np.testing.assert_allclose(dev.forward(x), ref.forward(x), rtol=0, atol=1e-12)
            p = ref.spec.params[0]
            theta = rng.uniform(p.low, p.high, p.shape)
            dev.set_params({p.name: theta})
            ref.set_params({p.name: theta})
            np.testing.assert_allclose(dev.forward(x), ref.forward(x), rtol=0, atol=1e-12)
            np.testing.assert_array_equal(dev.source.read_param(p.name), theta.ravel())
            assert dev.identity()["sink"]["manufacturer"] == "PNN-Cluster"
        assert not dev.source.is_open


def test_bench_enforces_limits_and_queues_scpi_errors(rm, shg_bench):
    src = raw(rm, shg_bench.resources["source"])
    snk = raw(rm, shg_bench.resources["sink"])
    try:
        assert src.query("*IDN?").startswith("PNN-Cluster,SIM-PULSE_SHAPER,")
        assert error(src) == (0, "No error")
        src.write("SOUR:WAV:CENT 3000")
        code, msg = error(src)
        assert code == -222 and "center_wavelength" in msg and "3000" in msg and "[700, 1700] nm" in msg
        assert float(src.query("SOUR:WAV:CENT?")) == 800.0  # unchanged
        src.write("source:wavelength:center 1030.5")  # long form, any case
        assert float(src.query("SOUR:WAV:CENT?")) == 1030.5 and error(src)[0] == 0
        src.write("SOUR:WAV:CENT abc")
        assert error(src)[0] == -104
        src.write("OUTP MAYBE")
        assert error(src)[0] == -224
        src.write("OUTP ON")
        # a batch with one value out of range is refused at the bench and unloaded
        x = np.full((2, 12), 0.5)
        x[1, 3] = 1.5
        src.write_binary_values("SOUR:MASK:DATA ", x.ravel(), datatype="d")
        code, msg = error(src)
        assert code == -222 and "input[1,3]" in msg and "allowed: [0, 1]" in msg
        snk.write("READ:SPEC?")
        assert snk.read_bytes(4) == b"#10\n"
        code, msg = error(snk)
        assert code == -221 and "no batch loaded" in msg
        src.write_binary_values("SOUR:MASK:DATA ", np.full(13, 0.5), datatype="d")  # not whole samples
        assert error(src)[0] == -222
        src.write_binary_values("SOUR:PAR:DATA phase,", np.full(24, 9.0), datatype="d")
        code, msg = error(src)
        assert code == -222 and "params.phase" in msg
        src.write_binary_values("SOUR:PAR:DATA bogus,", np.zeros(24), datatype="d")
        assert error(src)[0] == -224
        src.write("FOO:BAR 1;*IDN")
        assert error(src)[0] == -113
        assert error(src)[0] == -113  # *IDN without '?' is no command
        assert error(src) == (0, "No error")
        assert shg_bench.stats["rejected"] >= 4
    finally:
        src.write("*RST")
        src.close()
        snk.close()


def test_error_queue_overflows_like_an_instrument(rm, shg_bench):
    res = raw(rm, shg_bench.resources["source"])
    try:
        res.write(";".join(["NOPE"] * 40))
        assert res.query("SYST:ERR:COUN?") == "32"
        codes = [error(res)[0] for _ in range(32)]
        assert codes[:31] == [-113] * 31 and codes[31] == -350
        res.write("NOPE")
        res.write("*CLS")
        assert error(res) == (0, "No error")
    finally:
        res.close()


def test_several_clients_have_their_own_error_queues(rm, shg_bench):
    failures: list[str] = []
    barrier = threading.Barrier(4)

    def client(k: int) -> None:
        res = raw(rm, shg_bench.resources["sink"])
        try:
            barrier.wait()
            for _ in range(20):
                res.write(f"SENS:INT:TIME {100 + k}")  # out of range: -222 in this client's queue only
                assert res.query("*IDN?").startswith("PNN-Cluster,SIM-SPECTROMETER")
                code, msg = error(res)
                assert code == -222 and f"got {100 + k}" in msg, msg
                assert error(res)[0] == 0
        except Exception as exc:  # collected; pytest sees assertions from threads only this way
            failures.append(f"client {k}: {exc!r}")
        finally:
            res.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures


def test_failed_query_times_out_like_a_real_instrument(rm, shg_bench):
    awg = WaveformGenerator(shg_bench.resources["source"], timeout_s=0.3)
    awg.open(rm)
    try:
        with pytest.raises(InstrumentTimeout, match="no answer to 'NOPE\\?'"):
            awg.query("NOPE?")
        assert awg.errors() == [(-113, "Undefined header;NOPE?")]
    finally:
        awg.close()


def test_driver_limits_mirror_the_bench(rm, shg_bench):
    # a driver for the wrong instrument type: the bench answers with its own refusal
    scope = Oscilloscope(shg_bench.resources["sink"], timeout_s=2)
    scope.open(rm)
    try:
        with pytest.raises(InstrumentError, match="-113"):
            scope.time_scale = 1e-3
        with pytest.raises(LimitError):
            scope.time_scale = 100.0  # refused by the driver, nothing sent
        assert scope.errors() == []
    finally:
        scope.close()


def test_clean_shutdown_with_clients_connected(rm):
    bench = SimBench("shg", port=0, imperfections=IDEAL).start()
    res = raw(rm, bench.resources["source"], timeout_ms=2000)
    assert res.query("*OPC?") == "1"
    port = bench.ports["source"]
    bench.stop()
    with pytest.raises(pyvisa.errors.VisaIOError):  # the bench closed the connection
        res.query("*IDN?")
    res.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    bench.stop()  # idempotent


def test_bench_refuses_non_loopback_and_busy_ports(shg_bench):
    with pytest.raises(BindError, match="not a loopback address"):
        SimBench("shg", host="0.0.0.0")
    with pytest.raises(BindError, match="cannot listen"):
        SimBench("shg", port=shg_bench.ports["source"]).start()


def test_cli_sim_instrument_serves_until_sigterm(rm, tmp_path):
    cmd = [sys.executable, "-m", "pnn_cluster.cli", "sim-instrument", "--system", "shg", "--port", "0", "--ideal"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = [proc.stdout.readline() for _ in range(3)]  # blocks until the bench is listening
        assert lines[0].startswith("source (pulse_shaper): TCPIP::127.0.0.1::"), lines
        resource = lines[0].split(": ", 1)[1].strip()
        res = raw(rm, resource)
        assert res.query("*IDN?").startswith("PNN-Cluster,SIM-PULSE_SHAPER")
        res.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM: shutting down" in err and "stopped after" in out


# -- hook for the end-to-end training test of issue 4 -----------------------------------------------------


def test_e2e_hook_visa_and_zmq_stack_step_matches_inprocess(shg_bench):
    """Hook for the end-to-end test (issue 4): a 2-layer stack, one layer a VISA device on the bench, the
    other served over ZeroMQ, trains like the same stack in process.

    Until the full training-accuracy test lands here, this checks the wiring it needs: with ideal devices,
    one trainer step through the remote stack gives the same loss and the same parameters as in process.
    Skipped while the trainer or the second system is missing.
    """
    trainer_mod = pytest.importorskip("pnn_cluster.training.trainer")
    if not hasattr(trainer_mod, "Trainer") or "circuit" not in SYSTEMS:
        pytest.skip("needs pnn_cluster.training.trainer.Trainer and the circuit system")
    import torch

    from pnn_cluster.data import Dataset
    from pnn_cluster.drivers.zmq_client import ZmqDevice
    from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
    from pnn_cluster.servers.zmq_server import DeviceServer

    shg = make_device("shg", imperfections=IDEAL)
    circ = make_device("circuit", imperfections=IDEAL)
    rng = np.random.default_rng(1)
    n_feat = shg.spec.input.size
    data = Dataset("toy", rng.normal(size=(64, n_feat)), rng.integers(0, 3, 64),
                   rng.normal(size=(16, n_feat)), rng.integers(0, 3, 16))

    def stack(dev_a, dev_b) -> Stack:
        torch.manual_seed(0)
        return Stack(Rescale(n_feat, shg.spec.input.low, shg.spec.input.high, margin=0.02),
                     PhysicalLayer(dev_a, twin=shg.model()),
                     nn_linear(shg.spec.output.size, circ.spec.input.size),
                     Rescale(circ.spec.input.size, circ.spec.input.low, circ.spec.input.high, margin=0.02),
                     PhysicalLayer(dev_b, twin=circ.model()),
                     Affine(circ.spec.output.size))

    def nn_linear(a, b):
        return torch.nn.Linear(a, b)

    def one_step(model):
        tr = trainer_mod.Trainer(model, data, trainer_mod.TrainConfig(epochs=1, batch_size=32), progress=False)
        x = torch.as_tensor(data.x_train[:32])
        y = torch.as_tensor(data.y_train[:32])
        return tr.step(x, y)["train_loss"], [p.detach().clone() for p in model.parameters()]

    with DeviceServer(make_device("circuit", imperfections=IDEAL), "tcp://127.0.0.1:0") as server:
        visa = VisaDevice.from_config(shg_bench.visa_config(), model=shg.model()).connect()
        remote = ZmqDevice(server.endpoint, model=circ.model()).connect()
        try:
            loss_remote, params_remote = one_step(stack(visa, remote))
        finally:
            visa.close()
            remote.close()
    loss_local, params_local = one_step(stack(make_device("shg", imperfections=IDEAL),
                                              make_device("circuit", imperfections=IDEAL)))
    assert loss_remote == pytest.approx(loss_local, abs=1e-9)
    for a, b in zip(params_remote, params_local):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)

"""ZeroMQ device server and client on loopback: round trips, limits, health, restart and reconnect, CURVE, CLI.

The bind rules checked before any socket is opened: ``tests/unit/test_zmq.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq
from helpers import Gain, curve_keys

from pnn_cluster.devices import DeviceError, DeviceSpec, Imperfections, Port, make_device
from pnn_cluster.devices.spec import LimitError
from pnn_cluster.drivers.zmq_client import ClientCurve, DeviceClient, RemoteError, ZmqDevice
from pnn_cluster.servers import BindError
from pnn_cluster.servers.zmq_server import CurveServerConfig, DeviceServer

IDEAL = Imperfections.ideal(seed=5)
LOOPBACK_ANY = "tcp://127.0.0.1:0"


class Broken(Gain):
    def measure(self, x, params):
        raise DeviceError("gain: instrument lost")


def test_zmq_device_matches_inprocess_and_learns_its_spec_on_connect():
    ref = make_device("shg", imperfections=IDEAL)
    with DeviceServer(make_device("shg", imperfections=IDEAL), LOOPBACK_ANY) as server:
        assert server.endpoint.startswith("tcp://127.0.0.1:")
        with ZmqDevice(server.endpoint) as dev:
            assert dev.spec == ref.spec
            x = np.random.default_rng(0).uniform(0, 1, (64, ref.spec.input.size))
            np.testing.assert_allclose(dev.forward(x), ref.forward(x), rtol=0, atol=1e-12)
            theta = np.linspace(-1, 1, ref.spec.params[0].shape[0])
            dev.set_params({"phase": theta})
            ref.set_params({"phase": theta})
            y = dev.forward(x.astype(np.float32))  # float32 on the wire is accepted too
            np.testing.assert_allclose(y, ref.forward(x.astype(np.float32)), rtol=0, atol=1e-12)
            assert y.flags.writeable and y.dtype == np.float64
            assert dev.identity()["remote"]["system"] == "shg"


def test_limits_are_enforced_at_the_server_and_counted_in_health():
    with DeviceServer(Gain(), LOOPBACK_ANY) as server, DeviceClient(server.endpoint, timeout_s=5) as client:
        x = np.zeros((3, 4))
        cases = [
            (lambda: client.forward(np.full((3, 4), 2.0)), "input[0,0]", "[-1, 1] V"),
            (lambda: client.forward(np.full((3, 4), np.nan)), "input[0,0]", "finite numbers"),
            (lambda: client.forward(np.zeros((3, 5))), "input", "(batch, 4)"),
            (lambda: client.forward(x, {"gain": [1, 1, 1, 9]}), "params.gain[3]", "[0, 2] V/V"),
            (lambda: client.set_params({"gain": np.ones(3)}), "params.gain", "(4,)"),
            (lambda: client.set_params({"gain": [1, 1, np.inf, 1]}), "params.gain[2]", "finite numbers"),
        ]
        for call, field, allowed in cases:
            with pytest.raises(LimitError) as ei:
                call()
            assert ei.value.field == field and allowed in ei.value.allowed, str(ei.value)
            assert ei.value.device == "gain"
        with pytest.raises(RemoteError) as ei:
            client.forward(x, {"offset": np.zeros(4)})  # a parameter the device does not have
        assert ei.value.kind == "protocol" and ei.value.field == "arrays.params.offset"
        np.testing.assert_array_equal(client.forward(np.full((2, 4), 0.5), {"gain": np.full(4, 2.0)}), 1.0)
        h = client.health()
        assert h["server"]["rejected"] == 7
        assert h["server"]["rejected_limit"] == 6 and h["server"]["rejected_protocol"] == 1
        assert h["server"]["ok"] == 1 and h["server"]["requests"] == 9  # the health reply is counted after
        assert h["calls"] == 1 and h["rejected"] == 6


def test_zmq_device_validates_locally_before_sending():
    with DeviceServer(Gain(), LOOPBACK_ANY) as server:
        dev = ZmqDevice(server.endpoint, spec=Gain.spec).connect()
        with pytest.raises(LimitError, match="input"):
            dev.forward(np.full((1, 4), 3.0))
        assert dev.client.stats["requests"] == 1  # only the spec fetch of connect()
        assert server.stats["rejected"] == 0
        dev.close()


def test_given_spec_must_match_the_server():
    other = DeviceSpec("gain", Port(4, -2.0, 2.0, "V"), Port(4, unit="V"), Gain.spec.params)
    with DeviceServer(Gain(), LOOPBACK_ANY) as server:
        with pytest.raises(DeviceError, match="differs"):
            ZmqDevice(server.endpoint, spec=other).connect()


def test_zmq_device_without_spec_names_its_endpoint_until_connect_then_knows_the_servers_spec_and_params():
    served = Gain()
    served.set_params({"gain": [0.5, 1.0, 1.5, 2.0]})
    with DeviceServer(served, LOOPBACK_ANY) as server:
        dev = ZmqDevice(server.endpoint)  # no I/O: nothing sent yet
        assert not dev.spec_known and dev.client.stats["requests"] == 0
        for read in (lambda: dev.spec, lambda: dev.params):
            with pytest.raises(DeviceError, match="learnt .*on connect\\(\\); call connect\\(\\) first") as ei:
                read()
            assert server.endpoint in str(ei.value)
        with dev:
            assert dev.spec == Gain.spec
            np.testing.assert_array_equal(dev.params["gain"], [0.5, 1.0, 1.5, 2.0])
            np.testing.assert_array_equal(dev.forward(np.full((1, 4), 0.5)), [[0.25, 0.5, 0.75, 1.0]])


def test_device_failure_becomes_an_error_reply_and_the_server_keeps_serving():
    with DeviceServer(Broken(), LOOPBACK_ANY) as server, DeviceClient(server.endpoint) as client:
        for _ in range(2):
            with pytest.raises(RemoteError, match="instrument lost") as ei:
                client.forward(np.zeros((1, 4)))
            assert ei.value.kind == "device"
        assert client.health()["server"]["device_errors"] == 2


def test_client_reconnects_after_server_restart():
    first = DeviceServer(Gain(), LOOPBACK_ANY).start()
    endpoint = first.endpoint
    client = DeviceClient(endpoint, timeout_s=0.5, retries=20)
    x = np.full((2, 4), 0.25)
    np.testing.assert_array_equal(client.forward(x), x)
    instance = client.health()["server"]["instance"]
    first.stop()

    # the next request goes out while nothing listens; the server comes back after the client's first timeout
    # (seen in the client's own counters; the test's end stops the look)
    ended = threading.Event()
    second = DeviceServer(Gain(), endpoint)

    def restart_after_the_first_timeout():
        deadline = time.monotonic() + 30
        while client.stats["timeouts"] < 1 and time.monotonic() < deadline and not ended.wait(0.005):
            pass
        second.start()

    restarter = threading.Thread(target=restart_after_the_first_timeout)
    restarter.start()
    try:
        np.testing.assert_array_equal(client.forward(x, {"gain": np.full(4, 2.0)}), 2 * x)
        restarter.join(30)
        assert client.stats["timeouts"] >= 1 and client.stats["reconnects"] >= 1
        h = client.health()
        assert h["server"]["instance"] != instance and client.stats["server_restarts"] == 1
    finally:
        ended.set()
        restarter.join(30)
        second.stop()
        client.close()


def test_no_server_gives_a_clear_error_after_retries():
    with DeviceServer(Gain(), LOOPBACK_ANY) as server:
        endpoint = server.endpoint
    client = DeviceClient(endpoint, timeout_s=0.2, retries=1)
    with pytest.raises(DeviceError, match=r"no reply to 'health' after 2 tries of 0.2 s"):
        client.health()
    assert client.stats["timeouts"] == 2
    client.close()


def test_an_endpoint_a_server_listens_on_cannot_be_bound_again():
    with DeviceServer(Gain(), LOOPBACK_ANY) as server:
        with pytest.raises(BindError, match="cannot bind"):
            DeviceServer(Gain(), server.endpoint).start()


def test_curve_allow_list(tmp_path):
    keys = curve_keys(tmp_path / "keys")
    allowed = keys / "allowed"
    cfg = CurveServerConfig(keys / "server.key_secret", allowed)
    with DeviceServer(Gain(), LOOPBACK_ANY, curve=cfg) as server:
        trusted = DeviceClient(server.endpoint, timeout_s=5,
                               curve=ClientCurve(keys / "trusted.key_secret", keys / "server.key"))
        stranger = DeviceClient(server.endpoint, timeout_s=0.5, retries=0,
                                curve=ClientCurve(keys / "stranger.key_secret", keys / "server.key"))
        plain = DeviceClient(server.endpoint, timeout_s=0.5, retries=0)
        try:
            assert trusted.health()["server"]["curve"] is True
            for client in (stranger, plain):
                with pytest.raises(DeviceError, match="no reply"):
                    client.forward(np.zeros((1, 4)))
            np.testing.assert_array_equal(trusted.forward(np.full((1, 4), 0.5)), 0.5)
            assert trusted.health()["server"]["requests"] == 3  # nothing from the refused clients got through
        finally:
            for c in (trusted, stranger, plain):
                c.close()
    with pytest.raises(FileNotFoundError, match="secret key"):
        CurveServerConfig(keys / "missing.key_secret", allowed)


def test_serves_a_visa_device_from_the_bench():
    from pnn_cluster.drivers.visa import VisaDevice
    from pnn_cluster.servers.scpi_bench import SimBench

    ref = make_device("shg", imperfections=IDEAL)
    with SimBench("shg", port=0, imperfections=IDEAL) as bench:
        with DeviceServer(VisaDevice.from_config(bench.visa_config()), LOOPBACK_ANY) as server:
            with ZmqDevice(server.endpoint) as dev:
                x = np.random.default_rng(2).uniform(0, 1, (8, ref.spec.input.size))
                np.testing.assert_allclose(dev.forward(x), ref.forward(x), rtol=0, atol=1e-12)
                assert dev.identity()["remote"]["source"]["driver"] == "pulse_shaper"


def test_cli_serve_device_until_sigint():
    cmd = [sys.executable, "-m", "pnn_cluster.cli", "serve-device", "--system", "shg",
           "--bind", "tcp://127.0.0.1:0", "--ideal"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()  # blocks until the server is bound
        assert line.startswith("serving simulated shg (shg) on tcp://127.0.0.1:"), line
        endpoint = line.split(" on ", 1)[1].split(" ", 1)[0]
        with DeviceClient(endpoint, timeout_s=10) as client:
            assert client.health()["name"] == "shg"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGINT: shutting down" in err and "stopped after 1 requests (0 rejected)" in out


def test_wire_format_is_plain_json_and_raw_bytes():
    # what a client in another language would send, built by hand
    with DeviceServer(Gain(), LOOPBACK_ANY) as server:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REQ)  # a REQ socket works too: it adds and strips the empty frame
        sock.linger = 0
        sock.connect(server.endpoint)
        header = {"v": 1, "op": "forward", "id": "a1",
                  "arrays": [{"field": "x", "dtype": "<f4", "shape": [1, 4]}]}
        sock.send_multipart([json.dumps(header).encode(), np.array([[0.5, -0.5, 0.25, 0.0]], "<f4").tobytes()])
        assert sock.poll(5000)
        reply = sock.recv_multipart()
        h = json.loads(reply[0])
        assert h == {"v": 1, "id": "a1", "ok": True, "arrays": [{"field": "y", "dtype": "<f8", "shape": [1, 4]}]}
        np.testing.assert_array_equal(np.frombuffer(reply[1], "<f8"), [0.5, -0.5, 0.25, 0.0])
        sock.close()
        ctx.term()

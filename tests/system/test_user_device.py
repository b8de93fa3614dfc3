"""A user's own Device class, named by import path, served over ZeroMQ: in process, and by ``pnn-cluster
serve-device --device`` in a subprocess.

The class is the README's "Bring your own device" amplifier, in ``tests/lab_devices.py``: in process it
imports from ``tests/`` on ``sys.path`` (the rootdir conftest); the subprocess gets it on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import TESTS, command_args

from pnn_cluster.commands import serve_device
from pnn_cluster.devices import DeviceError, LimitError
from pnn_cluster.drivers.zmq_client import DeviceClient, ZmqDevice
from pnn_cluster.servers.zmq_server import DeviceServer


def test_a_users_device_served_over_zeromq_is_learnt_by_a_client_on_connect_and_measures():
    args = command_args(serve_device, "--device", "lab_devices:TanhAmp", "--bind", "tcp://127.0.0.1:0")
    device, what = serve_device.served_device(args)
    assert what == "lab_devices:TanhAmp" and not device.connected
    with DeviceServer(device, args.bind) as server:
        dev = ZmqDevice(server.endpoint)
        with pytest.raises(DeviceError, match="spec is learnt on connect"):
            dev.spec  # noqa: B018 - nothing asked of the server yet
        with dev:
            assert dev.spec == device.spec and dev.spec.name == "tanh_amp"
            np.testing.assert_array_equal(dev.params["gain"], [1.0] * 4)  # the server's current parameters
            x = np.random.default_rng(0).uniform(0, 1, (16, 4))
            gain = np.array([0.5, 1.0, 2.0, 3.0])
            y = dev.forward(x, {"gain": gain})
            np.testing.assert_allclose(y, np.tanh(1.05 * gain * x), atol=0.06)  # noise 0.01 rms
            np.testing.assert_array_equal(device.params["gain"], gain)  # written on the served device
            assert dev.identity()["remote"]["driver"] == "lab_devices.TanhAmp"

            with pytest.raises(LimitError) as ei:  # refused by the client, against the learnt spec
                dev.set_params({"gain": [1.0, 3.5, 1.0, 1.0]})
            assert ei.value.field == "params.gain[1]" and "[0, 3] V/V" in str(ei.value)
            with DeviceClient(server.endpoint) as raw, pytest.raises(LimitError) as ei:  # and by the server
                raw.set_params({"gain": [1.0, 1.0, -0.5, 1.0]})
            assert ei.value.field == "params.gain[2]" and ei.value.device == "tanh_amp"
            np.testing.assert_array_equal(device.params["gain"], gain)  # nothing was written
    assert server.stats["rejected_limit"] == 1


def test_cli_serve_device_serves_a_users_class_until_sigint():
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pnn_cluster.cli", "serve-device", "--device", "lab_devices:SizedTanhAmp",
           "--option", "size=3", "--option", "noise=0", "--option", "gain_max=2", "--bind", "tcp://127.0.0.1:0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        try:
            banner = lines.get(timeout=120)  # the server is bound once it prints this
        except queue.Empty:
            pytest.fail("serve-device printed nothing within 120 s")
        assert banner.startswith("serving lab_devices:SizedTanhAmp (tanh_amp) on tcp://127.0.0.1:"), banner
        endpoint = banner.split(" on ", 1)[1].split(" ", 1)[0]
        with ZmqDevice(endpoint, timeout_s=10) as dev:
            assert dev.spec.input.size == 3 and dev.spec.param("gain").high == 2.0
            x = np.full((2, 3), 0.5)
            np.testing.assert_allclose(dev.forward(x, {"gain": [2.0, 1.0, 0.0]}), np.tanh(1.05 * np.array(
                [[1.0, 0.5, 0.0]] * 2)), rtol=0, atol=1e-12)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)  # stdout is drained by the reader thread; stderr holds a few lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert "SIGINT: shutting down" in err

"""A user's own Device class, named by import path: loaded, constructed, and served over ZeroMQ.

The class is the README's "Bring your own device" amplifier, in ``tests/lab_devices.py``, a module
as a lab would write it. pytest puts ``tests/`` on ``sys.path`` (the rootdir conftest, prepend import
mode), so ``lab_devices:TanhAmp`` imports in process; the subprocess test passes it on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pnn_cluster.commands import serve_device
from pnn_cluster.devices import DeviceError, LimitError, UserDeviceError, load_device_class, make_user_device
from pnn_cluster.drivers.zmq_client import DeviceClient, ZmqDevice
from pnn_cluster.servers.zmq_server import DeviceServer

TESTS = Path(__file__).resolve().parent


def serve_device_args(*argv: str) -> argparse.Namespace:
    """``pnn-cluster serve-device ARGV`` parsed by that command's own parser."""
    parser = argparse.ArgumentParser(prog="pnn-cluster")
    serve_device.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve-device", *argv])


# -- loading and constructing -----------------------------------------------------------------------


def test_load_device_class_imports_the_class_the_path_names():
    import lab_devices

    assert load_device_class("lab_devices:TanhAmp") is lab_devices.TanhAmp


def test_make_user_device_passes_options_as_keyword_arguments_and_does_no_io():
    dev = make_user_device("lab_devices:SizedTanhAmp", {"size": 3, "noise": 0.0})
    assert dev.spec.input.size == 3 and dev.noise == 0.0
    assert not dev.connected and dev.stats["calls"] == 0
    assert make_user_device("lab_devices:TanhAmp", {}).spec.name == "tanh_amp"


@pytest.mark.parametrize("path, words", [
    ("lab_devices.TanhAmp", ["not an import path of the form module:ClassName", "allowed: 'package.module:ClassName'"]),
    ("lab_devices:", ["not an import path"]),
    ("lab devices:TanhAmp", ["not an import path"]),
    ("no_such_lab_module:Amp", ["module 'no_such_lab_module' not found on this machine", "PYTHONPATH",
                                "allowed: 'package.module:ClassName'"]),
    ("lab_devices:TanhAmpp", ["lab_devices has no attribute 'TanhAmpp'",
                              "allowed: one of the Device classes there: SizedTanhAmp, TanhAmp"]),
    ("lab_devices:TanhAmp.Inner", ["lab_devices:TanhAmp has no attribute 'Inner'"]),
    ("lab_devices:TanhAmpModel", ["is class TanhAmpModel, not a subclass of pnn_cluster.devices.Device",
                                  "allowed: a class derived from pnn_cluster.devices.Device"]),
    ("lab_devices:np", ["is a module, not a subclass of pnn_cluster.devices.Device"]),
    ("pnn_cluster.devices:Device", ["is the Device base class itself"]),
])
def test_load_device_class_errors_name_the_path_the_problem_and_what_is_allowed(path, words):
    with pytest.raises(UserDeviceError) as ei:
        load_device_class(path)
    msg = str(ei.value)
    assert msg.startswith(f"device class {path!r}: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_a_module_that_fails_to_import_is_reported_with_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "lab_missing_dep.py").write_text("import no_such_dependency_of_the_lab\n")
    (tmp_path / "lab_broken.py").write_text("raise RuntimeError('licence server\\nunreachable')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserDeviceError, match="importing module 'lab_missing_dep' failed: No module named "
                                              "'no_such_dependency_of_the_lab'; allowed: a module whose own"):
        load_device_class("lab_missing_dep:Amp")
    with pytest.raises(UserDeviceError) as ei:
        load_device_class("lab_broken:Amp")
    assert "importing module 'lab_broken' failed: RuntimeError: licence server unreachable" in str(ei.value)
    assert "\n" not in str(ei.value)


def test_options_the_constructor_does_not_take_are_refused_with_its_signature():
    with pytest.raises(UserDeviceError) as ei:
        make_user_device("lab_devices:SizedTanhAmp", {"sise": 3})
    msg = str(ei.value)
    assert "the constructor refuses the options {'sise': 3}: got an unexpected keyword argument 'sise'" in msg
    signature = "SizedTanhAmp(size: int = 4, noise: float = 0.01, gain_max: float = 3.0, seed: int | None = None)"
    assert f"allowed: keyword arguments of {signature}" in msg


def test_options_the_constructor_raises_on_are_reported_with_its_signature():
    with pytest.raises(UserDeviceError) as ei:
        make_user_device("lab_devices:SizedTanhAmp", {"size": 0})
    msg = str(ei.value)
    assert "constructing with options {'size': 0} failed: ValueError: Port.size must be a positive integer" in msg
    signature = "SizedTanhAmp(size: int = 4, noise: float = 0.01, gain_max: float = 3.0, seed: int | None = None)"
    assert f"allowed: values {signature} accepts" in msg


def test_options_must_be_a_mapping_of_names():
    with pytest.raises(UserDeviceError, match="options must be a mapping"):
        make_user_device("lab_devices:TanhAmp", [("size", 3)])  # type: ignore[arg-type]


# -- serve-device --device ------------------------------------------------------------------------------


def test_option_values_are_yaml_scalars():
    opts = serve_device.parse_options(["size=3", "noise=0.5", "tiny=1e-3", "on=true", "label=amp A", "none=null",
                                       "word=yes please"])
    assert opts == {"size": 3, "noise": 0.5, "tiny": 0.001, "on": True, "label": "amp A", "none": None,
                    "word": "yes please"}
    assert type(opts["size"]) is int and type(opts["noise"]) is float


@pytest.mark.parametrize("item, words", [
    ("size", ["expected KEY=VALUE"]),
    ("2x=1", ["expected KEY=VALUE with KEY an identifier"]),
    ("sizes=[1, 2]", ["list value", "allowed: a YAML scalar"]),
    ("cfg={a: 1}", ["dict value", "allowed: a YAML scalar"]),
])
def test_option_values_that_are_not_scalars_are_usage_errors(item, words):
    from pnn_cluster.cli import UsageError

    with pytest.raises(UsageError) as ei:
        serve_device.parse_options([item])
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_system_and_device_are_mutually_exclusive_and_one_is_required(capsys):
    for argv in (["--system", "shg", "--device", "lab_devices:TanhAmp"], []):
        with pytest.raises(SystemExit) as ei:
            serve_device_args(*argv)
        assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with argument" in err
    assert "one of the arguments --system --visa-config --device is required" in err


def test_simulation_flags_with_a_user_device_are_usage_errors():
    from pnn_cluster.cli import UsageError

    with pytest.raises(UsageError, match="--ideal applies to a simulated --system only"):
        serve_device.served_device(serve_device_args("--device", "lab_devices:TanhAmp", "--ideal"))
    with pytest.raises(UsageError, match="--device: device class 'lab_devices:TanhAmp': the constructor refuses"):
        serve_device.served_device(serve_device_args("--device", "lab_devices:TanhAmp", "--option", "size=3"))


def test_a_users_device_served_over_zeromq_is_learnt_by_a_client_on_connect_and_measures():
    args = serve_device_args("--device", "lab_devices:TanhAmp", "--bind", "tcp://127.0.0.1:0")
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

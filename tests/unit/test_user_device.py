"""A user's own Device class, named by import path: loaded, constructed, and its serve-device arguments checked.

The class is the README's "Bring your own device" amplifier, in ``tests/lab_devices.py``, a module
as a lab would write it. pytest puts ``tests/`` on ``sys.path`` (the rootdir conftest, prepend import
mode), so ``lab_devices:TanhAmp`` imports in process. Served over ZeroMQ: ``tests/system/test_user_device.py``.
"""

from __future__ import annotations

import pytest
from helpers import command_args

from pnn_cluster.commands import serve_device
from pnn_cluster.devices import UserDeviceError, load_device_class, make_user_device

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
            command_args(serve_device, *argv)
        assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with argument" in err
    assert "one of the arguments --system --visa-config --device is required" in err


def test_simulation_flags_with_a_user_device_are_usage_errors():
    from pnn_cluster.cli import UsageError

    with pytest.raises(UsageError, match="--ideal applies to a simulated --system only"):
        serve_device.served_device(command_args(serve_device, "--device", "lab_devices:TanhAmp", "--ideal"))
    with pytest.raises(UsageError, match="--device: device class 'lab_devices:TanhAmp': the constructor refuses"):
        serve_device.served_device(command_args(serve_device, "--device", "lab_devices:TanhAmp", "--option", "size=3"))



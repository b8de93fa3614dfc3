import math

import numpy as np
import pytest

from pnn_cluster.devices import Device, DeviceSpec, LimitError, ParamSpec, Port


class Amp(Device):
    spec = DeviceSpec(
        name="amp",
        input=Port(size=3, low=0.0, high=1.0, unit="V"),
        output=Port(size=3, unit="V"),
        params=(ParamSpec("gain", shape=(3,), low=0.0, high=2.0, unit="V/V", init=1.0),),
    )

    def measure(self, x, params):
        return np.tanh(params["gain"] * x)


def test_forward_uses_validated_params():
    d = Amp()
    y = d.forward(np.full((2, 3), 0.5), {"gain": [1.0, 2.0, 0.0]})
    np.testing.assert_allclose(y[0], np.tanh([0.5, 1.0, 0.0]))
    assert d.stats["calls"] == 1 and d.stats["samples"] == 2 and d.stats["param_writes"] == 1


@pytest.mark.parametrize(
    "x, field, words",
    [
        (np.zeros((2, 4)), "input", ["wrong shape", "(2, 4)", "(batch, 3)"]),
        (np.zeros(3), "input", ["wrong shape", "(batch, 3)"]),
        (np.array([[0.1, math.nan, 0.2]]), "input[0,1]", ["non-finite", "nan"]),
        (np.array([[0.1, 0.2, math.inf]]), "input[0,2]", ["non-finite", "inf"]),
        (np.array([[0.1, 0.2, 1.5]]), "input[0,2]", ["out of range", "1.5 V", "[0, 1] V"]),
        (np.array([[-0.1, 0.2, 0.3]]), "input[0,0]", ["out of range", "-0.1 V"]),
        (np.array([["a", "b", "c"]]), "input", ["wrong dtype"]),
    ],
)
def test_bad_inputs_are_refused_with_field_value_and_limit(x, field, words):
    d = Amp()
    with pytest.raises(LimitError) as err:
        d.forward(x)
    msg = str(err.value)
    assert err.value.field == field
    assert msg.startswith("amp: " + field)
    for w in words:
        assert w in msg, msg
    assert d.stats["calls"] == 0 and d.stats["rejected"] == 1


@pytest.mark.parametrize(
    "params, field, words",
    [
        ({"gain": [1.0, 1.0]}, "params.gain", ["wrong shape", "(2,)", "(3,)"]),
        ({"gain": [1.0, 2.5, 1.0]}, "params.gain[1]", ["out of range", "2.5 V/V", "[0, 2] V/V"]),
        ({"gain": [1.0, math.nan, 1.0]}, "params.gain[1]", ["non-finite"]),
        ({"gain": [1.0, 1.0, -math.inf]}, "params.gain[2]", ["non-finite"]),
        ({"offset": [0.0]}, "params.offset", ["unknown parameter", "gain"]),
    ],
)
def test_bad_params_are_refused_and_nothing_is_written(params, field, words):
    d = Amp()
    before = d.params
    with pytest.raises(LimitError) as err:
        d.set_params(params)
    assert err.value.field == field
    for w in words:
        assert w in str(err.value), str(err.value)
    np.testing.assert_array_equal(d.params["gain"], before["gain"])


def test_measure_returning_wrong_shape_is_a_device_error():
    class Broken(Amp):
        def measure(self, x, params):
            return x[:, :2]

    from pnn_cluster.devices import DeviceError

    with pytest.raises(DeviceError, match=r"shape \(4, 2\)"):
        Broken().forward(np.zeros((4, 3)))


def test_spec_round_trips_through_dict():
    spec = Amp.spec
    assert DeviceSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"name": "bad name", "shape": (1,), "low": 0, "high": 1}, "identifier"),
        ({"name": "g", "shape": (1,), "low": 1, "high": 0}, "low < high"),
        ({"name": "g", "shape": (1,), "low": 0, "high": math.inf}, "finite"),
        ({"name": "g", "shape": (1,), "low": 0, "high": 1, "init": 2}, "init 2"),
    ],
)
def test_param_spec_rejects_bad_declarations(kw, match):
    with pytest.raises(ValueError, match=match):
        ParamSpec(**kw)


def test_device_without_spec_is_a_type_error():
    class NoSpec(Device):
        pass

    with pytest.raises(TypeError, match="DeviceSpec"):
        NoSpec()

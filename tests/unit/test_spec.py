import json
import math

import numpy as np
import pytest

from pnn_cluster.devices import Device, DeviceError, DeviceSpec, LimitError, ParamSpec, Port


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


# -- init="uniform": symmetry broken at the start, seeded ------------------------------------------------

RING = ParamSpec("detuning", shape=(4, 8), low=-0.5, high=1.5, unit="GHz", init="uniform")


def test_uniform_init_draws_every_element_within_the_limits_reproducibly():
    theta = RING.initial()
    assert theta.shape == (4, 8) and theta.dtype == np.float64
    assert ((theta >= -0.5) & (theta <= 1.5)).all()
    assert len(np.unique(theta)) == theta.size  # symmetry broken: no two elements alike
    np.testing.assert_array_equal(theta, RING.initial())  # seeded by default
    np.testing.assert_array_equal(RING.initial(np.random.default_rng(0)), theta)
    assert not np.array_equal(RING.initial(np.random.default_rng(1)), theta)


def test_scalar_and_default_inits_are_unchanged_by_a_generator():
    rng = np.random.default_rng(5)
    np.testing.assert_array_equal(ParamSpec("g", (3,), 0.0, 2.0, init=0.5).initial(rng), [0.5] * 3)
    np.testing.assert_array_equal(ParamSpec("g", (3,), 0.0, 2.0).initial(rng), [1.0] * 3)


def test_initial_params_pass_one_generator_on_so_two_uniform_parameters_differ():
    spec = DeviceSpec("bank", Port(8), Port(8), (RING, ParamSpec("coupling", (4, 8), -0.5, 1.5, init="uniform"),
                                                  ParamSpec("bias", (2,), 0.0, 1.0)))
    p = spec.initial_params()
    assert not np.array_equal(p["detuning"], p["coupling"])
    np.testing.assert_array_equal(p["detuning"], RING.initial())
    np.testing.assert_array_equal(p["bias"], [0.5, 0.5])
    again = spec.initial_params()
    assert all(np.array_equal(p[k], again[k]) for k in p)
    other = spec.initial_params(np.random.default_rng(7))
    assert not np.array_equal(other["detuning"], p["detuning"])


def test_a_device_with_a_uniform_parameter_starts_from_the_seeded_draw():
    class Bank(Device):
        spec = DeviceSpec("bank", Port(8, 0.0, 1.0), Port(8), (ParamSpec("phase", (8,), 0.0, 1.0, init="uniform"),))

        def measure(self, x, params):
            return x * params["phase"]

    np.testing.assert_array_equal(Bank().params["phase"], Bank.spec.params[0].initial())


def test_uniform_init_round_trips_through_the_wire_format():
    spec = DeviceSpec("bank", Port(8), Port(8), (RING, ParamSpec("gain", (2,), 0.0, 2.0, init=1)))
    back = DeviceSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and back.params[0].init == "uniform" and back.params[1].init == 1.0
    np.testing.assert_array_equal(back.initial_params()["detuning"], spec.initial_params()["detuning"])


@pytest.mark.parametrize("init, problem", [
    ("gaussian", "is not a number or 'uniform'"),
    ("Uniform", "is not a number or 'uniform'"),
    (True, "is not a number or 'uniform'"),
    ([0.5, 0.5], "is not a number or 'uniform'"),
    (math.nan, "outside [0.0, 1.0]"),
    (-0.1, "outside [0.0, 1.0]"),
])
def test_a_bad_init_is_refused_naming_the_param_the_value_and_what_is_allowed(init, problem):
    with pytest.raises(ValueError) as ei:
        ParamSpec("phase", (2,), 0.0, 1.0, init=init)
    msg = str(ei.value)
    assert msg.startswith(f"ParamSpec phase: init {init!r} ") and problem in msg, msg
    assert "allowed: a number in [0.0, 1.0], None (the middle of the range) or 'uniform'" in msg, msg


def test_device_without_spec_is_a_type_error():
    class NoSpec(Device):
        pass

    with pytest.raises(TypeError, match="DeviceSpec"):
        NoSpec()


# -- devices that learn their spec on connect ---------------------------------------------------------


class Learner(Device):
    """Stands for a device whose spec lives at the other end of its connection."""

    spec_on_connect = True

    def __init__(self, spec=None):
        self.opened = 0
        super().__init__(spec)

    def open(self):
        self.opened += 1
        self.learn_spec(Amp.spec, {"gain": [0.5, 1.0, 1.5]})

    def measure(self, x, params):
        return np.tanh(params["gain"] * x)


def test_a_device_that_learns_its_spec_says_so_until_connect_then_has_spec_and_reported_params():
    d = Learner()
    assert not d.spec_known and d.opened == 0  # the constructor did no I/O
    for read in (lambda: d.spec, lambda: d.params, lambda: d.set_params({"gain": [1, 1, 1]})):
        with pytest.raises(DeviceError, match=r"Learner\(spec learnt on connect\): .*learnt .*on connect\(\)"):
            read()
    d.connect()
    assert d.spec == Amp.spec and d.spec_known
    np.testing.assert_array_equal(d.params["gain"], [0.5, 1.0, 1.5])


def test_forward_on_a_device_that_learns_its_spec_connects_first():
    d = Learner()
    np.testing.assert_allclose(d.forward(np.full((1, 3), 0.5)), np.tanh([[0.25, 0.5, 0.75]]))
    assert d.connected and d.opened == 1


def test_a_given_spec_must_match_the_one_the_device_reports():
    other = DeviceSpec("amp", Port(3, 0.0, 2.0), Port(3), Amp.spec.params)
    d = Learner(spec=other)
    assert d.spec is other  # known from the start
    with pytest.raises(DeviceError, match="differs from the one given"):
        d.connect()
    assert not d.connected


def test_open_that_does_not_learn_the_spec_is_a_device_error():
    class Forgetful(Learner):
        def open(self):
            pass

    with pytest.raises(DeviceError, match="did not learn the spec"):
        Forgetful().connect()

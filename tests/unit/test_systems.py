"""The simulated physical systems: PAT against autograd, limits, determinism, latency, drift, sim-reality gap."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
import torch

from pnn_cluster.devices import SYSTEMS, Imperfections, LimitError, make_device
from pnn_cluster.layers import PhysicalLayer, Rescale, Stack

ALL = sorted(SYSTEMS)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2) / np.var(b))


def random_input(device, batch: int, rng: np.random.Generator) -> np.ndarray:
    port = device.spec.input
    return rng.uniform(port.low, port.high, (batch, port.size))


def random_params(device, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {p.name: rng.uniform(p.low, p.high, p.shape) for p in device.spec.params}


def run_model(model, x: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    dtype = torch.get_default_dtype()
    with torch.no_grad():
        y = model(torch.as_tensor(x, dtype=dtype), {k: torch.as_tensor(v, dtype=dtype) for k, v in params.items()})
    return y.double().numpy()


def test_systems_registered():
    assert {"shg", "plate", "circuit", "oscillators"} <= set(SYSTEMS)
    for name in ALL:
        assert make_device(name).spec.name == name


# -- PAT equals autograd ---------------------------------------------------------------------------------


@pytest.mark.parametrize("system", ALL)
def test_pat_gradient_equals_autograd(system):
    rng = np.random.default_rng(1)
    with default_dtype(torch.float64):
        device = make_device(system, imperfections=Imperfections.ideal())
        layer = PhysicalLayer(device, twin=device.model(), mode="pat")
        with torch.no_grad():
            for name, value in random_params(device, rng).items():
                layer.theta[name].copy_(torch.from_numpy(value))
        x = torch.from_numpy(random_input(device, 6, rng)).requires_grad_(True)
        w = torch.from_numpy(rng.standard_normal((6, device.spec.output.size)))

        y = layer(x)
        (y * w).sum().backward()

        model = device.model()
        x_ref = x.detach().clone().requires_grad_(True)
        p_ref = {k: v.detach().clone().requires_grad_(True) for k, v in layer.theta.items()}
        y_ref = model(x_ref, p_ref)
        (y_ref * w).sum().backward()

    torch.testing.assert_close(y, y_ref.detach())
    torch.testing.assert_close(x.grad, x_ref.grad)
    for name in layer.theta:
        torch.testing.assert_close(layer.theta[name].grad, p_ref[name].grad, msg=lambda m, n=name: f"{n}: {m}")
    assert x.grad.abs().max() > 1e-3


def test_stack_pat_gradients_equal_autograd_through_models():
    rng = np.random.default_rng(2)
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        names = ["shg", "circuit", "plate", "oscillators"]
        devices = [make_device(n, imperfections=Imperfections.ideal()) for n in names]
        modules: list[torch.nn.Module] = []
        for i, device in enumerate(devices):
            if i:
                modules.append(Rescale.for_device(device, weight=2.0, bias=0.1))
            layer = PhysicalLayer(device, twin=device.model(), mode="pat")
            with torch.no_grad():
                for name, value in random_params(device, rng).items():
                    layer.theta[name].copy_(torch.from_numpy(value))
            modules.append(layer)
        stack = Stack(*modules)
        with torch.no_grad():  # digital layers away from their initial values, so every weight matters
            for m in stack:
                if isinstance(m, Rescale):
                    m.weight.mul_(1 + 0.3 * torch.randn_like(m.weight))
                    m.bias.add_(0.3 * torch.randn_like(m.bias))
        x = torch.from_numpy(random_input(devices[0], 5, rng)).requires_grad_(True)
        w = torch.from_numpy(rng.standard_normal((5, devices[-1].spec.output.size)))

        (stack(x) * w).sum().backward()
        trainable = [(n, p) for n, p in stack.named_parameters() if p.requires_grad]  # twins stay frozen
        pat_grads = {n: p.grad.clone() for n, p in trainable}
        pat_gx = x.grad.clone()

        # the same network with each device replaced by its model, differentiated by torch
        stack.zero_grad()
        x.grad = None
        models = {id(m): m.device.model() for m in stack.physical_layers()}
        h = x
        for m in stack:
            h = models[id(m)](h, dict(m.theta.items())) if isinstance(m, PhysicalLayer) else m(h)
        (h * w).sum().backward()

    assert len(pat_grads) == sum(len(d.spec.params) for d in devices) + 2 * (len(devices) - 1)
    for n, p in trainable:
        torch.testing.assert_close(pat_grads[n], p.grad, msg=lambda m, n=n: f"{n}: {m}")
        assert p.grad.abs().max() > 0, n
    torch.testing.assert_close(pat_gx, x.grad)


# -- a useful neural layer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("system", ALL)
def test_output_depends_nonlinearly_on_inputs_and_params(system):
    rng = np.random.default_rng(3)
    device = make_device(system)
    model = device.model()
    x = random_input(device, 200, rng)
    ys = [run_model(model, x, random_params(device, rng)) for _ in range(3)]
    # different parameters: clearly different functions
    assert nmse(ys[1], ys[0]) > 0.1 and nmse(ys[2], ys[0]) > 0.1
    # not an affine map of the input
    design = np.c_[x, np.ones(len(x))]
    coef, *_ = np.linalg.lstsq(design, ys[0], rcond=None)
    assert nmse(design @ coef, ys[0]) > 0.02
    # gradients with respect to input and parameters are not negligible
    dtype = torch.get_default_dtype()
    xt = torch.as_tensor(x[:16], dtype=dtype).requires_grad_(True)
    pt = {k: torch.as_tensor(v, dtype=dtype).requires_grad_(True) for k, v in random_params(device, rng).items()}
    y = model(xt, pt)
    y.pow(2).sum().backward()
    scale = y.detach().pow(2).mean().sqrt()
    assert xt.grad.abs().mean() > 1e-2 * scale
    for name, p in pt.items():
        assert p.grad.abs().mean() > 1e-2 * scale, name


@pytest.mark.parametrize("system", ALL)
def test_large_batches_agree_with_small_ones(system):
    # large batches take other code paths (transcendentals applied in single-threaded blocks)
    rng = np.random.default_rng(7)
    device = make_device(system)
    model = device.model()
    x = random_input(device, 3000, rng)
    params = random_params(device, rng)
    np.testing.assert_allclose(run_model(model, x, params)[-5:], run_model(model, x[-5:], params),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("system", ALL)
def test_output_bounded_at_extremes(system):
    device = make_device(system, imperfections=Imperfections.ideal())
    port = device.spec.input
    n = port.size
    alternating = np.where(np.arange(n) % 2 == 0, port.low, port.high)
    x = np.stack([np.full(n, port.low), np.full(n, port.high), alternating, alternating[::-1]])
    for corner in ("low", "high", "alternating"):
        params = {}
        for p in device.spec.params:
            if corner == "alternating":
                params[p.name] = np.where(np.arange(p.numel) % 2 == 0, p.low, p.high).reshape(p.shape)
            else:
                params[p.name] = np.full(p.shape, getattr(p, corner))
        y = device.forward(x, params)
        assert np.isfinite(y).all()
        assert np.abs(y).max() < 5.0, (corner, np.abs(y).max())


@pytest.mark.parametrize("system", ALL)
def test_calibration_gradients_exist_for_the_twin_fit(system):
    rng = np.random.default_rng(4)
    device = make_device(system)
    model = device.model().learn_calibration()
    dtype = torch.get_default_dtype()
    x = torch.as_tensor(random_input(device, 16, rng), dtype=dtype)
    p = {k: torch.as_tensor(v, dtype=dtype) for k, v in random_params(device, rng).items()}
    model(x, p).pow(2).sum().backward()
    for name, c in model.calibration.items():
        assert torch.isfinite(c.grad).all(), name
        assert c.grad.abs().max() > 0, name


# -- imperfections ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("system", ALL)
def test_sim_reality_gap_is_a_few_percent_above_the_noise_floor(system):
    rng = np.random.default_rng(5)
    base = make_device(system).imperfections
    calibration_only = make_device(system, imperfections=base.with_(unmodelled=0.0))
    realistic = make_device(system)  # unmodelled physics on, by default
    x = random_input(realistic, 256, rng)
    params = random_params(realistic, rng)
    gaps, truth = {}, {}
    for name, device in (("calibration", calibration_only), ("realistic", realistic)):
        y = device.forward(x, params)
        y2 = device.forward(x, params)
        floor = nmse(y, y2) / 2
        gaps[name] = nmse(run_model(device.model(), x, params), y)
        truth[name] = run_model(device.true_model(), x, params)
        assert 0 < floor < 0.01
        assert gaps[name] > 3 * floor
    assert 0.005 < gaps["calibration"] < 0.10
    # what the model leaves out is a gap of its own, well above the noise (same miscalibration in both)
    assert nmse(truth["realistic"], truth["calibration"]) > 3 * floor


@pytest.mark.parametrize("system", ALL)
def test_unmodelled_physics_is_on_in_the_device_and_absent_from_its_model(system):
    device = make_device(system)
    effects = type(device).unmodelled_effects
    assert effects and set(effects) == set(type(device.model()).UNMODELLED)
    assert device.true_model().unmodelled == pytest.approx(effects)
    assert device.model().unmodelled == {}  # the lab's model: what a physics twin starts from
    assert device.identity()["unmodelled"] == pytest.approx(effects)
    # --ideal and unmodelled: 0 turn it off; each effect alone changes what the device does
    assert make_device(system, imperfections=Imperfections.ideal()).true_model().unmodelled == \
        dict.fromkeys(effects, 0.0)
    rng = np.random.default_rng(0)
    x = torch.as_tensor(random_input(device, 32, rng), dtype=torch.get_default_dtype())
    params = {k: torch.as_tensor(v, dtype=x.dtype) for k, v in random_params(device, rng).items()}
    plain = device.model()
    with torch.no_grad():
        for name, value in effects.items():
            moved = plain.with_unmodelled({name: value})(x, params) - plain(x, params)
            assert moved.abs().max() > 1e-4, name


def test_unknown_unmodelled_effect_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="pixel_crosstalk"):
        make_device("shg").model().with_unmodelled({"crosstalk": 0.1})


@pytest.mark.parametrize("system", ALL)
def test_models_take_one_parameter_setting_per_sample(system):
    device = make_device(system)
    model = device.true_model()
    assert model.batched_params
    rng = np.random.default_rng(1)
    x = torch.as_tensor(random_input(device, 4, rng), dtype=torch.get_default_dtype())
    settings = [{k: torch.as_tensor(v, dtype=x.dtype) for k, v in random_params(device, rng).items()}
                for _ in range(4)]
    with torch.no_grad():
        one_by_one = torch.cat([model(x[i:i + 1], settings[i]) for i in range(4)])
        batched = model(x, {k: torch.stack([s[k] for s in settings]) for k in settings[0]})
    torch.testing.assert_close(batched, one_by_one)


@pytest.mark.parametrize("system", ALL)
def test_measurements_are_deterministic_under_a_seed(system):
    rng = np.random.default_rng(6)
    x = random_input(make_device(system), 8, rng)
    ys = {}
    for label, seed in (("a", 3), ("b", 3), ("c", 4)):
        device = make_device(system, imperfections=make_device(system).imperfections.with_(seed=seed, drift=1.0))
        ys[label] = [device.forward(x) for _ in range(3)]
    for ya, yb in zip(ys["a"], ys["b"]):
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(ys["a"][0], ys["a"][1])  # noise differs from call to call
    assert not np.array_equal(ys["a"][0], ys["c"][0])


@pytest.mark.parametrize("system", ALL)
def test_latency_is_spent_per_call(system):
    device = make_device(system, imperfections=Imperfections.ideal().with_(latency_call_s=0.02))
    x = np.full((1, device.spec.input.size), 0.5 * (device.spec.input.low + device.spec.input.high))
    for _ in range(2):
        t0 = time.perf_counter()
        device.forward(x)
        assert time.perf_counter() - t0 >= 0.02


@pytest.mark.parametrize("system", ALL)
def test_drift_moves_the_true_calibration_only_when_on(system):
    x = np.full((500, make_device(system).spec.input.size), 0.5)
    for drift in (0.0, 1.0):
        device = make_device(system, imperfections=Imperfections(drift=drift, seed=1))
        before = device.true_model().calibration_values()
        for _ in range(4):
            device.forward(x)
        after = device.true_model().calibration_values()
        moved = [k for k in before if not np.array_equal(before[k], after[k])]
        if drift:
            assert sorted(moved) == sorted(device.calibration_spread())
        else:
            assert moved == []


# -- limits ---------------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v:.6g}"


@pytest.mark.parametrize("system", ALL)
def test_bad_inputs_and_params_are_refused_naming_field_and_limit(system):
    device = make_device(system, imperfections=Imperfections.ideal())
    port = device.spec.input
    n = port.size
    good = np.full((3, n), 0.5 * (port.low + port.high))
    limits = f"[{_fmt(port.low)}, {_fmt(port.high)}]"

    def refused(x, params=None) -> str:
        with pytest.raises(LimitError) as info:
            device.forward(x, params)
        return str(info.value)

    msg = refused(np.zeros((3, n + 1)))
    assert "input" in msg and "wrong shape" in msg and f"(batch, {n})" in msg and f"(3, {n + 1})" in msg
    msg = refused(np.zeros(n))
    assert "input" in msg and "wrong shape" in msg
    for bad in (np.nan, np.inf, -np.inf):
        x = good.copy()
        x[1, 2] = bad
        msg = refused(x)
        assert "input[1,2]" in msg and "non-finite" in msg and "finite numbers" in msg
    x = good.copy()
    x[2, 0] = port.high + 0.5
    msg = refused(x)
    assert "input[2,0]" in msg and "out of range" in msg and limits in msg and _fmt(port.high + 0.5) in msg

    for p in device.spec.params:
        wrong = tuple(s + 1 for s in p.shape)
        msg = refused(good, {p.name: np.zeros(wrong)})
        assert f"params.{p.name}" in msg and "wrong shape" in msg and str(p.shape) in msg
        value = np.full(p.shape, 0.5 * (p.low + p.high))
        value.reshape(-1)[1] = p.low - 0.25
        msg = refused(good, {p.name: value})
        assert f"params.{p.name}[1]" in msg and "out of range" in msg
        assert f"[{_fmt(p.low)}, {_fmt(p.high)}]" in msg and _fmt(p.low - 0.25) in msg
        value.reshape(-1)[1] = np.nan
        assert "non-finite" in refused(good, {p.name: value})
    assert device.stats["calls"] == 0  # nothing refused ever reached the device
    assert device.forward(good).shape == (3, device.spec.output.size)


def test_a_noise_stream_per_purpose_gives_two_copies_the_same_noise_whatever_each_measured_before():
    import numpy as np

    from pnn_cluster.devices import Imperfections, make_device

    imp = Imperfections(noise=0.05, shot=0.05, gap=1.0, drift=0.0, latency_call_s=0.0, latency_sample_s=0.0, seed=7)
    a, b = (make_device("shg", imperfections=imp, n_in=6, n_out=6) for _ in range(2))
    x = np.random.default_rng(0).uniform(size=(16, 6))
    a.forward(x)  # a spent samples on a calibration, b did not
    a.noise_stream("training")
    b.noise_stream("training")
    ya, yb = a.forward(x), b.forward(x)
    np.testing.assert_array_equal(ya, yb)
    b.noise_stream("check")  # another purpose: another stream
    assert not np.array_equal(a.forward(x), b.forward(x))
    b.noise_stream("training")  # taken up again: b's training stream continues where it stopped, as a's did
    b.forward(x)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))

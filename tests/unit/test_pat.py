"""PAT against torch autograd, and the reference code's power-law toy."""

import numpy as np
import pytest
import torch

from pnn_cluster.devices import Device, DeviceSpec, ParamSpec, PhysicsModel, Port
from pnn_cluster.layers import PhysicalLayer, Rescale, Stack
from pnn_cluster.pat import pat_apply


class PowerLaw(PhysicsModel):
    """f(x) = a * x^1.1 (times a trainable gain)."""

    def __init__(self, a: float):
        super().__init__()
        self.add_calibration("a", a)

    def forward(self, x, params):
        return self.cal("a") * params["gain"] * x.clamp_min(0) ** 1.1


class PowerLawDevice(Device):
    spec = DeviceSpec("power", Port(1, 0.0, 1e12), Port(1), (ParamSpec("gain", (1,), 0.5, 2.0, init=1.0),))

    def __init__(self, a=2.0):
        super().__init__()
        self.truth = PowerLaw(a).double()

    def measure(self, x, params):
        with torch.no_grad():
            return self.truth(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in params.items()}).numpy()


def _chain_grad(n, x0, mode):
    """d(output)/d(x0) through n layers of the device (true value, PAT, or in silico)."""
    # "true": autograd through the device's own function (a twin that is exact)
    a_twin, layer_mode = (2.0, "in_silico") if mode == "true" else (2.01, mode)
    layers = [PhysicalLayer(PowerLawDevice(2.0), twin=PowerLaw(a_twin).double(), mode=layer_mode)
              for _ in range(n)]
    for layer in layers:
        layer.theta["gain"].data = layer.theta["gain"].data.double()
    x = torch.tensor([[x0]], dtype=torch.float64, requires_grad=True)
    h = x
    for layer in layers:
        h = layer(h)
    (g,) = torch.autograd.grad(h.sum(), x)
    return float(g)


def test_power_law_toy_pat_error_grows_far_slower_than_in_silico():
    """The reference code's toy: device 2 x^1.1, twin 2.01 x^1.1, applied n times."""
    errs = {"pat": [], "in_silico": []}
    ns = [1, 5, 10, 15, 20]
    for n in ns:
        true = _chain_grad(n, 0.05, "true")
        for mode in errs:
            errs[mode].append(abs(_chain_grad(n, 0.05, mode) - true) / abs(true))
    pat, sil = np.array(errs["pat"]), np.array(errs["in_silico"])
    # PAT: only the local derivatives are off (0.5 % each), so its error grows about linearly in n
    np.testing.assert_allclose(pat, 1.005 ** np.array(ns) - 1, rtol=0.05)
    # in silico: the forward error compounds through every layer as well, and the growth accelerates
    assert np.all(np.diff(sil) > 0)
    assert sil[-1] > 3 * pat[-1]
    assert (sil[-1] - sil[-2]) > 5 * (pat[-1] - pat[-2])


def test_pat_apply_equals_autograd_with_exact_twin(float64):
    model = PowerLaw(2.0)
    x = torch.rand(5, 1) + 0.1
    g = torch.tensor([1.3])
    x1, g1 = x.clone().requires_grad_(), g.clone().requires_grad_()
    y_ref = model(x1, {"gain": g1})
    w = torch.randn_like(y_ref)
    ref = torch.autograd.grad((y_ref * w).sum(), [x1, g1])
    x2, g2 = x.clone().requires_grad_(), g.clone().requires_grad_()
    y = pat_apply(x2, y_ref.detach(), {"gain": g2}, twin=model)
    got = torch.autograd.grad((y * w).sum(), [x2, g2])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_pat_forward_passes_the_measurement_not_the_twin(float64):
    layer = PhysicalLayer(PowerLawDevice(2.0), twin=PowerLaw(3.0), mode="pat")
    x = torch.full((2, 1), 0.5, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, 2.0 * 0.5**1.1 * torch.ones(2, 1))


def test_params_are_written_once_until_they_change(float64):
    dev = PowerLawDevice()
    layer = PhysicalLayer(dev, twin=PowerLaw(2.0))
    x = torch.full((3, 1), 0.5)
    with torch.no_grad():
        for _ in range(4):
            layer(x)
    assert dev.stats["param_writes"] == 1 and dev.stats["calls"] == 4
    with torch.no_grad():
        layer.theta["gain"].add_(0.1)
    layer(x)
    assert dev.stats["param_writes"] == 2


def test_constrain_projects_and_counts_and_penalty_grows_near_limits(float64):
    layer = PhysicalLayer(PowerLawDevice(), twin=PowerLaw(2.0), penalty=10.0)
    assert float(layer.limit_penalty().detach()) == 0.0
    with torch.no_grad():
        layer.theta["gain"].fill_(2.5)
    assert float(layer.limit_penalty().detach()) > 0
    assert layer.constrain_() == 1
    assert float(layer.theta["gain"]) == 2.0
    assert layer.constrain_() == 0


def test_out_of_range_layer_input_never_reaches_the_device(float64):
    from pnn_cluster.devices import LimitError

    dev = PowerLawDevice()
    layer = PhysicalLayer(dev, twin=PowerLaw(2.0))
    with pytest.raises(LimitError, match="input"):
        layer(torch.tensor([[-1.0]]))
    assert dev.stats["calls"] == 0


def test_oracle_needs_a_simulated_device(float64):
    layer = PhysicalLayer(PowerLawDevice(), twin=PowerLaw(2.0), mode="oracle")
    with pytest.raises(TypeError, match="simulated device"):
        layer(torch.full((1, 1), 0.5, requires_grad=True))


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        PhysicalLayer(PowerLawDevice(), mode="fast")


def test_rescale_stays_inside_the_device_range():
    r = Rescale(4, 0.0, 1.0, weight=50.0)
    y = r(torch.linspace(-100, 100, 400).reshape(100, 4))
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert isinstance(Stack(r), torch.nn.Sequential)

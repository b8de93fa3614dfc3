"""gradient_agreement: PAT's gradient against the oracle's, on one batch of the same measurements."""

import pytest
import torch

from pnn_cluster.devices import Imperfections, make_device
from pnn_cluster.gradients import gradient_agreement
from pnn_cluster.layers import PhysicalLayer, Rescale, Stack

N = 6


def _stack(gap: float, twin: bool = True, mode: str = "pat") -> Stack:
    imp = Imperfections(noise=0.01, shot=0.0, gap=gap, drift=0.0, unmodelled=0.0,
                        latency_call_s=0.0, latency_sample_s=0.0, seed=1)
    device = make_device("shg", imperfections=imp, n_in=N, n_out=N)
    torch.manual_seed(0)
    layer = PhysicalLayer(device, twin=device.model() if twin else None, mode=mode, name="shg-1")
    with torch.no_grad():
        layer.theta["phase"].uniform_(-1.0, 1.0)  # off the flat start, where some gradients vanish
    return Stack(torch.nn.Linear(4, N), Rescale.for_device(device), layer, torch.nn.Linear(N, 3))


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_an_exact_twin_gives_the_oracle_gradient(float64):
    stack = _stack(gap=0.0)
    out = gradient_agreement(stack, *_batch())
    assert out["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert out["layers"]["shg-1"] == pytest.approx(1.0, abs=1e-6)
    assert out["relative_error"] < 1e-6


def test_a_miscalibrated_device_bends_the_pat_gradient_away_from_the_oracle(float64):
    stack = _stack(gap=3.0)
    out = gradient_agreement(stack, *_batch())
    assert -1.0 < out["cosine"] < 1.0 - 1e-6
    assert -1.0 < out["layers"]["shg-1"] < 1.0 - 1e-6
    assert out["relative_error"] > 1e-3


def test_each_physical_layer_is_measured_once_and_modes_and_grads_are_left_alone(float64):
    stack = _stack(gap=3.0, mode="in_silico")
    layer = stack.physical_layers()[0]
    x, target = _batch()
    torch.nn.functional.cross_entropy(stack(x), target).backward()  # .grad set by an earlier step
    grads = {n: p.grad.clone() for n, p in stack.named_parameters() if p.requires_grad}
    calls, samples = layer.device.stats["calls"], layer.samples_measured
    out = gradient_agreement(stack, x, target)
    assert layer.device.stats["calls"] - calls == 1
    assert layer.samples_measured - samples == out["samples"] == len(x)
    assert layer.mode == "in_silico"
    assert "measure" not in vars(layer) and "oracle_model" not in vars(layer)
    for n, p in stack.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, grads[n]), n


def test_a_layer_without_a_twin_is_refused_by_name_before_anything_is_measured(float64):
    stack = _stack(gap=0.0, twin=False)
    calls = stack.physical_layers()[0].device.stats["calls"]
    with pytest.raises(ValueError, match="shg-1.*twin"):
        gradient_agreement(stack, *_batch())
    assert stack.physical_layers()[0].device.stats["calls"] == calls


def test_real_hardware_without_an_exact_model_is_refused_by_name(float64):
    stack = _stack(gap=0.0)
    layer = stack.physical_layers()[0]
    layer.device.true_model = None  # what a driver for real hardware looks like to the layer
    with pytest.raises(TypeError, match="shg-1.*true_model"):
        gradient_agreement(stack, *_batch())

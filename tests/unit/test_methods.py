"""Training methods as objects: what each asks of devices and twins, and the controls' stand-ins."""

from __future__ import annotations

import pytest
import torch

from pnn_cluster.config import METHODS as CONFIG_METHODS
from pnn_cluster.devices import make_device
from pnn_cluster.layers import MODES, DigitalStandIn, FixedMap
from pnn_cluster.runner.methods import METHODS, method_for


def test_every_configured_method_is_an_object_and_every_object_is_configurable():
    assert tuple(METHODS) == tuple(CONFIG_METHODS)
    for name, method in METHODS.items():
        assert method.name == name
        assert method.digital == (method.mode is None)
        assert method.mode is None or method.mode in MODES


def test_what_each_method_needs_of_twins():
    pat, in_silico, oracle = method_for("pat"), method_for("in_silico"), method_for("oracle")
    assert pat.needs_twin(0) and pat.needs_twin(3) and pat.twin_copies and pat.watches_twins
    assert in_silico.needs_twin(0) and not in_silico.needs_twin(1) and not in_silico.twin_copies
    assert in_silico.init_mode == "in_silico" and pat.init_mode == "pat" == oracle.init_mode
    assert not oracle.needs_twin(0) and not oracle.twin_only_evaluation and pat.twin_only_evaluation
    for name in ("ablation", "digital"):
        assert method_for(name).digital and not method_for(name).needs_twin(0)


def test_the_controls_stand_in_for_a_device_with_its_shape():
    spec = make_device("shg", n_in=6, n_out=6).spec
    fixed = method_for("ablation").stand_in(spec, name="optics", seed=1)
    digital = method_for("digital").stand_in(spec, name="optics", seed=1)
    assert isinstance(fixed, FixedMap) and isinstance(digital, DigitalStandIn)
    x = torch.rand(5, 6)
    assert fixed(x).shape == digital(x).shape == (5, 6)
    n_settings = sum(p.numel() for p in (torch.zeros(p.shape) for p in spec.params))
    assert sum(p.numel() for p in digital.parameters() if p.requires_grad) >= n_settings
    with pytest.raises(TypeError, match="keeps its physical layers"):
        method_for("pat").stand_in(spec, name="optics", seed=1)
    with pytest.raises(ValueError, match="not one of pat, in_silico"):
        method_for("pta")

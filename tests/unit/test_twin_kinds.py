"""Twin kinds: what each can represent, and the guarantees a fit gives whatever the device."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pnn_cluster.config import TwinConfig
from pnn_cluster.devices import Device, make_device
from pnn_cluster.devices.physics import PhysicsModel
from pnn_cluster.devices.spec import DeviceSpec, ParamSpec, Port
from pnn_cluster.runner.twins import candidate_kinds, make_twin
from pnn_cluster.twins import TWIN_KINDS, build_twin, collect, evaluate_twin, fit_twin, nmse
from pnn_cluster.twins.fit import fit_splits
from pnn_cluster.twins.models import kinds_for

N = 8


class BankModel(PhysicsModel):
    """The user's physics of a bank of tunable elements: ``gain * tanh(slope * w * x)``, two global constants."""

    batched_params = True

    def __init__(self) -> None:
        super().__init__()
        self.add_calibration("gain", 1.0)
        self.add_calibration("slope", 1.0)

    def forward(self, x, params):
        return self.cal("gain") * torch.tanh(self.cal("slope") * params["w"] * x)


class Bank(Device):
    """A bank of elements that does much its model leaves out: each output also feels the other elements'
    settings through a rough, setting-dependent term no few settings pin down."""

    spec = DeviceSpec("bank", Port(N, 0.0, 1.0), Port(N), (ParamSpec("w", (N,), -1.0, 1.0, init=0.0),))

    def __init__(self, seed: int = 0, rough: float = 0.6) -> None:
        super().__init__()
        self.rng, self.rough = np.random.default_rng(seed), rough
        self.mix = np.random.default_rng(99).standard_normal((N, N)) * 3.0

    def measure(self, x, params):
        w = params["w"]
        rough = self.rough * np.sin(self.mix @ w)  # a function of the setting alone, of all elements at once
        return 1.6 * np.tanh(1.8 * w * x) + rough * x + 0.02 * self.rng.standard_normal(x.shape)

    def model(self):
        return BankModel()


@pytest.fixture(scope="module")
def bank_splits():
    dev = Bank()
    samples = collect(dev, groups=40, batch=16, repeats=2, seed=1, progress=False)
    return dev, fit_splits(samples, 0.25, seed=1)


def _mean_nmse(train, val) -> float:
    """NMSE on ``val`` of predicting the mean output of ``train``, channel by channel."""
    mean = np.concatenate([y.reshape(-1, y.shape[-1]) for y in train.y]).mean(0)
    ys = np.concatenate([y.reshape(-1, y.shape[-1]) for y in val.y])
    return nmse(np.tile(mean, (len(ys), 1)), ys)


def test_a_residual_twin_is_never_worse_than_the_physics_it_wraps_even_when_the_model_leaves_much_out(bank_splits):
    dev, (fit_on, stop, val) = bank_splits
    physics = fit_twin(build_twin("physics", dev.spec, dev.model()), fit_on, val, stop=stop, progress=False)
    residual = fit_twin(build_twin("residual", dev.spec, dev.model()), fit_on, val, stop=stop, progress=False)
    assert physics.nmse_val < 0.5  # the constants are learned: far better than the nominal model...
    assert physics.nmse_val > 20 * physics.noise_floor  # ...but the model leaves much out
    assert residual.nmse_stop <= physics.nmse_stop * (1 + 1e-6)  # the same up to rounding, or better
    assert residual.nmse_val <= 1.05 * physics.nmse_val


def test_an_mlp_twin_is_never_worse_than_predicting_the_mean():
    # the rough term dominates: what 18 settings of 8 elements show of it does not carry to others
    dev = Bank(rough=6.0)
    fit_on, stop, val = fit_splits(collect(dev, groups=24, batch=32, repeats=2, seed=1, progress=False), 0.25, seed=1)
    twin = build_twin("mlp", dev.spec)
    res = fit_twin(twin, fit_on, val, stop=stop, progress=False)
    assert res.nmse_val <= 1.02 * _mean_nmse(fit_on, val)
    # and the state kept is the one reported on the stopping samples
    assert evaluate_twin(twin, stop) == pytest.approx(res.nmse_stop, rel=1e-6)


def test_an_unfitted_mlp_twin_predicts_the_mean_output(bank_splits):
    dev, (fit_on, _, _) = bank_splits
    twin = build_twin("mlp", dev.spec, members=3)
    twin.set_output_stats(torch.as_tensor(np.concatenate([y.reshape(-1, N) for y in fit_on.y])))
    x = torch.rand(5, N)
    out = twin(x, {"w": torch.rand(N) * 2 - 1})
    torch.testing.assert_close(out, twin.y_mean.expand(5, N))


def test_an_ensemble_mlp_twin_saves_and_loads_its_members(bank_splits, tmp_path):
    from pnn_cluster.twins import load_twin, save_twin

    dev, (fit_on, stop, val) = bank_splits
    twin = build_twin("mlp", dev.spec, hidden=(16,), members=2)
    fit_twin(twin, fit_on, val, stop=stop, epochs=3, progress=False)
    loaded = load_twin(save_twin(twin, tmp_path / "bank"), spec=dev.spec)
    assert loaded.members == 2
    x, p = torch.rand(3, N), {"w": torch.rand(N)}
    torch.testing.assert_close(loaded(x, p), twin(x, p))


def test_the_plate_structure_contains_the_coil_lag_and_the_mode_coupling_the_plate_model_leaves_out():
    dev = make_device("plate", n_in=4, n_out=4)
    twin = build_twin("structured", dev.spec, dev.model())
    x, p = torch.rand(6, 4), {"drive": torch.rand(4) * 2 - 1}
    with torch.no_grad():
        torch.testing.assert_close(twin(x, p), dev.model()(x, p))  # unfitted: the physics model itself
        truth = dev.true_model()
        twin.model.load_state_dict(truth.state_dict())
        assert not torch.allclose(twin(x, p), truth(x, p), atol=1e-3)  # the physics alone misses them
        effects = truth.unmodelled
        twin.structure.actuator_keep.fill_(math.exp(-truth.dt / effects["coil_time_constant_ms"]))
        twin.structure.cross_stiffness.fill_(effects["mode_coupling"])
        torch.testing.assert_close(twin(x, p), truth(x, p), atol=1e-5, rtol=1e-4)
    assert twin.structure.time_constants_ms(twin.model)["actuator"] == pytest.approx(
        effects["coil_time_constant_ms"], rel=1e-4)


def test_a_structured_twin_is_refused_for_a_device_without_a_structure_naming_the_kinds_it_allows():
    dev = make_device("shg", n_in=4, n_out=4)
    with pytest.raises(ValueError, match=r"twin kind 'structured' .* SHGModel\. Allowed for it: mlp, physics, "
                                         r"residual"):
        build_twin("structured", dev.spec, dev.model())
    assert kinds_for(dev.model()) == ["mlp", "physics", "residual"]
    assert kinds_for(make_device("plate", n_in=4, n_out=4).model()) == list(TWIN_KINDS)
    assert kinds_for(None) == ["mlp"]


def test_kind_best_fits_every_kind_the_device_allows_and_logs_each_candidate():
    dev = make_device("plate", n_in=4, n_out=4)
    ref = SimpleNamespace(device=dev, label="plate", collect=lambda **kw: collect(dev, **kw))
    tc = TwinConfig(kind="best", groups=12, batch=8, epochs=1)
    assert candidate_kinds(tc, ref) == ["mlp", "physics", "residual", "structured"]
    fit = make_twin(ref, tc, None, None, seed=0)
    assert set(fit.candidates) == {"mlp", "physics", "residual", "structured"}
    scores = {k: c["nmse_stop"] for k, c in fit.candidates.items()}
    assert fit.kind == min(scores, key=scores.get) and fit.twin.kind == fit.kind
    # the physics-based candidates start from the fitted physics twin: none ends worse on the stopping samples
    assert scores["residual"] <= scores["physics"] and scores["structured"] <= scores["physics"]


def test_an_mlp_twin_saved_before_ensembles_and_its_linear_map_existed_loads_as_one_network(bank_splits, tmp_path):
    from pnn_cluster.twins import load_twin, save_twin

    dev, (fit_on, stop, val) = bank_splits
    twin = build_twin("mlp", dev.spec, hidden=(16,), members=1)
    fit_twin(twin, fit_on, val, stop=stop, epochs=3, progress=False)
    with torch.no_grad():
        twin.linear.weight.zero_()
        twin.linear.bias.zero_()
    # what such a twin's file held: one network's weights, a config naming only the widths
    path = save_twin(twin, tmp_path / "old")
    payload = torch.load(path, weights_only=True)
    payload["state"] = {k: v for k, v in payload["state"].items() if not k.startswith("linear.")}
    payload["meta"]["config"] = {"hidden": [16]}
    torch.save(payload, path)
    again = load_twin(path, spec=dev.spec)
    assert again.members == 1 and torch.count_nonzero(again.linear.weight) == 0
    x, p = torch.rand(3, N), {"w": torch.rand(N)}
    torch.testing.assert_close(again(x, p), twin(x, p))

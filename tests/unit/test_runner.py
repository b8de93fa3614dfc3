"""The runner, in this process: a stop keeps the step reached, and a resume continues exactly there."""

from __future__ import annotations

import signal

import pytest
import torch
from helpers import tiny_config
from lab_devices import SizedTanhAmp

from pnn_cluster.config import parse_config
from pnn_cluster.devices import DeviceError
from pnn_cluster.runner import ExperimentRun, build_stack, device_recipes, load_data
from pnn_cluster.runner.launch import InProcessLauncher
from pnn_cluster.runner.placement import InProcessPlacement
from pnn_cluster.runner.run import RunResult
from pnn_cluster.training.trainer import Callback

STEPS_PER_EPOCH = 3  # 110 training digits (10 of the 120 are the validation split) in batches of 40

TINY = tiny_config(dataset={"train_subset": 120, "test_subset": 60},
                   # noise-free, so an interrupted and resumed run must end exactly where an uninterrupted one does
                   imperfections={"ideal": True}, twin={"kind": "physics", "groups": 4, "batch": 24, "epochs": 3},
                   optimizer={"lr": 0.05}, schedule={"epochs": 3, "batch_size": 40, "eval_batch": 60},
                   tracking={"experiment": "tests", "residual_batch": 0, "log_models": False})


class At(Callback):
    """Does ``action`` once, at the end of optimizer step ``step``."""

    def __init__(self, step: int, action) -> None:
        self.step, self.action = step, action

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.global_step == self.step:
            self.action()


def _params(result) -> dict[str, torch.Tensor]:
    return {k: v for k, v in result.checkpoint["model"].items() if "twin" not in k}


@pytest.fixture(scope="module")
def uninterrupted():
    """TINY run from start to end without a stop: what a stopped and resumed run must end with."""
    return ExperimentRun(parse_config(TINY, source="tiny.yaml"), keep_checkpoint=True, echo=False).run()


@pytest.mark.parametrize("how", ["stop()", "SIGINT"])
def test_a_stopped_run_keeps_its_step_and_resumes_exactly_where_it_stopped(how, monkeypatch, mlflow_store,
                                                                           uninterrupted):
    from mlflow import MlflowClient

    import pnn_cluster.runner.run as run_module

    cfg = parse_config(TINY, source="tiny.yaml")
    uri = mlflow_store
    whole = uninterrupted

    run = ExperimentRun(cfg, tracking={"tracking_uri": uri}, keep_checkpoint=True, echo=False)
    stop = run.stop if how == "stop()" else (lambda: signal.raise_signal(signal.SIGINT))
    made = run_module.ProgressReport
    # mid-epoch 2: step 4 of 3 x 3
    monkeypatch.setattr(run_module, "ProgressReport", lambda report: _Both(made(report), At(4, stop)))
    if how == "SIGINT":  # the launcher turns the first Ctrl-C into a stop after the current step
        stopped = InProcessLauncher().run(cfg, tracking={"tracking_uri": uri}, keep_checkpoint=True)
    else:
        stopped = run.run()
    # the progress report back (not monkeypatch.undo(): that would also undo conftest's move to tmp_path, and
    # the resumed run would keep its record in the repository's working directory)
    monkeypatch.setattr(run_module, "ProgressReport", made)
    assert stopped.state == "stopped" and stopped.steps == 4 and stopped.test_acc is None
    client = MlflowClient(uri)
    record = client.get_run(stopped.run_id)
    assert record.info.status == "KILLED"
    assert record.data.tags["pnn.checkpoint_step"] == "4"

    resumed = ExperimentRun(cfg, tracking={"tracking_uri": uri, "run_id": stopped.run_id},
                            resume=stopped.checkpoint, keep_checkpoint=True, echo=False).run()
    assert resumed.state == "finished" and resumed.steps == whole.steps == 3 * STEPS_PER_EPOCH
    assert resumed.device_samples == whole.device_samples
    for name, value in _params(whole).items():
        torch.testing.assert_close(_params(resumed)[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert client.get_run(stopped.run_id).info.status == "FINISHED"


class _Both(Callback):
    def __init__(self, *callbacks) -> None:
        self.callbacks = callbacks

    def on_step_end(self, trainer, metrics) -> None:
        for cb in self.callbacks:
            cb.on_step_end(trainer, metrics)

    def on_epoch_end(self, trainer, metrics) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(trainer, metrics)


def test_a_users_device_class_with_options_trains_through_a_configuration():
    """``driver: {kind: python, class: ..., options: ...}``: the class is imported and built by its owner."""
    raw = dict(TINY, devices={"amp": {"driver": {"kind": "python", "class": "lab_devices:SizedTanhAmp",
                                                 "options": {"size": 8}},
                                      "twin": {"kind": "physics", "groups": 4, "batch": 24, "epochs": 3}}},
               stack=[{"kind": "linear", "size": 8}, {"kind": "rescale"}, {"kind": "physical", "device": "amp"},
                      {"kind": "linear", "size": 10}], schedule={"epochs": 1, "batch_size": 40})
    result = ExperimentRun(parse_config(raw, source="amp.yaml"), echo=False).run()
    assert result.steps == STEPS_PER_EPOCH and result.twins["amp"]["nmse_val"] > 0


class DyingAmp(SizedTanhAmp):
    """Built by name from a configuration: an amplifier that stops answering after ``calls`` measurements."""

    def __init__(self, calls: int):
        super().__init__(size=8)
        self.left = calls

    def measure(self, x, params):
        self.left -= 1
        if self.left < 0:
            raise DeviceError("amp: output stage not responding")
        return super().measure(x, params)


def test_no_device_left_stops_with_one_clear_error_and_the_last_complete_step_saved(tmp_path):
    from pnn_cluster.training.faults import TrainingAborted

    # the twin's check (3 groups x 2 repeats) and initialisation take 7 calls, a step 1: it dies in step 3
    raw = dict(TINY, devices={"amp": {"driver": {"kind": "python", "class": f"{__name__}:DyingAmp",
                                                 "options": {"calls": 7 + 2}},
                                      "twin": {"kind": "ideal", "groups": 3, "batch": 24}}},
               stack=[{"kind": "linear", "size": 8}, {"kind": "rescale"}, {"kind": "physical", "device": "amp"},
                      {"kind": "linear", "size": 10}])
    path = tmp_path / "stopped.pt"
    run = ExperimentRun(parse_config(raw, source="dying.yaml"), echo=False, checkpoint_path=str(path))
    with pytest.warns(Warning, match="amp failed 3 times in a row and leaves the pool"), \
            pytest.raises(TrainingAborted) as info:
        run.run()
    assert str(info.value) == ("training stopped: stage amp: no replica left to measure on (amp: DeviceError: amp: "
                               f"output stage not responding); checkpoint of step 2 saved to {path}")
    assert info.value.checkpoint == path
    state = torch.load(path, weights_only=True)
    assert state["global_step"] == 2 and state["experiment"]["name"] == "tiny"  # `evaluate PATH` can rebuild it
    torch.testing.assert_close(state["model"]["2.theta.gain"], run.trainer.model[2].theta["gain"].detach())


# -- what a physical result is measured against ---------------------------------------------------------

SHG_TINY = tiny_config(name="shg-tiny", system="shg", outputs=4, device="optics",
                       dataset={"train_subset": 120, "test_subset": 60},
                       imperfections={"latency_call_s": 0, "latency_sample_s": 0},
                       twin={"kind": "best", "groups": 40, "batch": 16, "epochs": 6},
                       schedule={"epochs": 1, "batch_size": 40, "eval_batch": 60}, tracking={"enabled": False})


def test_the_digital_ablation_trains_the_same_digital_layers_with_fixed_maps_for_the_physical_ones():
    from pnn_cluster.layers import FixedMap, PhysicalLayer

    cfg = parse_config({**SHG_TINY, "method": "ablation"})
    pat = parse_config(SHG_TINY)
    ablation = ExperimentRun(cfg, echo=False)
    result = ablation.run()
    assert result.test_acc is not None and result.device_samples_total == 0  # no device measured anything
    stand_in = ablation.trainer.model[2]
    assert isinstance(stand_in, FixedMap) and stand_in.weight.shape == (4, 8)  # widths differ: a random map
    assert not any(isinstance(m, PhysicalLayer) for m in ablation.trainer.model)
    assert not stand_in.weight.requires_grad and "weight" not in dict(ablation.trainer.model.named_parameters())
    # the same trainable digital parameters as the physical stack's, shape for shape
    devices = {name: recipe.build() for name, (recipe,) in device_recipes(pat).items()}
    pat_stack = build_stack(pat, devices, load_data(pat).n_features)
    digital = {k: v.shape for k, v in pat_stack.named_parameters() if not k.startswith("2.")}
    assert {k: v.shape for k, v in ablation.trainer.model.named_parameters()} == digital
    # a random orthogonal map, not the identity: the ablation keeps the channel mixing a device gives
    square, wide = FixedMap(6, 6, seed=1).weight, FixedMap(8, 4, seed=1).weight
    assert torch.allclose(square @ square.T, torch.eye(6), atol=1e-5)
    assert torch.allclose(wide @ wide.T, torch.eye(4), atol=1e-5)  # orthonormal rows when it narrows
    assert not torch.allclose(square, torch.eye(6))
    assert torch.equal(FixedMap(6, 6, seed=2).weight, FixedMap(6, 6, seed=2).weight)


def test_the_digital_network_replaces_each_device_by_a_trainable_mlp_with_at_least_its_parameter_count():
    from pnn_cluster.layers import DigitalStandIn, PhysicalLayer

    run = ExperimentRun(parse_config({**SHG_TINY, "method": "digital"}), echo=False)
    result = run.run()
    assert result.test_acc is not None and result.device_samples_total == 0
    model = run.trainer.model
    stand_in = model[2]
    assert isinstance(stand_in, DigitalStandIn) and not any(isinstance(m, PhysicalLayer) for m in model)
    n_settings = stand_in.n_params
    count = stand_in.parameter_count()
    assert count >= n_settings and all(p.requires_grad for p in stand_in.parameters())
    # the smallest hidden width that reaches the device's count: one less would not
    smaller = (stand_in.hidden - 1) * (stand_in.n_in + stand_in.n_out + 1) + stand_in.n_out
    assert stand_in.hidden == 1 or smaller < n_settings


def test_twin_kind_best_fits_every_kind_chooses_on_held_out_settings_and_a_checkpoint_rebuilds_it():
    run = ExperimentRun(parse_config(SHG_TINY), echo=False, keep_checkpoint=True)
    result = run.run()
    fit = result.twins["optics"]
    assert set(fit["candidates"]) == {"physics", "residual", "mlp"}
    scores = {k: c["nmse_stop"] for k, c in fit["candidates"].items()}
    assert fit["kind"] == min(scores, key=scores.get)
    assert run.trainer.model[2].twin.kind == fit["kind"]
    assert result.checkpoint["extra"]["twins"]["kinds"] == {"optics": fit["kind"]}
    # evaluating the checkpoint rebuilds a twin of the kind chosen, and its state loads into it
    again = ExperimentRun(parse_config(SHG_TINY), resume=result.checkpoint, echo=False).evaluate("test")
    assert again["acc"] == pytest.approx(result.test_acc, abs=0.1) and again["twin_acc"] is not None


def test_logistic_baseline_chooses_its_regularisation_on_validation_and_needs_that_split():
    from pnn_cluster.baselines import LOGISTIC_CS, logistic_baseline
    from pnn_cluster.data import load_dataset

    data = load_dataset("digits")
    with pytest.raises(ValueError, match="validation"):
        logistic_baseline(data)
    res = logistic_baseline(data.with_validation(0.1, seed=0))
    assert res["test_acc"] > 0.9 and 0 < res["val_acc"] <= 1 and res["C"] in LOGISTIC_CS


def test_keep_best_tests_the_weights_of_the_epoch_with_the_best_validation_accuracy():
    cfg = parse_config({**TINY, "schedule": {**TINY["schedule"], "epochs": 4, "keep": "best"},
                        "tracking": {"enabled": False}})
    import copy

    class Weights(Callback):
        def __init__(self):
            self.by_epoch = []

        def on_epoch_end(self, trainer, metrics):
            self.by_epoch.append((metrics["val_acc"], copy.deepcopy(trainer.model.state_dict())))

    seen = Weights()
    run = ExperimentRun(cfg, echo=False, callbacks=[seen])
    result = run.run()
    vals = [acc for acc, _ in seen.by_epoch]
    assert result.val_acc == max(vals) and len(vals) == 4
    chosen = seen.by_epoch[vals.index(max(vals))][1]  # the first epoch that reached it
    final = run.trainer.model.state_dict()
    assert all(torch.equal(final[k], chosen[k]) for k in chosen)


def test_keep_best_without_a_validation_split_is_refused_naming_the_field():
    from pnn_cluster.config import ConfigError

    with pytest.raises(ConfigError, match="schedule.keep"):
        parse_config({**TINY, "schedule": {**TINY["schedule"], "keep": "best"},
                      "dataset": {**TINY["dataset"], "val_fraction": 0.0}})


class _WaitedPlacement(InProcessPlacement):
    """In process, as a Ray placement reports a device that waited for an instrument another run held."""

    def counts(self):
        return {**super().counts(), "instrument_waits": {"circuit": 12.5}}


def test_what_a_run_waited_for_its_instruments_is_in_its_result_and_in_mlflow(mlflow_store):
    cfg = parse_config(dict(TINY, schedule={**TINY["schedule"], "epochs": 1}), source="tiny.yaml")
    result = ExperimentRun(cfg, placement=_WaitedPlacement(), tracking={"tracking_uri": mlflow_store},
                           echo=False).run()
    assert result.state == "finished" and result.instrument_waits == {"circuit": 12.5}
    assert result.summary()["instrument_waits"] == {"circuit": 12.5}
    from mlflow import MlflowClient

    assert MlflowClient(mlflow_store).get_run(result.run_id).data.metrics["instrument_wait_s/circuit"] == 12.5
    assert RunResult("c", "pat", "finished", 0.5, 1, 1, 0, 0, 0, 1.0).instrument_waits == {}  # none: nothing

"""MLflow tracking: `pnn-cluster train` on a small configuration, read back through MlflowClient, resumed.

Whole trainings in this process against a SQLite store, and a tracking server that does not answer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import free_port, tiny_config

from pnn_cluster.cli import main

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

STEPS_PER_EPOCH = 3  # 110 training digits (10 of the 120 are the validation split) in batches of 40

TINY = tiny_config(dataset={"train_subset": 120, "test_subset": 60},
                   imperfections={"latency_call_s": 0, "latency_sample_s": 0},
                   twin={"kind": "physics", "groups": 5, "batch": 24, "epochs": 4}, optimizer={"lr": 0.05},
                   schedule={"epochs": 2, "batch_size": 40, "eval_batch": 60},
                   tracking={"experiment": "tests", "residual_batch": 32})


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_template):
    """One MLflow store for the module (a copy of the session's empty one: creating tables costs seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    shutil.copyfile(mlflow_template, root / "mlflow.db")
    return root, f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def resumed_run(store):
    """A training interrupted during its second epoch, then resumed: (uri, run id, resume start in ms)."""
    import time

    from pnn_cluster.training.trainer import Trainer

    root, uri = store
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    evaluate = Trainer.evaluate
    calls = []

    def interrupt_second_epoch(self, split="test", *args, **kwargs):
        calls.append(split)
        if len(calls) == 2:  # the end of epoch 2: Ctrl-C, a preempted job, a crash
            raise KeyboardInterrupt
        return evaluate(self, split, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(Trainer, "evaluate", interrupt_second_epoch)
        assert main(["train", str(config), "--tracking-uri", uri, "--no-progress", "--in-process"]) == 130
        assert calls == ["val", "val"]  # epochs end on the validation split; the test split is not measured
        mp.setattr(Trainer, "evaluate", evaluate)
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                    filter_string="tags.`pnn.command` = 'train'")
        assert run.info.status == "KILLED"
        assert run.data.tags["pnn.checkpoint_step"] == str(STEPS_PER_EPOCH)
        resumed_at = int(time.time() * 1000)
        assert main(["train", "--resume", run.info.run_id, "--tracking-uri", uri, "--no-progress", "--in-process"]) == 0
    return uri, run.info.run_id, resumed_at


def test_run_records_config_devices_twins_metrics_and_models(resumed_run):
    uri, run_id, _ = resumed_run
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"

    # the full resolved configuration, defaults included, as parameters
    p = run.data.params
    assert p["schedule.epochs"] == "2" and p["devices.circuit.driver.system"] == "circuit"
    assert p["devices.circuit.twin.repeats"] == "2" and p["optimizer.name"] == "adam"  # defaults resolved
    assert p["stack.2.device"] == "circuit"

    # a snapshot of every device: artifact and tags
    t = run.data.tags
    assert t["device.circuit.driver"] == "simulated" and t["device.circuit.io"] == "8 -> 8"
    assert "drive(8,) in [-1, 1] V" in t["device.circuit.params"]
    snap = json.loads(Path(client.download_artifacts(run_id, "devices.json")).read_text())["circuit"]
    assert snap["spec"]["params"][0]["low"] == -1.0 and snap["driver"]["system"] == "circuit"
    assert snap["identity"]["simulated"] is True and "constants" in snap["calibration"]
    assert snap["calibration"]["fit"]["nmse_val"] > 0

    artifacts = {f.path for d in ("", "checkpoints", "config", "plots", "operating")
                 for f in client.list_artifacts(run_id, d)}
    assert {"devices.json", "checkpoints/last.pt", "config/config.yaml", "plots/training_curve.png",
            "plots/confusion_matrix.png", "operating/region.npz"} <= artifacts
    # where training ran the device (its second half): what `calibrate --operating` judges twins on
    from pnn_cluster.twins.operating import OperatingRegion

    region = OperatingRegion.load(client.download_artifacts(run_id, "operating/region.npz"))
    layer = region.layers["circuit"]
    assert layer.x.shape[-1] == 8 and set(layer.params) == {"drive"} and len(layer.steps) > 0
    assert min(layer.steps) >= STEPS_PER_EPOCH  # the second half of a two-epoch run

    # each twin fit is a nested run with its figures and a parity plot
    (fit,) = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    assert fit.data.tags["pnn.device"] == "circuit" and fit.data.tags["pnn.twin"] == "physics"
    assert 0 < fit.data.metrics["nmse_val"] < 0.05 and fit.data.metrics["noise_floor"] > 0
    assert len(client.get_metric_history(fit.info.run_id, "fit_loss")) == 4
    assert [f.path for f in client.list_artifacts(fit.info.run_id)] == ["parity.png"]

    # per-epoch physical validation accuracy, the test split once at the end, the twin-versus-device residual
    val = client.get_metric_history(run_id, "val_acc")
    assert sorted({m.step for m in val}) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert all(0 <= m.value <= 1 for m in val)
    (test,) = client.get_metric_history(run_id, "test_acc")
    assert test.step == 2 * STEPS_PER_EPOCH and 0 <= test.value <= 1
    assert len(client.get_metric_history(run_id, "test_loss")) == 1
    residual = client.get_metric_history(run_id, "twin_residual/circuit")
    floor = client.get_metric_history(run_id, "twin_residual_floor/circuit")
    assert sorted({m.step for m in residual}) == sorted({m.step for m in floor}) == [3, 6]
    assert all(m.value > 0 for m in residual + floor)

    # trained parameters and twins as state_dict files in logged models
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    by_name = {m.name: m for m in models}
    assert set(by_name) == {"stack", "twin-circuit"}
    stack_files = {f.path for f in client.list_logged_model_artifacts(by_name["stack"].model_id)}
    assert {"state_dict.pt", "device_params.json", "config.yaml"} <= stack_files
    twin_files = {f.path for f in client.list_logged_model_artifacts(by_name["twin-circuit"].model_id)}
    assert twin_files == {"circuit.pt", "circuit.json"}
    state = torch.load(Path(by_name["stack"].artifact_location) / "state_dict.pt", weights_only=True)
    assert "2.theta.drive" in state  # the device's trained setting, by layer index


def test_resume_continues_the_same_run_at_the_same_step(resumed_run):
    uri, run_id, resumed_at = resumed_run
    client = MlflowClient(uri)
    tags = client.get_run(run_id).data.tags
    assert tags["pnn.resumed"] == "1" and tags["pnn.start_step"] == str(STEPS_PER_EPOCH)
    assert tags["pnn.end_step"] == str(2 * STEPS_PER_EPOCH) and tags["pnn.state"] == "finished"
    assert tags["pnn.interrupted.1"].startswith("KeyboardInterrupt")
    loss = client.get_metric_history(run_id, "train_loss")
    before = sorted(m.step for m in loss if m.timestamp < resumed_at)
    after = sorted(m.step for m in loss if m.timestamp >= resumed_at)
    assert before[:STEPS_PER_EPOCH] == [1, 2, 3]
    assert after == list(range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1))  # the step count continues
    # the run's parameters were not logged twice (they are immutable; a conflict would have failed the resume)
    assert client.get_run(run_id).data.params["schedule.epochs"] == "2"


def test_evaluate_measures_a_run_on_the_devices(resumed_run, capsys):
    uri, run_id, _ = resumed_run
    assert main(["evaluate", run_id, "--tracking-uri", uri, "--json", "--log", "--in-process"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 2 * STEPS_PER_EPOCH and 0 <= out["acc"] <= 1 and out["n"] == 60
    assert MlflowClient(uri).get_run(run_id).data.metrics["evaluate/test_acc"] == pytest.approx(out["acc"])
    assert main(["evaluate", "no-such-run", "--tracking-uri", uri, "--in-process"]) == 2
    assert "neither a checkpoint file, a run directory, nor a run in tracking URI" in capsys.readouterr().err
    # a server that does not answer is not a run that does not exist: test_evaluate_says_when_the_tracking_...


def test_resume_refuses_what_it_cannot_continue(resumed_run, store, capsys):
    uri, run_id, _ = resumed_run
    root, _ = store
    assert main(["train", "--resume", "0123456789abcdef", "--tracking-uri", uri, "--in-process"]) == 2
    assert "no such run" in capsys.readouterr().err
    assert main(["train", "--resume", run_id, "--no-track", "--in-process"]) == 2
    changed = dict(TINY, schedule={**TINY["schedule"], "epochs": 5})
    other = root / "other.yaml"
    other.write_text(yaml.safe_dump(changed))
    assert main(["train", str(other), "--resume", run_id, "--tracking-uri", uri, "--in-process"]) == 2
    assert "schedule.epochs: differs from the configuration of the run being resumed" in capsys.readouterr().err


def test_calibrate_command_is_a_run_with_a_nested_run_per_twin(store, capsys):
    _, uri = store
    assert main(["calibrate", "--system", "circuit", "--twins", "physics,mlp", "--groups", "4", "--batch", "16",
                 "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("pnn-cluster")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`pnn.command` = 'calibrate'")
    assert run.data.params["system"] == "circuit" and run.data.tags["pnn.best_twin"] in ("physics", "mlp")
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert sorted(k.data.tags["pnn.twin"] for k in kids) == ["mlp", "physics"]
    models = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.name for m in models] == ["twin-circuit"]


def test_demo_tracking_gives_each_method_a_child_run(store):
    import argparse

    from pnn_cluster.commands._tracking import demo_tracking
    from pnn_cluster.config import parse_config
    from pnn_cluster.runner import ExperimentRun, InProcessPlacement

    _, uri = store
    cfg = parse_config(dict(TINY, schedule={**TINY["schedule"], "epochs": 1}))
    args = argparse.Namespace(tracking_uri=uri, no_track=False)
    with demo_tracking(args, {"task": cfg.name, "methods": "pat", "quick": False, "seed": 0}) as tracking:
        r = ExperimentRun(cfg, InProcessPlacement(), tracking=tracking.child("pat"), echo=False).run()
        tracking.record(r)
        parent = tracking.parent.run_id
    client = MlflowClient(uri)
    assert r.run_id is not None and r.run_id != parent
    metrics = client.get_run(parent).data.metrics
    assert metrics["test_acc/pat"] == pytest.approx(r.test_acc)
    assert metrics["device_samples/pat"] == r.device_samples_total
    (child,) = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert child.info.run_id == r.run_id and child.info.status == "FINISHED"
    assert child.data.params["schedule.epochs"] == "1" and child.data.tags["pnn.method"] == "pat"
    assert len(client.get_metric_history(child.info.run_id, "train_loss")) == STEPS_PER_EPOCH
    # a method's run is a training run like any other: it has a checkpoint that evaluate can measure
    assert child.data.tags["pnn.checkpoint_step"] == str(STEPS_PER_EPOCH)


def test_evaluate_measures_a_method_run_of_the_demo(store, capsys):
    _, uri = store
    small = ["dataset.name=digits", "dataset.train_subset=120", "dataset.test_subset=60", "schedule.epochs=1",
             "schedule.batch_size=40", "schedule.eval_batch=60", "devices.circuit.twin.groups=4",
             "devices.circuit.twin.batch=24", "devices.circuit.twin.epochs=4", "tracking.residual_batch=0",
             "tracking.log_models=false", "devices.circuit.driver.imperfections.noise=0",
             "devices.circuit.driver.imperfections.shot=0", "devices.circuit.driver.imperfections.drift=0"]
    argv = ["demo", "--in-process", "--task", "circuit_mnist", "--methods", "pat", "--tracking-uri", uri, "--json"]
    assert main([*argv, *(a for kv in small for a in ("--set", kv))]) == 0
    demo = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pat = demo["methods"]["pat"]
    assert demo["task"] == "circuit_mnist" and pat["device_actors"] == 0 and not pat["trainer_actor"]
    assert main(["evaluate", pat["run_id"], "--tracking-uri", uri, "--json", "--in-process"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 60 and out["step"] == STEPS_PER_EPOCH and out["twin_acc"] is not None
    # the trained stack restored on the same (noise-free) devices: the demo's last test figures, measured again
    (test_loss,) = MlflowClient(uri).get_metric_history(pat["run_id"], "test_loss")
    assert out["loss"] == pytest.approx(test_loss.value, rel=1e-5) and out["acc"] == pytest.approx(pat["test_acc"])


def test_no_track_writes_no_store_and_the_checkpoint_evaluates(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(dict(TINY, schedule={**TINY["schedule"], "epochs": 1})))
    ckpt = tmp_path / "out" / "last.pt"
    assert main(["train", str(config), "--no-track", "--no-progress", "--checkpoint", str(ckpt), "--json",
                 "--in-process"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["run_id"] is None and result["steps"] == STEPS_PER_EPOCH
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert main(["evaluate", str(ckpt), "--no-track", "--json", "--in-process"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == STEPS_PER_EPOCH


def test_twin_kind_best_logs_every_kind_tried_and_the_one_chosen(store, tmp_path, monkeypatch):
    root, uri = store
    raw = {**TINY, "name": "tiny-best", "schedule": {**TINY["schedule"], "epochs": 1},
           "tracking": {**TINY["tracking"], "residual_batch": 0, "log_models": False},
           "devices": {"circuit": {**TINY["devices"]["circuit"],
                                   "twin": {"kind": "best", "groups": 8, "batch": 16, "epochs": 2}}}}
    config = tmp_path / "best.yaml"
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(config), "--tracking-uri", uri, "--no-progress", "--in-process"]) == 0
    client = MlflowClient(uri)
    (fit,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                filter_string="tags.`pnn.command` = 'twin-fit' and params.kind != ''",
                                order_by=["attributes.start_time DESC"], max_results=1)
    tried = {k.split("/")[1]: v for k, v in fit.data.metrics.items()
             if k.startswith("candidate/") and k.endswith("/nmse_stop")}
    assert set(tried) == {"physics", "residual", "mlp"}
    assert fit.data.tags["pnn.twin"] == min(tried, key=tried.get)


def test_evaluate_says_when_the_tracking_server_does_not_answer(capsys):
    # a server that does not answer is not a run that does not exist (exit 2): exit 1, and it says which
    down = f"http://127.0.0.1:{free_port()}"  # a port nothing listens on
    run_id = "0123456789abcdef0123456789abcdef"  # no run directory of it here: only the server could say
    assert main(["evaluate", run_id, "--tracking-uri", down, "--in-process"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"tracking server {down} unreachable" in err[0]

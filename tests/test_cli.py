import pytest

from pnn_cluster.cli import COMMANDS, main
from pnn_cluster.config import example_config_path, load_config
from pnn_cluster.runner import InProcessPlacement, run_experiment


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name.replace("_", "-"), "--help"])
        assert e.value.code == 0
        assert "usage: pnn-cluster" in capsys.readouterr().out


def test_bad_method_is_a_usage_error(capsys):
    assert main(["demo", "--methods", "pat,magic"]) == 2
    err = capsys.readouterr().err
    assert "--methods" in err and "magic" in err and "oracle" in err


def test_calibrate_prints_the_table_and_saves_the_best_twin(tmp_path, capsys):
    rc = main(["calibrate", "--system", "shg", "--twins", "physics", "--groups", "8", "--batch", "32",
               "--save", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "noise floor" in out and "physics" in out and "best: physics" in out
    assert (tmp_path / "shg_physics.pt").is_file() and (tmp_path / "shg_physics.json").is_file()


def test_calibrate_rejects_unknown_twin_kind(capsys):
    assert main(["calibrate", "--system", "shg", "--twins", "gp"]) == 2
    assert "gp" in capsys.readouterr().err


#: the shipped demo stack (hybrid_mnist.yaml) on 560 small digits, 60 of them (dataset.val_fraction 0.1,
#: six of each class) the validation split: 500 train, 32 steps of 16 an epoch, seconds per method
SMALL = ["dataset.name=digits", "dataset.train_subset=560", "dataset.test_subset=200", "dataset.split_seed=1",
         "schedule.epochs=2", "schedule.batch_size=16", "tracking.enabled=false",
         *(f"devices.{d}.twin.{k}" for d in ("optics", "circuit") for k in ("groups=4", "batch=64", "epochs=20"))]


@pytest.mark.parametrize("method", ["oracle", "pat", "in_silico"])
def test_hybrid_stack_end_to_end_on_a_small_subset(method):
    cfg = load_config(example_config_path("hybrid_mnist"), [*SMALL, f"method={method}"])
    r = run_experiment(cfg, InProcessPlacement(), echo=False)
    assert r.state == "finished" and r.steps == 2 * 32 and len(r.history) == 2
    assert r.val_acc == r.history[-1]["val_acc"] and "test_acc" not in r.history[-1]
    assert r.test_acc > 0.35  # ten classes: chance is 0.1
    if method == "in_silico":
        # trained on twins only: the devices saw calibration, validation and the test set, never a training step
        assert r.device_samples == 0 and r.history[0]["device_samples"] == 0
        assert r.executor["calls"] > 0 and r.executor["steps"] == r.steps  # evaluation went through the devices
    else:
        # every training sample is measured on both physical layers, once per epoch
        assert r.history[0]["device_samples"] == 2 * 500 and r.device_samples == 2 * 2 * 500
    if method == "oracle":
        assert r.calibration_samples == 0 and r.twins == {}
    else:
        assert r.calibration_samples > 0 and set(r.twins) == {"optics", "circuit"}
    assert r.device_samples_total == r.device_samples + r.calibration_samples + r.init_samples

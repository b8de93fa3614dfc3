import pytest

from pnn_cluster.cli import COMMANDS, main
from pnn_cluster.experiments import TASKS, run_method, task_dataset
from pnn_cluster.training import TrainConfig


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


@pytest.mark.parametrize("method", ["oracle", "pat", "in_silico"])
def test_hybrid_stack_end_to_end_on_a_small_subset(method):
    task = TASKS["hybrid_mnist"]
    data = task_dataset(task).subset(256, 128)
    r = run_method(task, method, data=data, train_config=TrainConfig(epochs=1, batch_size=64, lr=0.01))
    assert 0.0 <= r.test_acc <= 1.0 and len(r.history) == 1
    if method == "in_silico":
        # trained on twins only: the devices saw calibration, never a training step
        assert r.history[0]["device_samples"] == 0
    else:
        # every training sample is measured on both physical layers
        assert r.history[0]["device_samples"] == 2 * 256
    assert r.device_samples > 0

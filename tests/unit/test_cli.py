"""The command line in this process: help for every command, usage errors, `calibrate` (the shipped demo stack
trained end to end: ``tests/system/test_cli.py``)."""

import pytest

from pnn_cluster.cli import COMMANDS, main


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
    # not recorded (a calibration's MLflow run: tests/system/test_tracking.py)
    rc = main(["calibrate", "--system", "shg", "--twins", "physics", "--groups", "8", "--batch", "32",
               "--save", str(tmp_path), "--no-track"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "noise floor" in out and "physics" in out and "best: physics" in out
    assert (tmp_path / "shg_physics.pt").is_file() and (tmp_path / "shg_physics.json").is_file()


def test_calibrate_rejects_unknown_twin_kind(capsys):
    assert main(["calibrate", "--system", "shg", "--twins", "gp"]) == 2
    assert "gp" in capsys.readouterr().err

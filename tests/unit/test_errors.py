"""Every failure a user can cause or meet is one line on stderr, naming the thing, with the documented exit code.

The command line runs in this process (``pnn_cluster.cli.main``); exit codes: 0 done, 1 the job failed,
2 bad usage or configuration, 130 interrupted. A device server that does not answer (exit 1):
``tests/system/test_errors.py``.
"""

from __future__ import annotations

import copy

import pytest
import ray.exceptions as exceptions  # at collection: importing it probes the network stack (a socket bound)
import torch
import yaml
from helpers import one_line, tiny_config, train_checkpoint, write_config

from pnn_cluster.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, explain, main

#: the smallest training: 60 digits, one epoch of two steps, the ideal twin (nothing to fit)
TINY = tiny_config(system="shg", width=6, device="dev", twin={"kind": "ideal"}, dataset={"val_fraction": 0.0},
                   tracking={"enabled": False})


# -- configuration: exit 2, the key, the value and what is allowed ---------------------------------------------


def test_a_seed_of_2_to_the_70_is_a_config_error(tmp_path, capsys):
    cfg = write_config(tmp_path / "exp.yaml", TINY)
    assert main(["train", str(cfg), "--in-process", "--no-track", "--set", f"seed={2**70}"]) == EXIT_USAGE
    line = one_line(capsys, "train")
    assert line == (f"pnn-cluster train: error: {cfg}: seed: out of range: {2**70} "
                    "(allowed: >= 0 and <= 4294967295)")


@pytest.mark.parametrize("written, shown", [("1e11", "not an integer (str): '1e11'"),  # YAML 1.1: a string
                                            ("1.0e+11", "out of range: 1e+11"),  # a float
                                            ("100000000000", "out of range: 100000000000")])
def test_a_device_option_n_in_of_1e11_is_a_config_error(tmp_path, capsys, written, shown):
    text = yaml.safe_dump(TINY, sort_keys=False).replace("n_in: 6", f"n_in: {written}")
    cfg = write_config(tmp_path / "exp.yaml", text)
    assert main(["train", str(cfg), "--in-process", "--no-track"]) == EXIT_USAGE
    line = one_line(capsys, "train")
    assert line == (f"pnn-cluster train: error: {cfg}: devices.dev.driver.options.n_in: {shown} "
                    "(allowed: an integer from 1 to 65536)")


@pytest.mark.parametrize("value", [0, -4])
def test_a_batch_size_below_one_is_a_config_error(tmp_path, capsys, value):
    cfg = write_config(tmp_path / "exp.yaml", TINY)
    assert main(["train", str(cfg), "--in-process", "--no-track", "--set", f"schedule.batch_size={value}"]) == 2
    assert one_line(capsys, "train").endswith(
        f"schedule.batch_size: out of range: {value} (allowed: >= 1 and <= 1000000)")


def test_sizes_beyond_this_machines_memory_are_a_config_error(tmp_path, capsys, monkeypatch):
    import pnn_cluster.config as config

    monkeypatch.setattr(config, "machine_memory", lambda: 64 * 2**20)  # a machine of 64 MiB
    data = copy.deepcopy(TINY)
    data["stack"][0]["size"] = 65536  # 64 x 65536 weights, their gradients and Adam's moments: 128 MiB
    data["stack"].insert(1, {"kind": "linear", "size": 6})
    data["schedule"]["eval_batch"] = 30
    cfg = write_config(tmp_path / "exp.yaml", data)
    assert main(["train", str(cfg), "--in-process", "--no-track"]) == EXIT_USAGE
    assert one_line(capsys, "train") == (
        f"pnn-cluster train: error: {cfg}: stack.0.size: a linear layer of 64 x 65536 weights (with gradients and "
        "optimizer state) needs about 128 MiB, more than this machine's memory (64 MiB) (allowed: at most 32768 "
        "outputs at these sizes)")


# -- checkpoints: exit 2, the file, what was found and what is expected -----------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    """A real checkpoint of TINY, written by `pnn-cluster train --checkpoint`."""
    return train_checkpoint(tmp_path_factory.mktemp("ckpt"), TINY)


def test_evaluating_a_checkpoint_without_its_model_names_the_keys(tmp_path, capsys, checkpoint):
    path = tmp_path / "nomodel.pt"
    torch.save({k: v for k, v in checkpoint.items() if k != "model"}, path)
    assert main(["evaluate", str(path), "--in-process", "--no-track"]) == EXIT_USAGE
    line = one_line(capsys, "evaluate")
    assert line.startswith(f"pnn-cluster evaluate: error: {path}: no 'model' key (found: config, device_samples")
    assert "expected a checkpoint written by `pnn-cluster train` (keys model, optimizer" in line


def test_evaluating_a_checkpoint_of_another_configuration_names_the_mismatch(tmp_path, capsys, checkpoint):
    state = copy.deepcopy(checkpoint)
    state["experiment"]["stack"][-1]["size"] = 7  # the configuration says 7 outputs; the model has 10
    path = tmp_path / "other.pt"
    torch.save(state, path)
    assert main(["evaluate", str(path), "--in-process", "--no-track"]) == EXIT_USAGE
    line = one_line(capsys, "evaluate")
    assert line == (f"pnn-cluster evaluate: error: {path}: the checkpoint's model does not match this stack: "
                    "shape of 3.weight (10x6 in the checkpoint, 7x6 here), 3.bias (10 in the checkpoint, 7 here); "
                    "it comes from another configuration (evaluate or resume it with the configuration it was "
                    "trained with)")


# -- anything else: exit 1, one line, the traceback on request -------------------------------------------


@pytest.fixture
def broken_loader(monkeypatch):
    import pnn_cluster.config as config

    def boom(*a, **kw):
        raise RuntimeError("boom:\n  a second line")

    monkeypatch.setattr(config, "load_config", boom)


def test_an_unexpected_exception_is_one_line_with_how_to_see_the_traceback(tmp_path, capsys, broken_loader,
                                                                           monkeypatch):
    monkeypatch.delenv("PNN_TRACEBACK", raising=False)
    assert main(["train", "x.yaml", "--no-track"]) == EXIT_FAILED
    assert one_line(capsys, "train") == ("pnn-cluster train: internal error: RuntimeError: boom: a second line "
                                         "(rerun with --traceback or PNN_TRACEBACK=1 for the traceback)")


@pytest.mark.parametrize("how", ["--traceback before", "--traceback after", "PNN_TRACEBACK=1"])
def test_the_traceback_is_printed_on_request(capsys, broken_loader, monkeypatch, how):
    argv = ["train", "x.yaml", "--no-track"]
    if how == "--traceback before":
        argv = ["--traceback", *argv]
    elif how == "--traceback after":
        argv = [*argv, "--traceback"]
    else:
        monkeypatch.setenv("PNN_TRACEBACK", "1")
    assert main(argv) == EXIT_FAILED
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):" and "RuntimeError: boom:" in err
    assert err[-1].startswith("pnn-cluster train: internal error: RuntimeError: boom: a second line")


def test_ctrl_c_exits_130(capsys, monkeypatch):
    import pnn_cluster.config as config

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(config, "load_config", interrupt)
    assert main(["train", "x.yaml", "--no-track"]) == EXIT_INTERRUPTED
    assert one_line(capsys, "train") == "pnn-cluster train: interrupted"


def test_errors_raised_in_a_ray_actor_are_reported_as_their_cause():
    from pnn_cluster.devices import DeviceError, LimitError
    from pnn_cluster.training.trainer import CheckpointError

    def wrapped(cause: Exception) -> Exception:
        return exceptions.RayTaskError("TrainerActor.run", "Traceback ...\n  remote lines", cause).as_instanceof_cause()

    code, lines = explain(wrapped(DeviceError("tcp://lab:5555: no reply")))
    assert code == EXIT_FAILED and lines[0].startswith("error: device failure: tcp://lab:5555: no reply; check")
    code, lines = explain(wrapped(CheckpointError("no 'model' key", "c.pt")))
    assert (code, lines) == (EXIT_USAGE, ["error: c.pt: no 'model' key"])
    code, lines = explain(wrapped(LimitError("shg", "input", "wrong shape", (2, 3), "(batch, 8)")))
    assert (code, lines) == (EXIT_USAGE, ["error: shg: input: wrong shape (got (2, 3)); allowed: (batch, 8)"])
    code, lines = explain(exceptions.ActorDiedError())
    assert code == EXIT_FAILED and lines[0].startswith("error: Ray: ActorDiedError:") and "ray status" in lines[0]


@pytest.mark.parametrize("exc, code, start", [
    (ConnectionRefusedError(111, "Connection refused"), EXIT_FAILED, "error: cannot reach a device"),
    (FileNotFoundError(2, "No such file or directory", "twins/shg.pt"), EXIT_USAGE,
     "error: No such file or directory: twins/shg.pt"),
    (MemoryError(), EXIT_FAILED, "error: out of memory"),
    (ValueError("odd"), EXIT_FAILED, "internal error: ValueError: odd (rerun with --traceback"),
])
def test_each_kind_of_failure_has_its_exit_code(exc, code, start):
    got, lines = explain(exc)
    assert got == code and len(lines) == 1 and lines[0].startswith(start), lines

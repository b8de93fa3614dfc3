"""A device that does not answer is one line on stderr naming it and what to check, exit code 1.

The command line runs in this process (``pnn_cluster.cli.main``) against a ZeroMQ address on loopback that
nothing listens on. The other failures a user can cause or meet: ``tests/unit/test_errors.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import free_port, one_line, tiny_config, train_checkpoint, write_config

from pnn_cluster.cli import EXIT_FAILED, main

#: the smallest training: 60 digits, one epoch of two steps, the ideal twin (nothing to fit)
TINY = tiny_config(system="shg", width=6, device="dev", twin={"kind": "ideal"}, dataset={"val_fraction": 0.0},
                   tracking={"enabled": False})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    """A real checkpoint of TINY, written by `pnn-cluster train --checkpoint`."""
    return train_checkpoint(tmp_path_factory.mktemp("ckpt"), TINY)


def zmq_config(port: int) -> dict:
    data = copy.deepcopy(TINY)
    data["devices"]["dev"]["driver"] = {"kind": "zmq", "address": f"tcp://127.0.0.1:{port}", "timeout_s": 0.2,
                                        "retries": 0, "model": {"system": "shg", "options": {"n_in": 6, "n_out": 6}}}
    return data


def test_a_device_server_that_does_not_answer_fails_train_in_one_line(tmp_path, capsys):
    port = free_port()
    cfg = write_config(tmp_path / "exp.yaml", zmq_config(port))
    assert main(["train", str(cfg), "--in-process", "--no-track", "--no-progress"]) == EXIT_FAILED
    line = one_line(capsys, "train")
    assert f"tcp://127.0.0.1:{port}: no reply to 'spec' after 1 try of 0.2 s" in line


def test_a_device_that_fails_during_evaluate_is_one_line_saying_what_to_check(tmp_path, capsys, checkpoint):
    port = free_port()
    state = copy.deepcopy(checkpoint)
    state["experiment"]["devices"] = zmq_config(port)["devices"]
    path = tmp_path / "remote.pt"
    torch.save(state, path)
    assert main(["evaluate", str(path), "--in-process", "--no-track"]) == EXIT_FAILED
    line = one_line(capsys, "evaluate")
    assert line.startswith(f"pnn-cluster evaluate: error: device failure: tcp://127.0.0.1:{port}: no reply")
    assert "is running and reachable at the address in the configuration" in line

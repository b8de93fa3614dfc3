"""What the tests of every tier share: a free loopback port, a bounded wait on a condition, the smallest
experiment configuration, and what is made from it.

Imported by module name (``from helpers import wait_until``) from any tier: the rootdir conftest puts
``tests/`` on ``sys.path`` (pytest's prepend import mode), as it does for ``lab_devices``. Nothing here
starts a server, a process or Ray (``free_port`` binds a socket for a moment: system tiers only); runtime code
never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from pnn_cluster.devices import Device, DeviceSpec, ParamSpec, Port

#: this directory (``tests/``: what Ray workers and subprocesses get on ``PYTHONPATH`` to import ``lab_devices``)
TESTS = Path(__file__).resolve().parent
#: the repository
ROOT = TESTS.parent


class Gain(Device):
    """A tiny deterministic device, ``y = gain * x`` on 4 channels: for tests about the transport, not the physics."""

    spec = DeviceSpec("gain", Port(4, -1.0, 1.0, "V"), Port(4, unit="V"),
                      (ParamSpec("gain", (4,), 0.0, 2.0, unit="V/V", init=1.0),))

    def measure(self, x, params):
        return x * params["gain"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS's choice; free until someone binds it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate()`` until it returns something truthy (returned), or fail the test naming ``what``
    after ``timeout`` seconds. ``interval`` is the pause between looks, never a wait for the outcome itself."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def tiny_config(*, name: str = "tiny", system: str = "circuit", width: int = 8, outputs: int | None = None,
                device: str = "circuit", imperfections: Mapping[str, Any] | None = None,
                twin: Mapping[str, Any] | None = None, placement: Mapping[str, Any] | None = None,
                dataset: Mapping[str, Any] | None = None, schedule: Mapping[str, Any] | None = None,
                **sections: Any) -> dict[str, Any]:
    """The smallest experiment: digits -> linear ``width`` -> rescale -> one simulated device -> linear 10.

    The device is ``system`` with ``width`` inputs and ``outputs`` outputs (default ``width``), named
    ``device``; ``imperfections`` and ``placement`` are added when given. ``twin`` replaces the default twin
    (physics, 4 groups of 16, 2 epochs); ``dataset`` and ``schedule`` update their defaults (60 train and
    30 test digits; one epoch in batches of 30). Further sections (``optimizer``, ``tracking``, ``method``,
    ...) are added as given. A fresh dictionary on every call: change it freely.
    """
    driver: dict[str, Any] = {"kind": "simulated", "system": system,
                              "options": {"n_in": width, "n_out": width if outputs is None else outputs}}
    if imperfections is not None:
        driver["imperfections"] = dict(imperfections)
    entry: dict[str, Any] = {"driver": driver}
    if placement is not None:
        entry["placement"] = dict(placement)
    entry["twin"] = dict(twin) if twin is not None else {"kind": "physics", "groups": 4, "batch": 16, "epochs": 2}
    raw: dict[str, Any] = {
        "name": name,
        "dataset": {"name": "digits", "train_subset": 60, "test_subset": 30, **(dataset or {})},
        "devices": {device: entry},
        "stack": [{"kind": "linear", "size": width}, {"kind": "rescale"}, {"kind": "physical", "device": device},
                  {"kind": "linear", "size": 10}],
    }
    if "optimizer" in sections:
        raw["optimizer"] = sections.pop("optimizer")
    raw["schedule"] = {"epochs": 1, "batch_size": 30, **(schedule or {})}
    raw.update(sections)
    return copy.deepcopy(raw)


def write_config(path: Path | str, raw: Mapping[str, Any] | str) -> Path:
    """Write an experiment configuration (a mapping, as YAML in its own key order; or text as it is)."""
    path = Path(path)
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(dict(raw), sort_keys=False))
    return path


def train_checkpoint(directory: Path, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Train ``raw`` with ``pnn-cluster train --in-process`` (in this process) and load the checkpoint it wrote."""
    import torch

    from pnn_cluster.cli import main

    config = write_config(Path(directory) / f"{raw['name']}.yaml", raw)
    path = Path(directory) / f"{raw['name']}.pt"
    assert main(["train", str(config), "--in-process", "--no-track", "--no-progress", "--checkpoint", str(path)]) == 0
    return torch.load(path, weights_only=True)


def curve_keys(root: Path) -> Path:
    """CURVE key pairs ``server``, ``trusted`` and ``stranger`` made in ``root``, and ``root/allowed`` holding
    the public key of ``trusted`` alone (the clients a server lets in); returns ``root``."""
    import shutil

    import zmq.auth

    root = Path(root)
    (root / "allowed").mkdir(parents=True)
    for name in ("server", "trusted", "stranger"):
        zmq.auth.create_certificates(str(root), name)
        (root / f"{name}.key_secret").chmod(0o600)  # zmq writes it readable by all; a server refuses that
    shutil.copy(root / "trusted.key", root / "allowed" / "trusted.key")
    return root


def command_args(command: ModuleType, *argv: str) -> argparse.Namespace:
    """``pnn-cluster NAME ARGV`` parsed by the parser of ``command`` alone (its module in
    ``pnn_cluster.commands``, NAME its name with dashes): what the command line hands that command."""
    parser = argparse.ArgumentParser(prog="pnn-cluster")
    command.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args([command.__name__.rsplit(".", 1)[-1].replace("_", "-"), *argv])


def one_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The one line a failed ``pnn-cluster COMMAND`` wrote to stderr (the test fails if it wrote more)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pnn-cluster {command}: "), err
    return lines[0]

"""The README's "Bring your own device" example runs as printed, with the public API it imports."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import pnn_cluster

README = Path(__file__).resolve().parents[2] / "README.md"


def _block(title: str) -> str:
    text = README.read_text()
    section = text[text.index(f"## {title}"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_device_example_runs_and_trains_through_its_twin(capsys):
    code = _block("Bring your own device")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    layer = namespace["layer"]
    assert isinstance(layer, pnn_cluster.PhysicalLayer)
    grads = [p.grad for p in layer.theta.values()]
    assert all(g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in grads)
    nmse, floor = capsys.readouterr().out.split(" vs noise floor ")
    assert float(nmse) < 10 * float(floor)  # the physics twin of a device its model describes


def test_the_public_api_is_what_the_readme_imports():
    for name in ("Device", "DeviceSpec", "ParamSpec", "Port", "PhysicsModel", "PhysicalLayer", "calibrate",
                 "load_config", "run_experiment"):
        assert name in pnn_cluster.__all__ and getattr(pnn_cluster, name) is not None
    from importlib.metadata import version

    assert pnn_cluster.__version__ == version("pnn-cluster")

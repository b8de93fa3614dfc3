"""pnn-cluster: physics-aware training of physical neural networks on lab hardware.

The names a user needs: a device (:class:`Device` with its :class:`DeviceSpec`, :class:`Port` and
:class:`ParamSpec`, and optionally a :class:`PhysicsModel`), its twin (:func:`calibrate`), the physical
layer as a torch module (:class:`PhysicalLayer`), and whole experiments (:func:`load_config`,
:func:`run_experiment`). The experiment entry points load on first use, so ``import pnn_cluster`` stays light.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pnn_cluster.devices import Device, DeviceSpec, LimitError, ParamSpec, PhysicsModel, Port, make_device
from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
from pnn_cluster.pat import pat_apply, twin_vjp

try:
    __version__ = version("pnn-cluster")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

#: what loads on first use: name -> module
_LAZY = {"calibrate": "pnn_cluster.twins", "load_config": "pnn_cluster.config",
         "run_experiment": "pnn_cluster.runner"}

__all__ = [
    "Device", "DeviceSpec", "LimitError", "ParamSpec", "PhysicsModel", "Port", "make_device",
    "Affine", "PhysicalLayer", "Rescale", "Stack", "pat_apply", "twin_vjp",
    "calibrate", "load_config", "run_experiment",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pnn_cluster' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

"""Devices: specs and limits, the device protocol, physics models and the simulated systems."""

from __future__ import annotations

from typing import Any, Callable

from pnn_cluster.devices.base import Device, DeviceError
from pnn_cluster.devices.physics import PhysicsModel
from pnn_cluster.devices.simulated import Imperfections, SimulatedDevice
from pnn_cluster.devices.spec import DeviceSpec, LimitError, ParamSpec, Port

__all__ = [
    "Device", "DeviceError", "DeviceSpec", "Imperfections", "LimitError", "ParamSpec", "PhysicsModel",
    "Port", "SimulatedDevice", "SYSTEMS", "make_device",
]


def _shg(**kw: Any) -> SimulatedDevice:
    from pnn_cluster.devices.shg import SHGDevice

    return SHGDevice(**kw)


#: the simulated systems by name; each factory takes ``imperfections=`` and the system's size options
SYSTEMS: dict[str, Callable[..., SimulatedDevice]] = {
    "shg": _shg,
}


def make_device(system: str, **options: Any) -> SimulatedDevice:
    """Build a simulated device by name, e.g. ``make_device("shg", n_in=12, n_out=12)``."""
    try:
        factory = SYSTEMS[system]
    except KeyError:
        raise ValueError(f"unknown system {system!r}; choose one of {sorted(SYSTEMS)}") from None
    return factory(**options)

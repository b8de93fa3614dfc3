"""Devices: specs and limits, the device protocol, physics models, the simulated systems and users' own classes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pnn_cluster.devices.base import Device, DeviceError
from pnn_cluster.devices.physics import PhysicsModel
from pnn_cluster.devices.simulated import Imperfections, SimulatedDevice
from pnn_cluster.devices.spec import DeviceSpec, LimitError, ParamSpec, Port
from pnn_cluster.devices.user import UserDeviceError, load_device_class, make_user_device

__all__ = [
    "Device", "DeviceError", "DeviceSpec", "Imperfections", "LimitError", "ParamSpec", "PhysicsModel",
    "Port", "SimulatedDevice", "SYSTEMS", "UserDeviceError", "load_device_class", "make_device", "make_user_device",
]


def _shg(**kw: Any) -> SimulatedDevice:
    from pnn_cluster.devices.shg import SHGDevice

    return SHGDevice(**kw)


def _plate(**kw: Any) -> SimulatedDevice:
    from pnn_cluster.devices.plate import PlateDevice

    return PlateDevice(**kw)


def _circuit(**kw: Any) -> SimulatedDevice:
    from pnn_cluster.devices.circuit import CircuitDevice

    return CircuitDevice(**kw)


def _oscillators(**kw: Any) -> SimulatedDevice:
    from pnn_cluster.devices.oscillators import OscillatorsDevice

    return OscillatorsDevice(**kw)


#: the simulated systems by name; each factory takes ``imperfections=`` and the system's size options
SYSTEMS: dict[str, Callable[..., SimulatedDevice]] = {
    "shg": _shg,
    "plate": _plate,
    "circuit": _circuit,
    "oscillators": _oscillators,
}


def make_device(system: str, **options: Any) -> SimulatedDevice:
    """Build a simulated device by name, e.g. ``make_device("shg", n_in=12, n_out=12)``."""
    try:
        factory = SYSTEMS[system]
    except KeyError:
        raise ValueError(f"unknown system {system!r}; choose one of {sorted(SYSTEMS)}") from None
    return factory(**options)

"""pnn-cluster: physics-aware training of physical neural networks on lab hardware."""

from pnn_cluster.devices import Device, DeviceSpec, LimitError, ParamSpec, Port, make_device
from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
from pnn_cluster.pat import pat_apply, twin_vjp

__version__ = "0.1.0"

__all__ = [
    "Device", "DeviceSpec", "LimitError", "ParamSpec", "Port", "make_device",
    "Affine", "PhysicalLayer", "Rescale", "Stack", "pat_apply", "twin_vjp",
]

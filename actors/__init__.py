"""Ray wiring only: the plain classes of ``pnn_cluster.training`` wrapped as actors, with placement and restarts.

- :class:`DeviceActor` (:func:`start_device`): one device, in its own process, on the
  node that declared its instrument; :class:`RemoteDevice` is its proxy with
  the ordinary Device interface.
- :class:`TwinActor` (:func:`start_twin`, :func:`remote_vjp`): a twin replica.
- :class:`TrainerActor` (:func:`start_trainer`): the model, the optimizer and the loop.
- :class:`RayExecutor`: the micro-batch pipeline over device actors.
"""

from actors.cluster import connect, instrument_resource, join_command, node_instruments
from actors.device import DeviceActor, RayDeviceHandle, RemoteDevice, RestartPolicy, start_device
from actors.executor import RayBackend, RayExecutor
from actors.trainer import TrainerActor, device_configs, run_method_distributed, start_trainer
from actors.twin import TwinActor, remote_vjp, start_twin

__all__ = [
    "connect", "instrument_resource", "join_command", "node_instruments",
    "DeviceActor", "RayDeviceHandle", "RemoteDevice", "RestartPolicy", "start_device",
    "RayBackend", "RayExecutor",
    "TrainerActor", "device_configs", "run_method_distributed", "start_trainer",
    "TwinActor", "remote_vjp", "start_twin",
]

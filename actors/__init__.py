"""Ray wiring only: the plain classes of ``pnn_cluster`` wrapped as actors, with placement and restarts.

- :class:`DeviceActor` (:func:`start_device`): one device replica, in its own process, on the
  node that declared its instrument; :class:`ActorDevice` is its proxy with the ordinary
  Device interface, :class:`RayDeviceHandle` the pipeline's view of it.
- :class:`TwinActor` (:func:`start_twin`, :class:`RayTwinHandle`): a copy of a twin.
- :class:`TrainerActor` (:func:`start_trainer`): the runner's ExperimentRun, the loop.
- :class:`RayPlacement`: the runner's placement on Ray; :class:`RayLauncher`: a run in a trainer actor.
- :class:`RayExecutor`: the micro-batch pipeline over device actors, for scripts and tests.
"""

from actors.cluster import connect, instrument_resource, join_command, node_instruments
from actors.device import ActorDevice, DeviceActor, RayDeviceHandle, RestartPolicy, start_device
from actors.executor import RayBackend, RayExecutor
from actors.launch import RayLauncher
from actors.placement import RayPlacement
from actors.trainer import TrainerActor, start_trainer
from actors.twin import RayTwinHandle, TwinActor, start_twin

__all__ = [
    "connect", "instrument_resource", "join_command", "node_instruments",
    "ActorDevice", "DeviceActor", "RayDeviceHandle", "RestartPolicy", "start_device",
    "RayBackend", "RayExecutor", "RayLauncher", "RayPlacement",
    "TrainerActor", "start_trainer", "RayTwinHandle", "TwinActor", "start_twin",
]

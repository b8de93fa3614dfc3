"""RayPlacement: every device replica in its own device actor, on its instrument's node; twins in twin actors."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray import exceptions as rex
from torch import nn

from actors.cluster import INSTRUMENT_PREFIX
from actors.device import ActorDevice, RayDeviceHandle, RestartPolicy, start_device
from actors.executor import RayBackend
from actors.leases import lease_board
from actors.twin import RayTwinHandle, start_twin
from pnn_cluster.devices.base import DeviceError
from pnn_cluster.runner.build import DeviceRecipe
from pnn_cluster.runner.leases import Lease, got_line, still_waiting_line, waiting_for, waiting_line
from pnn_cluster.runner.placement import DeviceRef
from pnn_cluster.training.pipeline import TwinPool
from pnn_cluster.training.workers import twin_payload
from pnn_cluster.twins.versions import twin_digest

__all__ = ["RayPlacement"]


def _print(line: str) -> None:
    print(line, flush=True)


class RayPlacement:
    """The runner's placement on a Ray cluster (this process must be connected to it).

    Device actors are started all at once and connect in parallel, each on the
    node that declared its instrument; the spec of a device that learns it on
    connect is read from the actor after it connected. Each replica gets
    ``placement.twins.actors`` twin actors with the CPUs and GPUs asked for.

    A device placed on an instrument that another run holds waits for it, as
    long as that run keeps it (an instrument has one connection): ``report``
    gets a line saying what it waits for, held by which run and job since
    when (again every ``wait_report_s``), and another when it is free; the
    connect timeout counts from then. ``run`` (and ``submitter``, who submitted
    it) names this run in the leases its device actors record (:mod:`actors.leases`).
    """

    kind = "ray"
    micro_batches = None  # planned from the devices' declared timings
    untimed_micro_batches = None  # a device without a declared timing: enough to keep every actor busy

    def __init__(self, restart: RestartPolicy | None = None, connect_timeout_s: float = 300.0,
                 report: Callable[[str], None] | None = None, run: str = "", submitter: str | None = None,
                 lease_poll_s: float = 1.0, wait_report_s: float = 30.0) -> None:
        self.backend = RayBackend()
        self.restart = restart
        self.connect_timeout_s = connect_timeout_s
        self.report = report or _print
        self.run = run or "unnamed"
        self.submitter = submitter
        self.lease_poll_s = lease_poll_s
        self.wait_report_s = wait_report_s
        #: seconds each device (by label) waited for its instrument, if it had to
        self.waits: dict[str, float] = {}
        self._cancel = threading.Event()
        self._board = None
        self._leases: list[dict[str, Any]] = []
        self._devices: list[Any] = []
        self._twins: list[Any] = []
        self._blank: dict[str, list[Any]] = {}

    def start_devices(self, recipes: Sequence[DeviceRecipe], twins: bool = False) -> list[DeviceRef]:
        declared = ray.cluster_resources()
        for r in recipes:
            missing = [k for k in r.placement.ray_resources() if k not in declared]
            if missing:  # a lab's instruments do not come and go: say so now rather than wait for a node
                wanted = json.dumps({k: 1 for k in missing})
                raise DeviceError(f"device {r.label}: no node of the cluster declared {', '.join(missing)}; the PC "
                                  f"that has it joins with `ray start --address HEAD:6379 --resources '{wanted}'` "
                                  f"(or drop devices.{r.name}.placement to run it anywhere)")
        users: dict[str, list[str]] = {}
        for r in recipes:
            if r.placement.instrument:
                users.setdefault(r.placement.instrument, []).append(r.label)
        for instrument, labels in users.items():
            if len(labels) > 1:  # the second would wait for the first for ever
                raise DeviceError(f"devices {', '.join(labels)} all ask for instrument {instrument}, which has one "
                                  "connection: give each its own (devices.NAME.placement.instrument)")
        leases = [self._lease(r) for r in recipes]
        actors = [start_device(r, self.restart, lease=lease) for r, lease in zip(recipes, leases)]
        self._devices += actors
        self._leases += [lease for lease in leases if lease is not None]
        if twins:
            # the twin actors' processes start now, while the devices connect; each gets its twin later
            for r in recipes:
                tp = r.placement.twins
                blank = [start_twin(None, num_cpus=tp.num_cpus, num_gpus=tp.num_gpus) for _ in range(tp.actors)]
                self._blank[r.label] = blank
                self._twins += blank
        # the constructor connects; asking for the spec waits for that, on every device at once
        specs = [a.spec.remote() for a in actors]
        nodes = [a.node_id.remote() for a in actors]
        self._connected(recipes, specs, leases)
        refs = []
        for recipe, actor, spec, node in zip(recipes, actors, ray.get(specs), ray.get(nodes)):
            device = ActorDevice(actor, spec, name=recipe.label, timeout_s=recipe.timeout_s)
            refs.append(DeviceRef(recipe, device, RayDeviceHandle(actor, recipe.label), device.collect, node=node))
        return refs

    def _lease(self, recipe: DeviceRecipe) -> dict[str, Any] | None:
        if not recipe.placement.instrument:
            return None
        return {"instrument": recipe.placement.instrument, "run": self.run, "device": recipe.label,
                "token": uuid.uuid4().hex, "submitter": self.submitter}

    def _connected(self, recipes: Sequence[DeviceRecipe], specs: list[Any], leases: list[dict[str, Any] | None]
                   ) -> None:
        """Wait until every device actor has connected its instrument.

        The connect timeout counts for each device from the moment its instrument is free for it: a device
        whose instrument another run holds waits as long as that run keeps it, and the run reports what it
        waits for, held by whom, since when (:mod:`pnn_cluster.runner.leases`).
        """
        start, asked = time.monotonic(), time.time()
        clock = dict.fromkeys(range(len(recipes)), start)  # when each device's connect timeout started
        waiting: dict[int, tuple[float, float]] = {}  # device -> (wall time it began waiting, last report)
        pending = {ref: i for i, ref in enumerate(specs)}
        poll = self.lease_poll_s if any(leases) else self.connect_timeout_s
        while True:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=poll)
            for ref in ready:
                i = pending.pop(ref)
                self._end_wait(recipes[i], waiting.pop(i, None))
            if not pending:
                return
            now = time.monotonic()
            queued = self._queued([i for i in pending.values() if leases[i] is not None], leases)
            for i, lease in queued.items():
                clock[i] = now
                r = recipes[i]
                if i not in waiting:  # it has waited since it was asked for
                    waiting[i] = (asked, now)
                    self.report(waiting_line(r.label, r.placement.instrument, INSTRUMENT_PREFIX
                                             + r.placement.instrument, lease, asked))
                elif now - waiting[i][1] >= self.wait_report_s:
                    waiting[i] = (waiting[i][0], now)
                    self.report(still_waiting_line(r.label, r.placement.instrument, lease,
                                                   time.time() - waiting[i][0]))
            for i in [i for i in waiting if i not in queued]:
                self._end_wait(recipes[i], waiting.pop(i))
            if self._cancel.is_set():
                names = ", ".join(recipes[i].label for i in pending.values())
                raise DeviceError(f"stopped while device actor(s) {names} were starting (waiting for their "
                                  "instrument or connecting)")
            late = [i for i in pending.values() if now - clock[i] >= self.connect_timeout_s]
            if late:
                raise self._late(recipes, late, leases)

    def _queued(self, candidates: list[int], leases: list[dict[str, Any] | None]) -> dict[int, Lease]:
        """Which of ``candidates`` wait for an instrument someone else holds, with that holder's lease."""
        if not candidates:
            return {}
        free = ray.available_resources()
        names = [leases[i]["instrument"] for i in candidates]
        if self._board is None:
            self._board = lease_board()
        held = ray.get(self._board.held.remote(names))
        out = {}
        for i, name in zip(candidates, names):
            lease = Lease.from_dict(held[name]) if name in held else None
            if waiting_for(leases[i]["token"], lease, free.get(INSTRUMENT_PREFIX + name, 0.0)):
                out[i] = lease
        return out

    def _late(self, recipes: Sequence[DeviceRecipe], late: list[int], leases: list[dict[str, Any] | None]
              ) -> DeviceError:
        wanted = {recipes[i].label: recipes[i].placement.ray_resources() for i in late}
        names = [leases[i]["instrument"] for i in late if leases[i] is not None]
        held = ray.get(self._board.held.remote(names)) if names and self._board is not None else {}
        free = ray.available_resources()
        # a unit in use with no lease on record: an actor that is no run's device holds the instrument
        outside = sorted(INSTRUMENT_PREFIX + n for n in names
                         if n not in held and free.get(INSTRUMENT_PREFIX + n, 0.0) < 1)
        busy = (f" ({', '.join(outside)} in use by an actor that is no run's device: `ray status`, "
                "`ray list actors`)" if outside else "")
        return DeviceError(f"device actor(s) {', '.join(recipes[i].label for i in late)} not connected after "
                           f"{self.connect_timeout_s:g} s; is a node with {wanted} in the cluster (`ray status`), "
                           f"and its instrument on?{busy}")

    def _end_wait(self, recipe: DeviceRecipe, waited: tuple[float, float] | None) -> None:
        if waited is None:
            return
        seconds = time.time() - waited[0]
        self.waits[recipe.label] = round(seconds, 3)
        self.report(got_line(recipe.label, recipe.placement.instrument, seconds))

    def cancel(self) -> None:
        """Stop waiting for instruments (a run stopped before it started training); safe from another thread."""
        self._cancel.set()

    def start_twins(self, twin: nn.Module, recipe: DeviceRecipe) -> TwinPool | None:
        tp = recipe.placement.twins
        payload = twin_payload(twin)
        actors = self._blank.pop(recipe.label, None)
        if actors:
            ray.get([a.load.remote(payload) for a in actors])
        else:
            actors = [start_twin(twin, num_cpus=tp.num_cpus, num_gpus=tp.num_gpus) for _ in range(tp.actors)]
            self._twins += actors
        handles = [RayTwinHandle(a, f"{recipe.label}/twin{j}") for j, a in enumerate(actors)]
        return TwinPool(handles, payload, twin_digest(payload["state"]))

    def counts(self) -> dict[str, Any]:
        in_actor = ray.get_runtime_context().get_actor_id() is not None
        return {"device_actors": len(self._devices), "twin_actors": len(self._twins), "trainer_actor": in_actor,
                "instrument_waits": dict(self.waits)}

    def close(self) -> None:
        if self._leases:
            # let the next run's waiting device know at once whose instrument is free (the unit itself is
            # freed by the kill below)
            try:
                board = self._board or lease_board()
                ray.get([board.release.remote(lease["instrument"], lease["token"]) for lease in self._leases],
                        timeout=10)
            except (rex.RayError, rex.GetTimeoutError):
                pass  # the board only informs: a lease left on record never keeps an instrument from anyone
            self._leases.clear()
        for a in self._devices + self._twins:
            ray.kill(a, no_restart=True)
        self._devices.clear()
        self._twins.clear()

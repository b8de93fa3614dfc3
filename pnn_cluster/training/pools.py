"""What the schedule sends work to: a stage's pool of replica devices, and each replica's twin copies.

A :class:`StagePool` holds the :class:`Replica` s of one physical layer and
who is active in it (a replica that keeps failing is retired, one being
recalibrated is suspended for a while); a :class:`TwinPool` holds the copies
of one replica's twin and keeps them on the same twin state.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pnn_cluster.layers import PhysicalLayer
from pnn_cluster.training.backends import DeviceHandle, TwinHandle
from pnn_cluster.training.faults import describe
from pnn_cluster.twins.versions import twin_digest

__all__ = ["TwinPool", "Replica", "StagePool"]


class TwinPool:
    """The copies of one replica's twin: backward passes go to the least busy copy.

    ``payload`` is the twin's latest state (kind, config, tensors) and
    ``version`` its hash. Every call names the version it expects; a copy that
    was restarted from older state answers None, gets the latest state and is
    asked again, so a restarted twin never differentiates with a stale twin.
    """

    def __init__(self, handles: Sequence[TwinHandle], payload: Mapping[str, Any], version: str,
                 timeout_s: float | None = None) -> None:
        if not handles:
            raise ValueError("TwinPool: needs at least one twin handle")
        self.handles = list(handles)
        self.payload = dict(payload)
        self.version = version
        self.timeout_s = timeout_s
        self.busy = collections.Counter()
        self.reloads = 0
        #: how many times each copy was given the state since this pool started (see :meth:`restore`)
        self.loads = collections.Counter()

    def pick(self) -> TwinHandle:
        return min(self.handles, key=lambda h: self.busy[id(h)])

    def update(self, payload: Mapping[str, Any], version: str) -> None:
        """A refit: every copy takes the new state (at a step boundary)."""
        self.payload, self.version = dict(payload), version
        for h in self.handles:
            h.load(self.payload)
            self.loads[id(h)] += 1

    def restore(self, handle: TwinHandle, loads_when_sent: int | None = None) -> bool:
        """Give a copy that answered None the latest state; returns whether it was sent.

        Calls queued on a restarted copy all answer None; the first one's restore covers
        the others (``loads_when_sent``: :attr:`loads` of the copy when the call was sent),
        so the state travels once, not once per queued call.
        """
        if loads_when_sent is not None and self.loads[id(handle)] != loads_when_sent:
            return False
        self.reloads += 1
        self.loads[id(handle)] += 1
        handle.load(self.payload)
        return True

    def refit(self, train: Any, val: Any, **kw: Any) -> dict[str, Any]:
        """Fit in the first copy (next to its data, off the trainer), then every other copy takes the result."""
        figures, payload = self.handles[0].fit(train, val, **kw)
        self.payload = dict(payload)
        self.version = twin_digest(payload["state"])
        for h in self.handles[1:]:
            h.load(self.payload)
            self.loads[id(h)] += 1
        return figures


@dataclass(eq=False)
class Replica:
    """One device of a stage, with the twin that differentiates what it measures.

    twin: this copy's twin; None uses the layer's own twin.
    twins: this copy's twin copies elsewhere (twin actors): backward passes stream to them.
    timeout_s: the longest one call to this device may take (None: no limit).
    """

    handle: DeviceHandle
    twin: Callable | None = None
    name: str = ""
    twins: TwinPool | None = None
    timeout_s: float | None = None
    # scheduling state, owned by the pipeline
    sent_version: str | None = field(default=None, init=False, repr=False)
    in_flight: int = field(default=0, init=False, repr=False)
    failures: int = field(default=0, init=False, repr=False)
    measured: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not callable(getattr(self.handle, "submit", None)):
            raise TypeError(f"Replica.handle: needs a submit(x, params, version) method, got "
                            f"{type(self.handle).__name__}")
        self.name = self.name or getattr(self.handle, "name", "") or "replica"


class StagePool:
    """The replicas of one physical layer; a replica that keeps failing leaves it (``retire``), one that is
    being recalibrated leaves it for a while (``suspend``, ``readmit``)."""

    def __init__(self, layer: PhysicalLayer, replicas: Sequence[Replica]) -> None:
        if not replicas:
            raise ValueError(f"stage {layer.name}: a pool needs at least one replica")
        self.layer = layer
        self.name = layer.name
        self.replicas: list[Replica] = list(replicas)
        self.active: list[Replica] = list(replicas)
        self.retired: dict[str, str] = {}
        self.suspended: dict[str, str] = {}
        self._turn = itertools.count()

    def pick(self, depth: int) -> Replica | None:
        """The least busy replica with room for another call; ties go round the pool."""
        n = len(self.active)
        if n == 0:
            return None
        start = next(self._turn) % n
        best = None
        for i in range(n):
            r = self.active[(start + i) % n]
            if r.in_flight < depth and (best is None or r.in_flight < best.in_flight):
                best = r
        return best

    def retire(self, replica: Replica, exc: BaseException) -> None:
        if replica in self.active:
            self.active.remove(replica)
            self.retired[replica.name] = describe(exc)

    def suspend(self, replica: Replica, reason: str) -> None:
        """No more work to ``replica`` until :meth:`readmit` (call at a step boundary: nothing in flight)."""
        if replica not in self.active:
            raise ValueError(f"stage {self.name}: replica {replica.name!r} is not active; active: "
                             f"{[r.name for r in self.active]}")
        self.active.remove(replica)
        self.suspended[replica.name] = reason

    def readmit(self, replica: Replica) -> None:
        """``replica`` takes work again, in its place in the pool."""
        if self.suspended.pop(replica.name, None) is not None and replica not in self.active:
            self.active = [r for r in self.replicas if r in self.active or r is replica]


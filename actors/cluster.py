"""Joining a Ray cluster, and where device actors may run.

A lab PC declares the instruments wired to it when it joins the cluster, as
custom resources with one unit each::

    ray start --address=HEAD:6379 --resources='{"instrument:shg-bench-1": 1}'

(:func:`join_command` prints that line.) A :class:`~pnn_cluster.training.workers.DeviceConfig`
names the instrument, and its device actor asks for that unit, so Ray starts
it on that PC and nowhere else. Ray's newer node labels (``ray start
--labels``) also say *where*, but not *how many*: an instrument has one
connection, and the single unit of the resource is what keeps a second device
actor from opening it while the first still holds it (Ray recommends custom
resources exactly when a count matters).

A device without an instrument (every simulated device by default) asks for
nothing and runs anywhere, so the local default needs no setup.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import ray

__all__ = ["INSTRUMENT_PREFIX", "instrument_resource", "join_command", "connect", "node_instruments"]

INSTRUMENT_PREFIX = "instrument:"


def instrument_resource(name: str) -> dict[str, float]:
    return {INSTRUMENT_PREFIX + name: 1.0}


def join_command(head_address: str, instruments: Iterable[str]) -> str:
    """The ``ray start`` line a lab PC runs to join with its instruments."""
    resources = {INSTRUMENT_PREFIX + n: 1 for n in instruments}
    return f"ray start --address={head_address} --resources='{json.dumps(resources)}'"


def node_instruments() -> dict[str, list[str]]:
    """Instruments each live node declared, by node id."""
    out = {}
    for node in ray.nodes():
        if node.get("Alive"):
            out[node["NodeID"]] = sorted(k[len(INSTRUMENT_PREFIX):] for k in node.get("Resources", {})
                                         if k.startswith(INSTRUMENT_PREFIX))
    return out


def connect(address: str | None = None, **init_kw: Any) -> str:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``); with neither, start a local Ray.

    Returns ``"local"`` or the address joined. Does nothing if this process
    is already connected.
    """
    if ray.is_initialized():
        return "connected"
    # "local" starts a fresh instance: without it ray.init would join whatever Ray another process
    # (a test session, a colleague's job) happens to run on this machine
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    init_kw.setdefault("include_dashboard", False)
    init_kw.setdefault("logging_level", "WARNING")
    ray.init(address=address, **init_kw)
    return address

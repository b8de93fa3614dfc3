"""Instrument leases: which run holds an instrument, and what a run that wants it too is told.

An instrument has one connection. On a cluster its node declares it as a
custom resource with one unit (``instrument:NAME``); the device actor that
opens it holds that unit for its life, so a second run's device actor for the
same instrument is not started until the first run lets go. That wait is
right (a lab's runs queue for its benches), but a run that only waits looks
hung: so each device actor that takes an instrument records a :class:`Lease`
(which run, which device, which Ray job, which node, since when), and a run
whose device waits reports that lease to the person who submitted it.

This module is the plain part: the lease record, the decision whether a
device is waiting for an instrument someone else holds (:func:`waiting_for`),
and the lines a run reports (:func:`waiting_line`, :func:`got_line`). Where
leases are kept is the placement's business (``actors.leases`` on Ray).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Lease", "waiting_for", "waiting_line", "still_waiting_line", "got_line", "clock", "WAITS", "GOT"]

#: what marks a run's lines about a wait, for whoever reads its output (a benchmark, a test)
WAITS = "waits for instrument"
#: :func:`got_line` read back: the instrument and the seconds waited
GOT = re.compile(r"instrument (\S+) is free after ([0-9.]+) s of waiting")


@dataclass(frozen=True)
class Lease:
    """Who took an instrument: recorded by the device actor that holds its unit.

    instrument: the instrument's name (``placement.instrument``).
    run: the name of the run (its configuration's ``name``) that took it.
    device: the device (replica label) in that run that opened it.
    job: the Ray job the run belongs to (one per submitting process).
    node: the node id of the PC the instrument is wired to.
    since: when the device actor took it (seconds since the epoch).
    token: this start of this device actor; the run that started it knows it.
    released: when the run let go of it (seconds since the epoch), or None while held.
    submitter: who submitted the run (``pnn-cluster submit`` names them), if known.
    """

    instrument: str
    run: str
    device: str
    job: str
    node: str
    since: float
    token: str
    released: float | None = None
    submitter: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Lease:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def waiting_for(token: str, lease: Lease | None, units_free: float) -> bool:
    """Whether the device actor started with ``token`` waits for an instrument another holds.

    ``lease``: the instrument's last lease on record; ``units_free``: the
    cluster's free units of its resource. A free unit means nobody holds it
    (the device is being placed); a lease of this token means this device has
    it; a released lease with no free unit means it was let go and the unit
    is taken by the next one (most likely this device, starting). Otherwise
    the lease's holder has it and this device waits.

    With no lease on record the unit is taken either by this very device,
    whose process is starting and has not recorded its lease yet, or by an
    actor that records none: the two cannot be told apart, so that is no wait
    (the connect timeout runs, and its error says the unit is in use).
    """
    if units_free >= 1 or lease is None:
        return False
    return lease.token != token and lease.released is None


def clock(t: float) -> str:
    """A wall-clock time as a person in the lab reads it in a log: UTC, to the second."""
    return time.strftime("%H:%M:%S UTC", time.gmtime(t))


def waiting_line(device: str, instrument: str, resource: str, lease: Lease, since: float) -> str:
    """What a run says when its device starts waiting for ``instrument``, which ``lease``'s run holds."""
    by = f"submitted by {lease.submitter}, " if lease.submitter else ""
    holder = (f"held by run {lease.run!r} ({by}Ray job {lease.job}, its device {lease.device}, on node "
              f"{lease.node[:12]}) since {clock(lease.since)}")
    return (f"-- device {device} {WAITS} {instrument} (Ray resource {resource}, one connection): "
            f"{holder}; waiting since {clock(since)}. It starts when that run lets go of it; the connect "
            f"timeout counts from then (Ctrl-C stops this run)")


def still_waiting_line(device: str, instrument: str, lease: Lease, waited_s: float) -> str:
    return (f"   device {device} still waits for instrument {instrument}, held by run {lease.run!r} (Ray job "
            f"{lease.job}): {waited_s:.0f} s so far")


def got_line(device: str, instrument: str, waited_s: float) -> str:
    return f"-- device {device}: instrument {instrument} is free after {waited_s:.1f} s of waiting; connecting"

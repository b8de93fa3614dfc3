"""The cluster's board of instrument leases: one small detached actor every run finds by name.

A device actor that opens an instrument records its
:class:`~pnn_cluster.runner.leases.Lease` here as it starts (its unit of
``instrument:NAME`` is already its own then); the run that started it marks it
released when it closes. A run whose device actor waits for the unit reads the
lease to tell its submitter who holds the instrument. The board only informs:
which actor may open an instrument is decided by Ray's resource, never here, so
a stale lease (a holder killed without closing) can mislead a message, never
the placement.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import ray

__all__ = ["BOARD_NAME", "BOARD_NAMESPACE", "lease_board", "LeaseBoard"]

BOARD_NAME = "pnn-instrument-leases"
#: every job's runs share it, whatever namespace they run in
BOARD_NAMESPACE = "pnn-cluster"


class _LeaseBoard:
    def __init__(self) -> None:
        self._leases: dict[str, dict[str, Any]] = {}

    def take(self, lease: dict[str, Any]) -> None:
        # the resource's single unit makes the taker the holder: a newer lease replaces whatever is on record
        self._leases[lease["instrument"]] = dict(lease)

    def release(self, instrument: str, token: str) -> None:
        lease = self._leases.get(instrument)
        if lease is not None and lease["token"] == token and lease.get("released") is None:
            lease["released"] = time.time()

    def held(self, instruments: Iterable[str]) -> dict[str, dict[str, Any]]:
        return {i: dict(self._leases[i]) for i in instruments if i in self._leases}


LeaseBoard = ray.remote(_LeaseBoard)


def lease_board():
    """The board's handle, started on first use (no CPU: it answers a few small calls a second at most)."""
    return LeaseBoard.options(name=BOARD_NAME, namespace=BOARD_NAMESPACE, lifetime="detached", get_if_exists=True,
                              num_cpus=0, max_restarts=-1).remote()

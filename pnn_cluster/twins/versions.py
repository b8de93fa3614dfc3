"""Twin versions: each device's twins numbered in order, and told apart by their contents.

Two words, two things. A twin's *version* is a sequence number per device (or device replica): 0 is its
first calibration, and every later fit (a refit, whether it was swapped in or not; a full recalibration)
takes the next number, so versions order a training's twins and name them to people (``v3``). A twin's
*digest* is a content hash of its tensors: two copies with one digest hold the same twin, whichever process
loaded them and whatever version they are. Both are computed here and nowhere else; the recalibration
watch numbers the refits it makes, and MLflow tracking records what it is given in a
:class:`TwinVersions` registry.

Runs recorded before there was one digest carry another kind of hash (16 hex digits) for their version 0.
A digest is a label, only ever compared for equality: an old value simply names another twin.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["TwinVersions", "active_twin_versions", "next_version", "twin_digest"]


def twin_digest(state: Mapping[str, torch.Tensor]) -> str:
    """The content hash of a twin's tensors (names, shapes, dtypes, values): which twin a copy holds.

    BLAKE2b with a 128-bit digest, as 32 hex digits. Bytes are read through a ``uint8`` view, so every dtype
    hashes (bfloat16 included) and a tensor's digest does not depend on the device it is on.
    """
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def next_version(versions: Iterable[int]) -> int:
    """The number a device's next twin version gets, given the numbers its versions have so far.

    0 for its first (the calibration), then one more than the highest: a refit takes a number whether or
    not it is kept, so numbers are never reused within a run.
    """
    return max((int(v) for v in versions), default=-1) + 1


def active_twin_versions(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The twin in use on each device: its latest accepted version."""
    active: dict[str, int] = {}
    for r in records:
        if r.get("accepted", True):
            device = str(r["device"])
            active[device] = max(active.get(device, -1), int(r["version"]))
    return active


class TwinVersions:
    """Every version of a training's twins, as records (a run's ``twins/versions.json``).

    A record holds at least ``device`` and ``version``; ``step`` (the global step it took over at) and
    ``accepted`` (swapped in, or only recorded) are added when missing. Recording a device's version again
    replaces its record: a run resumed from a checkpoint redoes what came after it. Not locked: its owner
    serialises calls (a refit may be recorded from another thread than the trainer's).
    """

    def __init__(self, records: Iterable[Mapping[str, Any]] = ()) -> None:
        self._records = [dict(r) for r in records]

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record so far, in the order they were recorded (a copy)."""
        return [dict(r) for r in self._records]

    def next_version(self, device: str) -> int:
        """The number the device's next twin version gets (see :func:`next_version`)."""
        return next_version(r["version"] for r in self._records if r["device"] == device)

    def add(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Record one version (replacing the device's record of the same number); returns the record kept."""
        rec = dict(record)
        device, version = str(rec["device"]), int(rec["version"])
        rec.update(device=device, version=version, step=int(rec.get("step") or 0),
                   accepted=bool(rec.get("accepted", True)))
        self._records = [r for r in self._records if (r["device"], int(r["version"])) != (device, version)] + [rec]
        return rec

    def active(self) -> dict[str, int]:
        """The version each device uses (see :func:`active_twin_versions`)."""
        return active_twin_versions(self._records)

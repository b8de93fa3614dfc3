"""Save and load twins as a state_dict plus JSON metadata; never as a pickled object.

A twin is one file, ``NAME.pt``: the tensors and the metadata (kind, config,
the device spec, fit figures, version, creation time) together, read back
with ``weights_only=True``. It is written in one atomic, fsynced step
(:func:`pnn_cluster.fsio.atomic_torch_save`): after a crash at any instant
``NAME.pt`` is the old twin or the new one, whole, never the tensors of one
with the metadata of the other. ``NAME.json`` beside it is a readable copy of
the metadata, written after; loading never needs it.

Twins saved by format 1 (tensors alone in ``NAME.pt``, the metadata only in
``NAME.json``) still load. Loading rebuilds the twin from the metadata and the
device's physics model, then loads the tensors.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pnn_cluster.devices.physics import PhysicsModel
from pnn_cluster.devices.spec import DeviceSpec
from pnn_cluster.fsio import NotATorchFile, atomic_torch_save, atomic_write_text, torch_load_tensors
from pnn_cluster.twins.models import Twin, build_twin

__all__ = ["save_twin", "load_twin", "read_twin_meta", "FORMAT_VERSION", "TwinFileError"]

#: 2: tensors and metadata in NAME.pt; 1: tensors in NAME.pt, metadata in NAME.json
FORMAT_VERSION = 2
READS = (1, 2)
#: the key that marks a format-2 file (a state_dict never has it: its keys are dotted parameter names)
_MARK = "pnn_twin_format"


class TwinFileError(ValueError):
    """A saved twin that cannot be read, or was fitted for another device; the message names the file."""


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".pt", ".json"):
        p = p.with_suffix("")
    return p.with_suffix(".pt"), p.with_suffix(".json")


def save_twin(twin: Twin, path: str | os.PathLike, **meta: Any) -> Path:
    """Write ``path.pt`` (the twin, atomically) and ``path.json`` (a copy of its metadata); returns the ``.pt`` path.

    Extra keyword args go into the metadata; they must be JSON-able (numbers of NumPy are written as floats).
    """
    pt, js = _paths(path)
    record = {
        "format_version": FORMAT_VERSION,
        "kind": twin.kind,
        "config": twin.config(),
        "spec": twin.spec.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **meta,
    }
    text = json.dumps(record, indent=2, default=float)
    # plain JSON types only, so that a weights_only load reads the metadata back
    atomic_torch_save({_MARK: FORMAT_VERSION, "meta": json.loads(text), "state": twin.state_dict()}, pt)
    atomic_write_text(js, text)
    return pt


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], Mapping[str, Any] | None]:
    """The metadata and, for a format-2 file, the tensors (None: format 1, read them from the .pt later)."""
    pt, js = _paths(path)
    if not pt.is_file():
        raise FileNotFoundError(f"{pt}: no such twin file (save one with `pnn-cluster calibrate --save DIR`)")
    try:
        payload = torch_load_tensors(pt)
    except NotATorchFile as exc:
        raise TwinFileError(f"{pt}: not a saved twin ({exc})") from None
    if isinstance(payload, Mapping) and _MARK in payload:
        meta, state = payload.get("meta"), payload.get("state")
        if not isinstance(meta, Mapping) or not isinstance(state, Mapping):
            raise TwinFileError(f"{pt}: a twin file without its metadata or tensors (keys: {sorted(payload)})")
        return _checked_version(dict(meta), pt), state
    if not isinstance(payload, Mapping):
        raise TwinFileError(f"{pt}: holds a {type(payload).__name__}, not a saved twin")
    # format 1: the tensors alone; the metadata is in the .json beside
    if not js.is_file():
        raise TwinFileError(f"{pt}: a twin of format 1 keeps its metadata in {js.name}, which is missing")
    try:
        meta = json.loads(js.read_text())
    except (OSError, ValueError) as exc:
        raise TwinFileError(f"{js}: unreadable twin metadata ({exc})") from None
    return _checked_version(meta, js), payload


def _checked_version(meta: Any, where: Path) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format_version") not in READS:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise TwinFileError(f"{where}: format_version {version!r}, this version reads "
                            f"{', '.join(map(str, READS))}")
    return meta


def read_twin_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a saved twin (kind, config, spec, fit figures...)."""
    return _read(path)[0]


def load_twin(path: str | os.PathLike, model: PhysicsModel | None = None, spec: DeviceSpec | None = None) -> Twin:
    """Rebuild a twin saved by :func:`save_twin`. Physics kinds need the device's ``model()``.

    If ``spec`` is given it must equal the stored one: a twin fitted on another
    device layout is refused rather than silently misused.
    """
    pt, _ = _paths(path)
    meta, state = _read(path)
    try:
        stored = DeviceSpec.from_dict(meta["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TwinFileError(f"{pt}: the twin's device spec cannot be read ({type(exc).__name__}: {exc})") from None
    if spec is not None and spec.to_dict() != stored.to_dict():
        raise TwinFileError(f"{pt}: twin was fitted for device spec {stored.name!r} with a different layout "
                            f"than the device given ({spec.name!r})")
    cfg = meta.get("config", {})
    if "hidden" in cfg:
        cfg = {**cfg, "hidden": tuple(cfg["hidden"])}
    twin = build_twin(meta["kind"], stored, model, **cfg)
    try:
        twin.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]
        raise TwinFileError(f"{pt}: the saved tensors do not fit a {meta['kind']!r} twin of this spec ({detail})") \
            from None
    return twin

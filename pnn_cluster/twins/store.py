"""Save and load twins as a state_dict plus JSON metadata; never as a pickled object.

A twin is stored as two files side by side: ``NAME.pt`` (tensors only, read
back with ``weights_only=True``) and ``NAME.json`` (kind, config, the device
spec, fit figures, version, creation time). Loading rebuilds the twin from the
metadata and the device's physics model, then loads the tensors.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from pnn_cluster.devices.physics import PhysicsModel
from pnn_cluster.devices.spec import DeviceSpec
from pnn_cluster.twins.models import Twin, build_twin

__all__ = ["save_twin", "load_twin", "read_twin_meta", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".pt", ".json"):
        p = p.with_suffix("")
    return p.with_suffix(".pt"), p.with_suffix(".json")


def save_twin(twin: Twin, path: str | os.PathLike, **meta: Any) -> Path:
    """Write ``path.pt`` and ``path.json``; returns the ``.pt`` path. Extra keyword args go into the metadata."""
    pt, js = _paths(path)
    pt.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "format_version": FORMAT_VERSION,
        "kind": twin.kind,
        "config": twin.config(),
        "spec": twin.spec.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **meta,
    }
    # write to temporary names, then rename: a crash never leaves a half-written twin
    tmp_pt, tmp_js = pt.with_suffix(".pt.tmp"), js.with_suffix(".json.tmp")
    torch.save(twin.state_dict(), tmp_pt)
    tmp_js.write_text(json.dumps(record, indent=2, default=float))
    os.replace(tmp_pt, pt)
    os.replace(tmp_js, js)
    return pt


def read_twin_meta(path: str | os.PathLike) -> dict[str, Any]:
    _, js = _paths(path)
    meta = json.loads(js.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{js}: format_version {meta.get('format_version')!r}, this version reads {FORMAT_VERSION}")
    return meta


def load_twin(path: str | os.PathLike, model: PhysicsModel | None = None, spec: DeviceSpec | None = None) -> Twin:
    """Rebuild a twin saved by :func:`save_twin`. Physics kinds need the device's ``model()``.

    If ``spec`` is given it must equal the stored one: a twin fitted on another
    device layout is refused rather than silently misused.
    """
    pt, _ = _paths(path)
    meta = read_twin_meta(path)
    stored = DeviceSpec.from_dict(meta["spec"])
    if spec is not None and spec.to_dict() != stored.to_dict():
        raise ValueError(f"{pt}: twin was fitted for device spec {stored.name!r} with a different layout "
                         f"than the device given ({spec.name!r})")
    cfg = meta.get("config", {})
    if "hidden" in cfg:
        cfg = {**cfg, "hidden": tuple(cfg["hidden"])}
    twin = build_twin(meta["kind"], stored, model, **cfg)
    state = torch.load(pt, map_location="cpu", weights_only=True)
    twin.load_state_dict(state)
    return twin

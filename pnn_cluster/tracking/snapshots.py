"""What a run records about devices and twins: snapshots of each device, its tags, the twins' residuals.

Everything here is made JSON-safe (and cut to MLflow's limits on one value) before it is handed to the
tracker, so a device's odd types (numpy scalars, tensors, non-finite floats) never fail an upload.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pnn_cluster.twins.record import TwinFit

__all__ = ["PARAM_CHARS", "TAG_CHARS", "device_snapshot", "device_tags", "flatten_params", "jsonable",
           "twin_calibration", "twin_residuals"]

#: MLflow's limits on one value: 6000 characters per parameter, 5000 per tag
PARAM_CHARS, TAG_CHARS = 6000, 5000


def jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray | torch.Tensor):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, str | int | float | bool):
        return x
    return str(x)


def twin_calibration(twin: Any) -> dict[str, Any]:
    """The twin's fitted calibration constants (physics kinds), or its kind alone."""
    if twin is None:
        return {}
    out: dict[str, Any] = {"kind": getattr(twin, "kind", type(twin).__name__)}
    model = getattr(twin, "model", None)
    if model is not None and hasattr(model, "calibration_values"):
        out["constants"] = model.calibration_values()
    return out


def device_snapshot(device: Any, driver: Mapping[str, Any] | None = None, placement: Mapping[str, Any] | None = None,
                    twin: Any = None, fit: TwinFit | None = None) -> dict[str, Any]:
    """Spec and limits, driver, identity, current parameters and calibration of one device, JSON-safe."""
    try:
        snap = dict(device.snapshot())
    except Exception as exc:  # a remote device not yet connected has no spec; record what we know
        snap = {"identity": device.identity(), "error": f"no snapshot: {exc}"}
    snap["driver"] = dict(driver) if driver else {"class": snap.get("identity", {}).get("driver", "?")}
    if placement:
        snap["placement"] = dict(placement)
    cal = twin_calibration(twin)
    if fit is not None:
        cal["fit"] = fit.as_dict()
    if cal:
        snap["calibration"] = cal
    return jsonable(snap)


def device_tags(name: str, snap: Mapping[str, Any]) -> dict[str, str]:
    ident = snap.get("identity", {})
    drv = snap.get("driver", {})
    spec = snap.get("spec", {})
    tags = {f"device.{name}.driver": str(drv.get("kind") or drv.get("class") or ident.get("driver", "?"))}
    for key in ("system", "address", "resource", "serial"):
        if key in drv or key in ident:
            tags[f"device.{name}.{key}"] = str(drv.get(key, ident.get(key)))
    if "source" in drv:
        tags[f"device.{name}.resource"] = f"{drv['source'].get('resource')} -> {drv['sink'].get('resource')}"
    if spec:
        tags[f"device.{name}.io"] = f"{spec['input']['size']} -> {spec['output']['size']}"
        tags[f"device.{name}.params"] = ", ".join(f"{p['name']}{tuple(p['shape'])} in [{p['low']:.4g}, {p['high']:.4g}]"
                                                  f"{' ' + p['unit'] if p.get('unit') else ''}"
                                                  for p in spec.get("params", []))
    if "imperfections" in ident:
        tags[f"device.{name}.seed"] = str(ident["imperfections"].get("seed"))
    cal = snap.get("calibration", {})
    if cal.get("kind"):
        tags[f"device.{name}.twin"] = str(cal["kind"])
    return {k: v[:TAG_CHARS] for k, v in tags.items()}


@torch.no_grad()
def twin_residuals(stack: Any, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """How far each twin is from its device, on the inputs the device sees in this stack.

    Runs ``x`` through the stack with every physical layer measured (mode
    ``pat``). At each physical layer with a twin: ``nmse`` is the twin's
    prediction at the same input and parameters against the measurement, and
    ``noise_floor`` the device against itself (the same batch measured again),
    in the same units: a twin cannot do better than the floor, and a ratio that
    grows over a training says the device has drifted away from its twin.
    Layers without a twin (``oracle``) are skipped.
    """
    from pnn_cluster.layers import PhysicalLayer
    from pnn_cluster.twins.collect import nmse

    out: dict[str, dict[str, float]] = {}
    h = x
    with stack.mode_as("pat"):
        for m in stack:
            if isinstance(m, PhysicalLayer):
                y = m(h)
                if m.twin is not None:
                    again = m.measure(h)
                    var = y.double().var().clamp_min(1e-30)
                    out[m.name] = {"nmse": nmse(m.twin(h, dict(m.theta.items())), y),
                                   "noise_floor": float(((again.double() - y.double()) ** 2).mean() / 2 / var)}
                h = y
            else:
                h = m(h)
    return out


def flatten_params(tree: Any, prefix: str = "") -> dict[str, str]:
    """A nested configuration as MLflow parameters: dotted keys, string values cut to MLflow's limit."""
    from pnn_cluster.config import flatten

    return {k: ("" if v is None else str(v))[:PARAM_CHARS] for k, v in flatten(tree, prefix).items()}


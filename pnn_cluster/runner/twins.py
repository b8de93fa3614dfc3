"""Making each device replica's twin, as its configuration says: fitted, the ideal model, or loaded."""

from __future__ import annotations

import time
from typing import Any

from pnn_cluster.config import TwinConfig
from pnn_cluster.runner.placement import DeviceRef
from pnn_cluster.training.pipeline import TwinPool
from pnn_cluster.twins import TwinFit, build_twin, evaluate_twin, fit_twin, load_twin

__all__ = ["make_twin", "twin_shell"]


def _options(tc: TwinConfig) -> dict[str, Any]:
    return {"hidden": tuple(tc.hidden)} if tc.hidden else {}


def twin_shell(tc: TwinConfig, ref: DeviceRef):
    """An unfitted twin of the configured kind, so a checkpoint's state_dict (twins included) loads into it."""
    device = ref.device
    if tc.load is not None:
        twin = load_twin(tc.load, model=device.model(), spec=device.spec).requires_grad_(False)
    else:
        kind = "physics" if tc.kind == "ideal" else tc.kind
        twin = build_twin(kind, device.spec, _model_of(ref, kind), **_options(tc))
    return twin  # frozen by the layer it is given to: a twin supplies Jacobians, only a fit moves it


def _model_of(ref: DeviceRef, kind: str):
    model = ref.device.model()
    if model is None and kind in ("physics", "residual"):
        raise ValueError(f"device {ref.label}: twin {kind!r} starts from the device's physics model, and "
                         f"{type(ref.device).__name__}.model() returned None; allowed: twin.kind mlp, or a model() "
                         "in the device class, or driver.model")
    return model


def make_twin(ref: DeviceRef, tc: TwinConfig, twin, pool: TwinPool | None, seed: int,
              progress: bool = False) -> TwinFit:
    """Collect samples next to the device and make ``twin`` (a :func:`twin_shell`) describe it.

    With a ``pool`` (twin copies elsewhere, started from the shell) the fit runs in the first copy and
    every copy takes its result; ``twin``, the trainer's copy, takes it too (for in-silico passes and
    checkpoints). Without one the fit runs here.
    """
    device = ref.device
    t0 = time.perf_counter()
    if tc.load is not None:
        groups = max(3, tc.groups // 4)  # a short check of the loaded twin against the device as it is today
        val = ref.collect(groups=groups, batch=tc.batch, repeats=tc.repeats, seed=seed, progress=progress)
        return TwinFit(ref.label, twin, twin.kind, evaluate_twin(twin, val), val.noise_floor(),
                       device_samples=val.device_samples, seconds=time.perf_counter() - t0, val=val, source="loaded")
    samples = ref.collect(groups=tc.groups, batch=tc.batch, repeats=tc.repeats, seed=seed, progress=progress)
    train, val = samples.split(tc.holdout, seed=seed)
    model = device.model()
    ideal = None
    if model is not None:
        ideal = evaluate_twin(build_twin("physics", device.spec, model).requires_grad_(False), val)
    if tc.kind == "ideal":
        return TwinFit(ref.label, twin, "ideal", ideal, val.noise_floor(), evaluate_twin(twin, train), ideal,
                       samples.device_samples, time.perf_counter() - t0, val=val, source="ideal")
    if pool is not None:
        figures = pool.refit(train, val, epochs=tc.epochs, lr=tc.lr, seed=seed)
        twin.load_state_dict(dict(pool.payload["state"]))
        twin.requires_grad_(False)
        nmse_val, floor, nmse_train = figures["nmse_val"], figures["noise_floor"], figures["nmse_train"]
        history = list(figures.get("history", []))
    else:
        res = fit_twin(twin, train, val, epochs=tc.epochs, lr=tc.lr, seed=seed, progress=progress)
        twin.requires_grad_(False)
        nmse_val, floor, nmse_train, history = res.nmse_val, res.noise_floor, res.nmse_train, list(res.history)
    return TwinFit(ref.label, twin, tc.kind, nmse_val, floor, nmse_train, ideal, samples.device_samples,
                   time.perf_counter() - t0, history, val, "fit")

"""Making each device replica's twin, as its configuration says: fitted, the ideal model, or loaded.

A fitted twin's samples are split three ways by parameter setting: the fit's own, a few for early
stopping and for choosing between twin kinds (``kind: best``), and the held-out ones (``holdout``)
on which its NMSE is reported next to the noise floor, measured once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from pnn_cluster.config import TwinConfig
from pnn_cluster.runner.placement import DeviceRef
from pnn_cluster.training.pipeline import TwinPool
from pnn_cluster.training.workers import twin_payload
from pnn_cluster.twins import TwinFit, build_twin, evaluate_twin, fit_twin, load_twin
from pnn_cluster.twins.fit import fit_splits
from pnn_cluster.twins.models import kinds_for
from pnn_cluster.twins.sequential import calibrate_sequential
from pnn_cluster.twins.versions import twin_digest

__all__ = ["make_twin", "twin_shell", "candidate_kinds", "ReplicaTwins"]


def _options(tc: TwinConfig, kind: str) -> dict[str, Any]:
    # hidden: [] is meaningful (a residual twin of couplings only; a linear MLP twin)
    return {"hidden": tuple(tc.hidden)} if tc.hidden is not None and kind in ("mlp", "residual") else {}


def candidate_kinds(tc: TwinConfig, ref: DeviceRef) -> list[str]:
    """The kinds a fit tries: the configured one, or for ``best`` every kind this device allows."""
    if tc.kind != "best":
        return [tc.kind]
    return kinds_for(ref.device.model())


def twin_shell(tc: TwinConfig, ref: DeviceRef, kind: str | None = None):
    """An unfitted twin of the configured kind (or ``kind``, the one ``best`` chose), so a checkpoint's
    state_dict (twins included) loads into it."""
    device = ref.device
    if tc.load is not None:
        twin = load_twin(tc.load, model=device.model(), spec=device.spec).requires_grad_(False)
    else:
        kind = kind or ("physics" if tc.kind == "ideal" else tc.kind)
        if kind == "best":
            return None  # made by the fit: which kind it is, the samples decide
        twin = build_twin(kind, device.spec, _model_of(ref, kind), **_options(tc, kind))
    return twin  # frozen by the layer it is given to: a twin supplies Jacobians, only a fit moves it


def _model_of(ref: DeviceRef, kind: str):
    model = ref.device.model()
    if model is None and kind != "mlp":
        raise ValueError(f"device {ref.label}: twin {kind!r} starts from the device's physics model, and "
                         f"{type(ref.device).__name__}.model() returned None; allowed: twin.kind mlp, or a model() "
                         "in the device class, or driver.model")
    return model


def make_twin(ref: DeviceRef, tc: TwinConfig, twin, pool: TwinPool | None, seed: int,
              progress: bool = False) -> TwinFit:
    """Collect samples next to the device and make ``twin`` (a :func:`twin_shell`) describe it.

    With a ``pool`` (twin copies elsewhere, started from the shell) the fit runs in the first copy and
    every copy takes its result; ``twin``, the trainer's copy, takes it too (for in-silico passes and
    checkpoints). Without one the fit runs here. For ``kind: best`` (``twin`` None) every kind the device
    allows (:func:`candidate_kinds`: physics, residual, mlp, and structured where its physics model has a
    structure) is fitted here on the same samples, and the one with the lowest NMSE on the early-stopping
    samples is kept; every candidate's figures are in ``TwinFit.candidates``. The physics twin is fitted
    first and the kinds built around physics start from its constants, so none of them ends worse than it
    on the early-stopping samples (and none fits the constants a second time).
    """
    device = ref.device
    t0 = time.perf_counter()
    if tc.load is not None:
        groups = max(3, tc.groups // 4)  # a short check of the loaded twin against the device as it is today
        val = ref.collect(groups=groups, batch=tc.batch, repeats=tc.repeats, seed=seed, progress=progress)
        return TwinFit(ref.label, twin, twin.kind, evaluate_twin(twin, val), val.noise_floor(),
                       device_samples=val.device_samples, seconds=time.perf_counter() - t0, val=val, source="loaded")
    if tc.sequential is not None:
        return _sequential(ref, tc, twin, pool, seed, progress)
    samples = ref.collect(groups=tc.groups, batch=tc.batch, repeats=tc.repeats, seed=seed, progress=progress)
    fit_on, stop, val = fit_splits(samples, tc.holdout, seed)
    train = fit_on + stop if stop is not None else fit_on
    model = device.model()
    ideal = None
    if model is not None:
        ideal = evaluate_twin(build_twin("physics", device.spec, model).requires_grad_(False), val)
    if tc.kind == "ideal":
        return TwinFit(ref.label, twin, "ideal", ideal, val.noise_floor(), evaluate_twin(twin, train), ideal,
                       samples.device_samples, time.perf_counter() - t0, val=val, source="ideal")
    candidates: dict[str, dict[str, Any]] = {}
    kind = tc.kind
    if tc.kind == "best":
        fitted = {}
        for k in candidate_kinds(tc, ref):
            t = build_twin(k, device.spec, model, **_options(tc, k))
            calibrated = _start_from_physics(t, fitted.get("physics"))
            res = fit_twin(t, fit_on, val, epochs=tc.epochs, lr=tc.lr, seed=seed, progress=progress, stop=stop,
                           calibrated=calibrated)
            fitted[k] = (t, res)
            candidates[k] = res.as_dict()
        kind = min(fitted, key=lambda k: fitted[k][1].nmse_stop if stop is not None else fitted[k][1].nmse_train)
        twin, res = fitted[kind]
        twin.requires_grad_(False)
        nmse_val, floor, nmse_train, history = res.nmse_val, res.noise_floor, res.nmse_train, list(res.history)
    elif pool is not None:
        figures = pool.refit(fit_on, val, epochs=tc.epochs, lr=tc.lr, seed=seed, stop=stop)
        twin.load_state_dict(dict(pool.payload["state"]))
        twin.requires_grad_(False)
        nmse_val, floor, nmse_train = figures["nmse_val"], figures["noise_floor"], figures["nmse_train"]
        history = list(figures.get("history", []))
    else:
        res = fit_twin(twin, fit_on, val, epochs=tc.epochs, lr=tc.lr, seed=seed, progress=progress, stop=stop)
        twin.requires_grad_(False)
        nmse_val, floor, nmse_train, history = res.nmse_val, res.noise_floor, res.nmse_train, list(res.history)
    return TwinFit(ref.label, twin, kind, nmse_val, floor, nmse_train, ideal, samples.device_samples,
                   time.perf_counter() - t0, history, val, "fit", candidates)


def _sequential(ref: DeviceRef, tc: TwinConfig, twin, pool: TwinPool | None, seed: int, progress: bool) -> TwinFit:
    """``twin.sequential``: measured in rounds where the twin is least sure, fitted here, until its held-out
    error is within the configured factor of the floor or the budget is spent; twin copies elsewhere take
    the result."""
    model = ref.device.model()
    ideal = None
    res = calibrate_sequential(twin, tc.sequential.plan(tc.batch), measure=ref.collect, seed=seed,
                               progress=progress)
    twin.requires_grad_(False)
    if model is not None:
        ideal = evaluate_twin(build_twin("physics", ref.device.spec, model).requires_grad_(False), res.holdout)
    if pool is not None:
        payload = twin_payload(twin)
        pool.update(payload, twin_digest(payload["state"]))
    return res.twin_fit(ref.label, ideal)


def _start_from_physics(twin, physics) -> bool:
    """Give ``twin`` the calibration constants of the fitted physics twin ``(twin, result)``, when it is built
    around the same physics model; True when it took them (its fit then skips its own physics stage)."""
    if physics is None or not hasattr(twin, "fit_stages") or not hasattr(twin, "model"):
        return False
    twin.model.load_state_dict(physics[0].model.state_dict())
    return True


class ReplicaTwins:
    """Every device replica's twin, by replica label: the one place a run's twins are kept and checkpointed.

    Replica 0's twin is also its layer's ``twin`` (the in-process backward pass uses it) and each replica's
    is its pipeline :class:`~pnn_cluster.training.pipeline.Replica`'s; both point at the objects held here.
    :class:`~pnn_cluster.training.trainer.Stateful`: a checkpoint holds each twin's kind (the one ``kind: best``
    chose, so a resumed or evaluated run rebuilds the same) and the weights of replicas other than 0 (replica
    0's are in the model's own state_dict), taken when the checkpoint is, refinements included.
    """

    state_key = "twins"

    def __init__(self, twins: Mapping[str, Callable | None] | None = None) -> None:
        self.twins: dict[str, Callable | None] = dict(twins or {})
        self.primary: set[str] = set()  # labels of replica 0 of each device

    def add(self, label: str, twin: Callable | None, primary: bool) -> None:
        self.twins[label] = twin
        if primary:
            self.primary.add(label)

    def kinds(self) -> dict[str, str]:
        return {label: twin.kind for label, twin in self.twins.items() if getattr(twin, "kind", None)}

    def state_dict(self) -> dict[str, Any]:
        return {"kinds": self.kinds(),
                "weights": {label: twin.state_dict() for label, twin in self.twins.items()
                            if label not in self.primary and twin is not None}}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        for label, weights in ((state or {}).get("weights") or {}).items():
            twin = self.twins.get(label)
            if twin is not None and label not in self.primary:
                twin.load_state_dict(weights)

    @classmethod
    def saved(cls, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        """What a checkpoint holds of the twins, ``{"kinds": ..., "weights": ...}``; checkpoints written before
        this component existed kept them under ``twin_kinds`` and ``replica_twins``."""
        extra = checkpoint.get("extra") or {}
        if cls.state_key in extra:
            return dict(extra[cls.state_key])
        return {"kinds": extra.get("twin_kinds") or {}, "weights": extra.get("replica_twins") or {}}

"""Fit twins to measured samples, validate them against the device's noise floor."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pnn_cluster.devices.base import Device
from pnn_cluster.twins.collect import Samples, collect, nmse
from pnn_cluster.twins.models import Twin, build_twin

__all__ = ["FitResult", "fit_splits", "fit_twin", "evaluate_twin", "Calibration", "calibrate", "DEFAULT_FIT"]

#: epochs, learning rate, and optionally weight decay, batch and warm-up epochs (the rate rising linearly)
#: per twin kind and per fit stage (a residual or structured twin's first stage is a physics fit): physics
#: fits a handful of constants, the MLP many weights; a structured twin's time-stepping costs about the
#: same per step at 512 samples as at 128
DEFAULT_FIT: dict[str, dict[str, Any]] = {
    "physics": {"epochs": 30, "lr": 2e-2},
    "residual": {"epochs": 80, "lr": 1e-3, "warmup": 5},
    "joint": {"epochs": 80, "lr": 1e-3, "warmup": 5},
    "mlp": {"epochs": 150, "lr": 2e-3},
    "structured": {"epochs": 40, "lr": 1e-2, "batch": 512},
}
#: weight of a twin's ``penalty()`` (the size of its learned couplings) against the normalised squared error
PENALTY = 1e-4
#: epochs without a better NMSE on the early-stopping samples before a fit stops
PATIENCE = 15
#: samples per step when a twin takes one parameter setting per sample
BATCH = 128
#: standard errors by which a fit stage's state must beat the one it began from on the early-stopping
#: settings (paired by setting) to be kept: about 2.5% odds that chance alone keeps a change that does not help
SIGNIFICANCE = 2.0
#: the share of a fit's settings held out for early stopping and for choosing between twin kinds
STOP_FRACTION = 0.15


def fit_splits(samples: Samples, holdout: float, seed: int) -> tuple[Samples, Samples | None, Samples]:
    """Three ways by parameter setting: the fit's own, the early-stopping ones (None when too few settings),
    and the ``holdout`` ones on which the twin's NMSE is reported, measured once."""
    train, val = samples.split(holdout, seed=seed)
    fit_on, stop = train.split(STOP_FRACTION, seed=seed + 1) if len(train) >= 6 else (train, None)
    return fit_on, stop, val


@dataclass
class FitResult:
    kind: str
    nmse_train: float
    nmse_val: float
    noise_floor: float
    seconds: float
    history: list[float] = field(default_factory=list)
    #: NMSE on the early-stopping samples at the epoch kept (None: no early stopping)
    nmse_stop: float | None = None
    #: the epoch whose state was kept (1-based; the last one without early stopping)
    best_epoch: int | None = None
    #: each stage that ran, in order: ``{"stage", "epochs", "nmse_stop", "kept"}`` (``nmse_stop``: its best
    #: on the early-stopping samples, None without them; ``kept``: whether the fit went on from its state)
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ratio_to_floor(self) -> float:
        return self.nmse_val / self.noise_floor if self.noise_floor > 0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nmse_train": self.nmse_train, "nmse_val": self.nmse_val,
                "noise_floor": self.noise_floor, "ratio_to_floor": self.ratio_to_floor, "seconds": self.seconds,
                "nmse_stop": self.nmse_stop, "best_epoch": self.best_epoch, "stages": list(self.stages)}


def _pooled(samples: Samples, dtype: torch.dtype):
    """Every sample with its own parameter setting: x (N, n_in), params {name: (N, *shape)}, mean y (N, n_out).

    The mean of a sample's repeats is the target: its squared error differs from the mean squared
    error over the repeats by a constant (their spread), so the fit's minimum is the same.
    """
    xs = torch.as_tensor(np.concatenate(samples.x), dtype=dtype)
    names = list(samples.params[0]) if samples.params else []
    ps = {n: torch.as_tensor(np.concatenate([np.broadcast_to(p[n], (len(x), *np.shape(p[n])))
                                             for x, p in zip(samples.x, samples.params)]), dtype=dtype)
          for n in names}
    ys = torch.as_tensor(np.concatenate([y.mean(0) for y in samples.y]), dtype=dtype)
    return xs, ps, ys


def _tensor(a, dtype: torch.dtype) -> torch.Tensor:
    # samples that came through Ray's object store are read-only arrays: torch shares only writable memory
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()
    return torch.as_tensor(a, dtype=dtype)


def _tensors(samples: Samples, dtype: torch.dtype):
    for x, p, y in zip(samples.x, samples.params, samples.y):
        yield _tensor(x, dtype), {k: _tensor(v, dtype) for k, v in p.items()}, _tensor(y, dtype)


#: samples per forward pass when a twin that takes one setting per sample is evaluated
EVAL_CHUNK = 4096


@torch.no_grad()
def _predictions(twin: Twin, samples: Samples) -> list[torch.Tensor]:
    """The twin's prediction for each group of ``samples``, (batch, n_out) each."""
    dtype = torch.get_default_dtype()
    if getattr(twin, "batched_params", False) and len(samples):
        # many settings per forward pass: a time-stepping model costs about the same per pass at any batch
        x, p, _ = _pooled(samples, dtype)
        pred = torch.cat([twin(x[i:i + EVAL_CHUNK], {n: v[i:i + EVAL_CHUNK] for n, v in p.items()})
                          for i in range(0, len(x), EVAL_CHUNK)])
        return list(pred.split([len(x) for x in samples.x]))
    return [twin(x, p) for x, p, _ in _tensors(samples, dtype)]


@torch.no_grad()
def evaluate_twin(twin: Twin, samples: Samples) -> float:
    """NMSE of the twin's prediction against every measurement (repeats included)."""
    dtype = torch.get_default_dtype()
    preds, targets = [], []
    for pred, y in zip(_predictions(twin, samples), samples.y):
        y = _tensor(y, dtype)
        preds.append(pred.expand(y.shape[0], *pred.shape).reshape(-1))
        targets.append(y.reshape(-1))
    return nmse(torch.cat(preds), torch.cat(targets))


@torch.no_grad()
def _group_errors(twin: Twin, samples: Samples) -> np.ndarray:
    """Each group's squared error (repeats included), in units of the variance of all of ``samples``."""
    var = max(float(np.concatenate([y.reshape(-1) for y in samples.y]).var()), 1e-30)
    return np.array([float(((pred.double().numpy()[None] - y) ** 2).mean()) / var
                     for pred, y in zip(_predictions(twin, samples), samples.y)])


def _stages(twin: Twin) -> list[tuple[str, tuple[str, ...] | None]]:
    """What a fit trains, in order: (the DEFAULT_FIT entry it takes its settings from, the parameter-name
    prefixes it moves, None for all)."""
    stages = getattr(twin, "fit_stages", None)
    return list(stages()) if stages is not None else [(twin.kind, None)]


def fit_twin(twin: Twin, train: Samples, val: Samples | None = None, epochs: int | None = None,
             lr: float | None = None, seed: int = 0, progress: bool = True, stop: Samples | None = None,
             patience: int = PATIENCE, batch_size: int | None = None, output_stats: bool = True,
             weight_decay: float | None = None, calibrated: bool = False) -> FitResult:
    """Adam (AdamW with weight decay) on the normalised squared error, cosine-decayed, in stages.

    A twin whose forward takes one parameter setting per sample (``twin.batched_params``: the MLP,
    and physics twins whose model says so) steps on ``batch_size`` samples (default: the stage's
    ``batch`` in DEFAULT_FIT, else :data:`BATCH`) drawn across all parameter settings, so every step
    sees many settings; any other twin steps on one setting
    (one collected group) at a time.

    Stages (``twin.fit_stages()``): a twin built around physics fits the physics model's calibration
    constants first, exactly as a physics twin does, and only then what it adds, starting from there.
    ``calibrated=True`` says the constants were fitted already (a physics twin's, copied in): the first
    stage is skipped. ``epochs``, ``lr``, ``weight_decay`` and ``batch_size`` override every stage's
    defaults. Only
    parameters that require grad when the fit starts ever move (a refinement may pin all but a few).

    With ``stop`` samples (held out from ``train``, never ``val``) the NMSE on them is measured before
    the fit and after every epoch, the best state is kept, and a stage ends after ``patience`` epochs
    without a better one: a twin with many weights stops before it learns the noise of its samples.
    Since the state the fit started from competes too, a fit never ends worse on the stopping samples
    than where it began: a residual twin never worse than its fitted physics, an MLP twin (which starts
    at the mean) never worse than the mean; an MLP twin's networks are then scaled towards the mean by
    the factor in [0, 1] that is best on the stopping samples. ``val`` is only measured, at the end.

    ``output_stats=False`` keeps the twin's output normalisation as it is (a refinement on a few local
    samples must not rescale what its couplings and network learned over the whole range).
    """
    dtype = torch.get_default_dtype()
    data = list(_tensors(train, dtype))
    if output_stats:
        twin.set_output_stats(torch.cat([y.reshape(-1, y.shape[-1]) for _, _, y in data]))
    pooled = _pooled(train, dtype) if getattr(twin, "batched_params", False) else None
    movable = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    t0 = time.perf_counter()
    history: list[float] = []
    rng = np.random.default_rng(seed)
    members = getattr(twin, "member_outputs", None)
    penalty = getattr(twin, "penalty", None)
    # the state the fit starts from is the first candidate
    nmse_stop = evaluate_twin(twin, stop) if stop is not None else None
    best_epoch = 0 if stop is not None else None
    moved: set[str] | None = None
    ran: list[dict[str, Any]] = []
    stages = _stages(twin)
    if calibrated and len(stages) > 1:
        stages = stages[1:]
    for stage, prefixes in stages:
        cfg = DEFAULT_FIT.get(stage, DEFAULT_FIT["mlp"])
        n_epochs = int(cfg["epochs"] if epochs is None else epochs)
        step_lr = float(cfg["lr"] if lr is None else lr)
        wd = float(cfg.get("weight_decay", 0.0) if weight_decay is None else weight_decay)
        batch = int(cfg.get("batch", BATCH) if batch_size is None else batch_size)
        steps = math.ceil(len(pooled[0]) / batch) if pooled is not None else len(data)
        names = {n for n in movable if prefixes is None or n.startswith(prefixes)}
        if not names or names == moved or n_epochs <= 0:
            continue  # nothing (new) to move in this stage
        moved = names
        trainable = [movable[n] for n in sorted(names)]
        for n, p in movable.items():
            p.requires_grad_(n in names)
        opt = torch.optim.AdamW(trainable, lr=step_lr, weight_decay=wd) if wd > 0 \
            else torch.optim.Adam(trainable, lr=step_lr)
        total = n_epochs * steps
        # a correction that starts at zero beside fitted physics: Adam's first steps move every one of its
        # many weights by about the full rate at once, which undoes the physics fit before it helps
        warm = max(1, int(cfg.get("warmup", 0)) * steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s, total=total, warm=warm: min(1.0, (s + 1) / warm)
            * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        bar = tqdm(range(n_epochs), desc=f"fit {twin.kind} twin ({stage})", unit="epoch", disable=not progress,
                   leave=False)
        inv_std = 1.0 / twin.y_std
        waited = 0
        if stop is not None:
            begin = (_state(twin), nmse_stop, best_epoch, _group_errors(twin, stop))
            best_state = None
        for _ in bar:
            running = 0.0
            order = rng.permutation(len(pooled[0]) if pooled is not None else len(data))
            for k in range(steps):
                if pooled is not None:
                    idx = torch.as_tensor(order[k * batch:(k + 1) * batch])
                    x, p, y = pooled[0][idx], {n: v[idx] for n, v in pooled[1].items()}, pooled[2][idx]
                    pred = members(x, p) if members is not None else twin(x, p)
                else:
                    x, p, y = data[order[k]]
                    pred = (members(x, p) if members is not None else twin(x, p)).unsqueeze(-3)
                loss = (((pred - y) * inv_std) ** 2).mean()
                if penalty is not None:
                    loss = loss + PENALTY * penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += float(loss.detach())
            history.append(running / steps)
            postfix = {"loss": f"{history[-1]:.3g}"}
            if stop is not None:
                score = evaluate_twin(twin, stop)
                postfix["stop_nmse"] = f"{score:.3g}"
                if score < nmse_stop:
                    nmse_stop, best_epoch, waited = score, len(history), 0
                    best_state = _state(twin)
                else:
                    waited += 1
            bar.set_postfix(postfix)
            if stop is not None and waited >= patience:
                break
        epochs_run = len(history) - sum(r["epochs"] for r in ran)
        if stop is None:
            ran.append({"stage": stage, "epochs": epochs_run, "nmse_stop": None, "kept": True})
            continue
        if best_state is not None:
            twin.load_state_dict(best_state)
            if hasattr(twin, "shrink"):
                nmse_stop = _shrink_to_mean(twin, stop)
        # what this stage learned stays only where it helps beyond chance on the stopping settings;
        # the next stage starts from whichever state that is
        kept = best_state is not None and _better_beyond_chance(begin[3], _group_errors(twin, stop))
        ran.append({"stage": stage, "epochs": epochs_run, "nmse_stop": float(nmse_stop), "kept": kept})
        if not kept:
            twin.load_state_dict(begin[0])
            nmse_stop, best_epoch = begin[1], begin[2]
    for p in movable.values():
        p.requires_grad_(True)
    seconds = time.perf_counter() - t0
    nmse_train = evaluate_twin(twin, train)
    held = val if val is not None else train
    floor = held.noise_floor() if all(y.shape[0] > 1 for y in held.y) else float("nan")
    if best_epoch is None and history:
        best_epoch = len(history)
    return FitResult(twin.kind, nmse_train, evaluate_twin(twin, held), floor, seconds, history, nmse_stop, best_epoch,
                     ran)


def _better_beyond_chance(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether the per-setting errors ``after`` are lower than ``before`` by more than :data:`SIGNIFICANCE`
    standard errors of their paired difference (a few settings that happen to favour a twin do not count)."""
    d = before - after
    if len(d) < 2:
        return bool(d.mean() > 0)
    return bool(d.mean() > SIGNIFICANCE * d.std(ddof=1) / math.sqrt(len(d)))


def _state(twin: Twin) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in twin.state_dict().items()}


@torch.no_grad()
def _shrink_to_mean(twin: Twin, stop: Samples) -> float:
    """Scale what ``twin`` adds to its mean output by the least-squares factor on ``stop``, clipped to [0, 1];
    returns the NMSE on ``stop`` after. The factor's NMSE is at most that of either end: the fitted twin (1)
    and the mean (0)."""
    dtype = torch.get_default_dtype()
    num = den = 0.0
    for x, p, y in _tensors(stop, dtype):
        m = twin(x, p) - twin.y_mean
        r = y - twin.y_mean
        num += float((r * m).sum())
        den += float((m * m).sum()) * y.shape[0]
    factor = min(1.0, max(0.0, num / den)) if den > 0 else 1.0
    if factor < 1.0:
        twin.shrink(factor)
    return evaluate_twin(twin, stop)


@dataclass
class Calibration:
    """What ``calibrate`` found: every twin tried, the best one, and the raw samples."""

    results: dict[str, FitResult]
    twins: dict[str, Twin]
    noise_floor: float
    ideal_nmse: float | None
    device_samples: int
    train: Samples
    val: Samples

    @property
    def best_kind(self) -> str:
        """The kind with the lowest NMSE on the early-stopping settings (held-out ``val`` only reports)."""
        def score(k: str) -> float:
            r = self.results[k]
            return r.nmse_stop if r.nmse_stop is not None else r.nmse_val
        return min(self.results, key=score)

    @property
    def best(self) -> Twin:
        return self.twins[self.best_kind]

    def table(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.results.values()]


def calibrate(device: Device, kinds: Iterable[str] = ("physics", "residual", "mlp"), groups: int = 40,
              batch: int = 128, repeats: int = 2, holdout: float = 0.2, seed: int = 0,
              fit_overrides: dict[str, dict[str, Any]] | None = None, progress: bool = True,
              samples: Samples | None = None) -> Calibration:
    """Collect samples, fit each twin kind, validate on held-out parameter settings.

    Three splits by parameter setting: the fit's, 15% of the rest for early stopping and for choosing
    the best kind, and ``holdout`` on which every kind's NMSE is reported next to the noise floor.
    """
    if samples is None:
        samples = collect(device, groups=groups, batch=batch, repeats=repeats, seed=seed, progress=progress)
    fit_on, stop, val = fit_splits(samples, holdout, seed)
    train = fit_on + stop if stop is not None else fit_on
    model = device.model()
    kinds = [k for k in kinds if model is not None or k == "mlp"]
    results, twins = {}, {}
    ideal = None
    if model is not None:
        ideal = evaluate_twin(build_twin("physics", device.spec, model).requires_grad_(False), val)
    for kind in kinds:
        twin = build_twin(kind, device.spec, model)
        over = (fit_overrides or {}).get(kind, {})
        results[kind] = fit_twin(twin, fit_on, val, seed=seed, progress=progress, stop=stop, **over)
        twins[kind] = twin
    return Calibration(results, twins, val.noise_floor(), ideal, samples.device_samples, train, val)

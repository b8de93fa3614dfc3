"""Sequential calibration: measure next where the twin is least sure, refit, stop near the noise floor.

A calibration that measures uniform random settings spends most of its samples where the twin is already
right. Here the samples come in rounds:

1. a few settings measured twice (``holdout_groups``): the held-out set on which the stopping rule reads
   the twin's NMSE and the device's noise floor; each fit stops early on it together with a share of the
   measured settings drawn afresh each round (so that every measured setting is fitted on in most rounds);
2. ``initial_groups`` uniform random settings, each measured ``repeats`` times (default once: a repeat only
   tells the noise floor, which the held-out set already measures; a new input teaches the twin more);
3. each round fits an ensemble of ``ensemble`` twins of one kind, warm-started from the round before: the
   first on every group measured so far (the twin kept), the others on bootstrap draws of the groups. Their
   disagreement, the variance of their predictions in units of the output's spread, scores
   ``candidates`` x as many random settings (each on the inputs it would be measured with) as the round
   adds; the most disputed are measured. Where the twin's family cannot represent the device, members
   disagree where the data are thin, which is where a new sample moves the fit most (query by committee,
   Seung, Opper & Sompolinsky, COLT 1992; for regression, Burbidge, Rowland & King, IDEAL 2007);
4. it stops when the twin's held-out NMSE is within ``factor`` of the held-out floor, or when the next round
   would pass ``budget`` device samples (held-out ones included), or when ``stop(twin, samples)`` (a caller's
   own rule, e.g. a benchmark's target) says so.

Each round adds ``growth`` x the groups measured so far, so the number of rounds (and warm-started fits)
grows with the logarithm of the budget. With ``near`` > 0 that share of the candidates is drawn near an
operating region (:class:`~pnn_cluster.twins.operating.RegionDraw`): a run being resumed calibrates where it
trains. :data:`SEQUENTIAL_BOUNDS` states every setting's range once; the configuration's schema takes them.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pnn_cluster.devices.base import Device
from pnn_cluster.twins.collect import Samples, collect, uniform_inputs, uniform_params
from pnn_cluster.twins.fit import PATIENCE, STOP_FRACTION, evaluate_twin, fit_twin
from pnn_cluster.twins.models import Twin
from pnn_cluster.twins.operating import LayerRegion, RegionDraw
from pnn_cluster.twins.record import TwinFit

__all__ = ["SequentialPlan", "SequentialResult", "SEQUENTIAL_BOUNDS", "calibrate_sequential", "disagreement"]

#: each setting's range, in pydantic's terms (``ge``/``le`` inclusive, ``gt`` exclusive); stated once
SEQUENTIAL_BOUNDS: dict[str, dict[str, float]] = {
    "budget": {"ge": 16, "le": 10**9}, "factor": {"ge": 0.0, "le": 1e6},
    "initial_groups": {"ge": 2, "le": 100_000}, "holdout_groups": {"ge": 2, "le": 100_000},
    "growth": {"gt": 0.0, "le": 10.0}, "ensemble": {"ge": 2, "le": 16}, "candidates": {"ge": 1, "le": 100},
    "round_epochs": {"ge": 1, "le": 100_000}, "first_epochs": {"ge": 0, "le": 100_000},
    "repeats": {"ge": 1, "le": 100}, "batch": {"ge": 1, "le": 100_000},
    "near": {"ge": 0.0, "le": 1.0}, "spread": {"ge": 0.0, "le": 1.0}, "stop_share": {"ge": 0.0, "le": 0.5},
}


@dataclass(frozen=True)
class SequentialPlan:
    """Budgets and stopping rule of a sequential calibration (see the module's docstring).

    The defaults come from runs on seed 1 of ``scripts/bench_pat.py --sections twins --twin-seed 1`` (the
    benchmark's own figures are seed 0's), on SHG (24/24) and the circuit (24/24): the best twins fitted on
    20,000 random samples came to 1.13x (SHG's residual twin) and 1.13x (the circuit's physics twin) their
    noise floors; ``factor`` 1.5 stops the circuit's physics twin after its first round (1,408 samples, NMSE
    within 1 % of the 20,000-sample twin's) and SHG's residual twin at about 5,600 samples (1.36x the floor);
    ``budget`` is half the shipped calibrations' 20,000. ``cold``: with warm refits SHG's twin stalled at
    1.12x the 20,000-sample twin's NMSE (1.26x the floor) from 5,648 samples on; refitted in full each round
    it kept improving, to 1.05x at 10,000 samples.
    """

    budget: int = 10_000
    factor: float = 1.5
    initial_groups: int = 40
    holdout_groups: int = 24
    growth: float = 0.5
    ensemble: int = 3
    candidates: int = 4
    round_epochs: int = 20
    #: epochs of the first fit (and of every fit of the kept twin with ``cold``); 0: each fit stage's default
    first_epochs: int = 0
    #: the kept twin refitted from its initial state each round (the ensemble's others stay warm-started)
    cold: bool = True
    repeats: int = 1
    batch: int = 16
    near: float = 0.0
    spread: float = 0.05
    #: the share of the measured groups the kept twin stops early on beside the held-out set, drawn afresh each
    #: round (0: the held-out set alone; every measured group is then fitted on)
    stop_share: float = STOP_FRACTION

    def __post_init__(self) -> None:
        for name, bounds in SEQUENTIAL_BOUNDS.items():
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and v >= bounds.get("ge", -math.inf) and v > bounds.get("gt", -math.inf)
            if not (ok and v <= bounds.get("le", math.inf)):
                allowed = " and ".join(f"{'>=' if k == 'ge' else '>' if k == 'gt' else '<='} {b:g}"
                                       for k, b in bounds.items())
                raise ValueError(f"SequentialPlan.{name} must be a number {allowed}, got {v!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SequentialResult:
    """The twin kept, every sample measured, and each round's figures."""

    twin: Twin
    train: Samples
    holdout: Samples
    rounds: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0

    @property
    def device_samples(self) -> int:
        return self.train.device_samples + self.holdout.device_samples

    @property
    def nmse(self) -> float:
        return self.rounds[-1]["nmse"]

    @property
    def noise_floor(self) -> float:
        return self.holdout.noise_floor()

    def twin_fit(self, device: str, ideal_nmse: float | None = None) -> TwinFit:
        """What a run records of this calibration (its held-out set is the parity plot's)."""
        return TwinFit(device, self.twin, self.twin.kind, self.nmse, self.noise_floor,
                       evaluate_twin(self.twin, self.train), ideal_nmse, self.device_samples, self.seconds,
                       [r["nmse"] for r in self.rounds], self.holdout, "sequential")


class _Listed:
    """Settings and inputs chosen beforehand, handed to ``collect`` in order (it asks for a group's settings
    before its inputs)."""

    def __init__(self, settings: list[dict[str, np.ndarray]], inputs: list[np.ndarray]) -> None:
        self.settings, self.inputs_, self.i = settings, inputs, -1

    def params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        self.i += 1
        return self.settings[self.i]

    def inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.inputs_[self.i][:n]


@torch.no_grad()
def disagreement(members: list[Twin], settings: list[dict[str, np.ndarray]], inputs: list[np.ndarray]) -> np.ndarray:
    """Each candidate's ensemble variance, mean over its inputs and outputs, in units of the first member's
    output spread (``y_std``): how unsure the ensemble is there."""
    dtype = torch.get_default_dtype()
    scale = members[0].y_std.to(dtype)
    if getattr(members[0], "batched_params", False):
        n = len(inputs[0])
        x = torch.as_tensor(np.concatenate(inputs), dtype=dtype)
        p = {k: torch.as_tensor(np.repeat(np.stack([s[k] for s in settings]), n, axis=0), dtype=dtype)
             for k in settings[0]}
        preds = torch.stack([m(x, p) for m in members]) / scale
        var = preds.var(0).reshape(len(settings), n, -1)
        return var.mean((1, 2)).numpy()
    out = np.empty(len(settings))
    for i, (s, x) in enumerate(zip(settings, inputs)):
        xt = torch.as_tensor(x, dtype=dtype)
        pt = {k: torch.as_tensor(v, dtype=dtype) for k, v in s.items()}
        out[i] = float((torch.stack([m(xt, pt) for m in members]) / scale).var(0).mean())
    return out


def _bootstrap(samples: Samples, rng: np.random.Generator) -> Samples:
    return samples.subset(rng.integers(0, len(samples), size=len(samples)))


def _rotate(samples: Samples, rng: np.random.Generator, share: float = STOP_FRACTION) -> tuple[Samples, Samples]:
    """A random ``share`` of the groups apart (none when too few)."""
    n_stop = int(round(share * len(samples)))
    if n_stop < 2 or len(samples) - n_stop < 2:
        return samples, Samples([], [], [])
    order = rng.permutation(len(samples))
    return samples.subset(order[n_stop:]), samples.subset(order[:n_stop])


def calibrate_sequential(twin: Twin, plan: SequentialPlan, device: Device | None = None,
                         measure: Callable[..., Samples] | None = None, seed: int = 0,
                         region: LayerRegion | None = None, stop: Callable[[Twin, int], bool] | None = None,
                         fit_options: dict[str, Any] | None = None, progress: bool = True,
                         on_round: Callable[[dict[str, Any], Twin], None] | None = None) -> SequentialResult:
    """Calibrate ``twin`` (unfitted, or fitted before: it is warm-started) by :class:`SequentialPlan`.

    ``measure`` collects samples as :func:`~pnn_cluster.twins.collect.collect` does (keywords ``groups``,
    ``batch``, ``repeats``, ``seed``, ``sample_params``, ``sample_inputs``), next to the device (a device
    actor's ``collect``); without it, ``collect`` on ``device``. ``region``: the operating region ``near``
    draws candidates from. ``stop(twin, device_samples)`` ends it early (after a round's fit). ``on_round``
    sees each round's figures and the twin as it is then. ``fit_options`` go to every ``fit_twin`` (``lr``).
    """
    if measure is None:
        if device is None:
            raise ValueError("calibrate_sequential: give the device or a measure function")
        measure = functools.partial(collect, device)
    spec = twin.spec
    if plan.near > 0 and region is None:
        raise ValueError(f"SequentialPlan.near is {plan.near} but no operating region was given; record one or "
                         "set near to 0")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    uniform = uniform_params_for(spec)
    draw_inputs = uniform_inputs_for(spec)
    near = RegionDraw(region, spec, plan.spread) if region is not None and plan.near > 0 else None
    kw = {"batch": plan.batch, "progress": False}
    holdout = measure(groups=plan.holdout_groups, repeats=max(2, plan.repeats), seed=seed + 7919, **kw)
    train = measure(groups=plan.initial_groups, repeats=plan.repeats, seed=seed + 1, **kw)
    if holdout.device_samples + train.device_samples > plan.budget:
        raise ValueError(f"SequentialPlan.budget {plan.budget} is below the first round's "
                         f"{holdout.device_samples + train.device_samples} device samples (holdout_groups, "
                         "initial_groups x batch x repeats); raise the budget or lower those")
    floor = holdout.noise_floor()
    members = [twin] + [copy.deepcopy(twin) for _ in range(plan.ensemble - 1)]
    initial = {k: v.detach().clone() for k, v in twin.state_dict().items()}
    fit_options = dict(fit_options or {})
    result = SequentialResult(twin, train, holdout)
    per_group = plan.batch * plan.repeats
    bar = tqdm(desc=f"sequential {twin.kind} twin", unit="sample", total=plan.budget, disable=not progress,
               leave=False)
    bar.update(result.device_samples)
    for r in range(10**6):
        first = r == 0
        full = plan.first_epochs or None  # None: each fit stage's default epochs
        t_fit = time.perf_counter()
        fits = []
        for j, m in enumerate(members):
            epochs, restart = (full, True) if first else (plan.round_epochs, False)
            if j == 0 and plan.cold and not first:
                # refitted from where it started, in full: a warm refit must beat the state it began from
                # clearly on the early-stopping settings to be kept, which it rarely shows once it is close
                twin.load_state_dict(initial)
                epochs, restart = full, True
            if j == 0:
                # the twin kept stops early on the held-out settings and a share of the measured ones, drawn
                # afresh each round (every measured setting is fitted on in most rounds): a fit keeps the
                # state it began from unless it beats it clearly there, which a few held-out settings
                # alone can rarely show once the twin is close
                data, apart = _rotate(train, rng, plan.stop_share)
                early = holdout + apart
            else:
                # the others run every epoch on their draws, so that they do differ where data are thin
                data, early = _bootstrap(train, rng), None
            patience = PATIENCE if epochs is None else min(PATIENCE, max(3, epochs // 2))
            fits.append(fit_twin(m, data, holdout, epochs=epochs, seed=seed + 31 * r + j, progress=False,
                                 stop=early, patience=patience, output_stats=restart, **fit_options))
        nmse = fits[0].nmse_val
        row = {"round": r, "device_samples": result.device_samples, "groups": len(train), "nmse": nmse,
               "noise_floor": floor, "ratio_to_floor": nmse / floor if floor > 0 else math.inf,
               "fit_seconds": time.perf_counter() - t_fit}
        result.rounds.append(row)
        if on_round is not None:
            on_round(row, twin)
        bar.set_postfix(nmse=f"{nmse:.3g}", floor=f"{floor:.3g}")
        if plan.factor > 0 and nmse <= plan.factor * floor:
            result.reason = f"held-out NMSE within {plan.factor:g} x the noise floor"
            break
        if stop is not None and stop(twin, result.device_samples):
            result.reason = "the caller's stopping rule"
            break
        add = max(1, int(round(plan.growth * len(train))))
        add = min(add, (plan.budget - result.device_samples) // per_group)
        if add < 1:
            result.reason = f"the budget of {plan.budget} device samples"
            break
        settings, inputs = [], []
        for _ in range(add * plan.candidates):
            from_region = near is not None and rng.random() < plan.near
            settings.append(near.params(rng) if from_region else uniform(rng))
            inputs.append(near.inputs(rng, plan.batch) if from_region else draw_inputs(rng, plan.batch))
        score = disagreement(members, settings, inputs) if plan.candidates > 1 else np.zeros(len(settings))
        chosen = np.argsort(-score, kind="stable")[:add]
        listed = _Listed([settings[i] for i in chosen], [inputs[i] for i in chosen])
        new = measure(groups=add, repeats=plan.repeats, seed=seed + 101 + r, sample_params=listed.params,
                      sample_inputs=listed.inputs, **kw)
        train = train + new
        result.train = train
        row["chosen_disagreement"] = float(score[chosen].mean())
        row["candidate_disagreement"] = float(score.mean())
        bar.update(new.device_samples)
    bar.close()
    twin.requires_grad_(False)
    result.seconds = time.perf_counter() - t0
    return result



class _SpecOnly:
    """What the uniform samplers read of a device: its spec."""

    def __init__(self, spec) -> None:
        self.spec = spec


def uniform_params_for(spec):
    """Uniform settings within ``spec``'s limits (what :func:`collect` draws by default)."""
    return uniform_params(_SpecOnly(spec))


def uniform_inputs_for(spec):
    """Uniform inputs within ``spec``'s input range."""
    return uniform_inputs(_SpecOnly(spec))

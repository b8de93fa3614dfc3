"""The figures a run draws: a twin's parity plot, the training curve, the twins' drift, the confusion matrix.

Each takes plain numbers (metric histories, version records, arrays) and returns a matplotlib ``Figure``
made without pyplot, so drawing from a trainer thread or an actor needs no display and keeps no global state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["confusion_figure", "curve_figure", "drift_device", "parity_figure", "twin_history_figure"]


def parity_figure(twin: Any, samples: Any, title: str, max_points: int = 4000):
    """Twin prediction against measurement for held-out samples (one repeat of each)."""
    from matplotlib.figure import Figure

    preds, meas = [], []
    dtype = torch.get_default_dtype()
    with torch.no_grad():
        for x, p, y in zip(samples.x, samples.params, samples.y):
            pr = twin(torch.as_tensor(x, dtype=dtype), {k: torch.as_tensor(v, dtype=dtype) for k, v in p.items()})
            preds.append(pr.double().numpy().reshape(-1))
            meas.append(np.asarray(y[0]).reshape(-1))
    pred, target = np.concatenate(preds), np.concatenate(meas)
    if len(pred) > max_points:
        keep = np.random.default_rng(0).choice(len(pred), max_points, replace=False)
        pred, target = pred[keep], target[keep]
    fig = Figure(figsize=(4.2, 4.2), dpi=110)
    ax = fig.add_subplot()
    ax.scatter(target, pred, s=3, alpha=0.35, linewidths=0)
    lo, hi = float(min(target.min(), pred.min())), float(max(target.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
    ax.set_xlabel("measured on the device")
    ax.set_ylabel("twin prediction")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def curve_figure(steps: Mapping[str, list[tuple[int, float]]], epochs: Mapping[str, list[tuple[int, float]]]):
    """Losses by step (left) and, per epoch, losses and accuracies (right; an accuracy is a name with ``acc``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.4), dpi=110)
    ax1, ax2 = fig.subplots(1, 2)
    for name, pts in steps.items():
        if pts:
            s, v = zip(*pts)
            ax1.plot(s, v, lw=0.8, alpha=0.6, label=f"{name} (step)")
    for name, pts in epochs.items():
        if not pts:
            continue
        s, v = zip(*pts)
        (ax2 if "acc" in name else ax1).plot(s, v, marker="o", label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax2.set_xlabel("step")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:  # a run stopped before its first epoch has no accuracy yet
            ax.legend(fontsize=7)
    fig.suptitle("training curve (validation accuracy measured on the physical devices)", fontsize=9)
    fig.tight_layout()
    return fig


def drift_device(key: str) -> str | None:
    """The device of a metric ``drift/<device>/ratio`` (a replica's device has a slash of its own: ``circuit/1``),
    None for any other metric."""
    head, tail = "drift/", "/ratio"
    if key.startswith(head) and key.endswith(tail) and len(key) > len(head) + len(tail):
        return key[len(head):-len(tail)]
    return None


def alarm_steps(alarm: Sequence[tuple[int, float]], region: Sequence[tuple[int, float]]) -> list[tuple[int, bool]]:
    """A device's alarms from its metrics: ``(step, drift)`` for each step ``drift/<device>/alarm`` was logged,
    ``drift`` False where ``drift/<device>/region_alarms`` (a running count) rose at that step."""
    counts = dict(region)
    risen, last = set(), 0.0
    for step in sorted(counts):
        if counts[step] > last:
            risen.add(step)
        last = counts[step]
    return [(int(step), int(step) not in risen) for step, value in sorted(alarm) if value > 0]


def twin_history_figure(history: Mapping[str, list[tuple[int, float]]], versions: Sequence[Mapping[str, Any]],
                        alarms: Mapping[str, Sequence[tuple[int, bool]]] | None = None):
    """Each twin's NMSE over its device's noise floor along a training, one panel per device.

    The curve is the metric ``drift/<device>/ratio`` (1: the twin is as good as the device's own noise lets
    anything be). A solid vertical line is a version swapped in at that step, a dotted one a refit recorded
    but not swapped in (it was not better than the twin in use); each is labelled ``v<k> <source>``. The
    horizontal lines are the ratio the device's first twin (version 0) had at calibration, and twice it:
    how far the twin in use has moved from where the training started. ``alarms`` (device: ``(step, drift)``)
    are marked on the curve: a filled red triangle where the device's reference showed it had drifted, an
    open grey circle where it measured as before (the twin is off where training moved: not drift).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter
    from matplotlib.transforms import blended_transform_factory

    curves = {d: pts for k, pts in history.items() if (d := drift_device(k)) is not None and pts}
    devices = list(curves) + sorted({str(v["device"]) for v in versions} - set(curves))
    fig = Figure(figsize=(8, 1.2 + 2.2 * max(1, len(devices))), dpi=110)
    axes = fig.subplots(max(1, len(devices)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, device in zip(axes, devices):
        if device in curves:
            s, r = zip(*curves[device])
            ax.plot(s, r, lw=0.9, color="C0", label="twin NMSE / noise floor")
            at = dict(zip(s, r))
            for drift, style in ((True, {"marker": "v", "color": "C3", "label": "drift alarm"}),
                                 (False, {"marker": "o", "mfc": "none", "color": "0.45",
                                          "label": "alarm, device as before"})):
                pts = [(st, at[st]) for st, d in (alarms or {}).get(device, []) if d is drift and st in at]
                if pts:
                    ax.plot(*zip(*pts), ls="none", ms=5, gid=f"alarm:{device}:{'drift' if drift else 'region'}",
                            **style)
        mine = sorted((v for v in versions if str(v["device"]) == device), key=lambda v: int(v["version"]))
        base = next((v.get("ratio_to_floor") for v in mine if int(v["version"]) == 0), None)
        if isinstance(base, int | float) and math.isfinite(base) and base > 0:
            ax.axhline(base, color="0.35", lw=0.8, ls="--", label=f"at calibration ({base:.2f})")
            ax.axhline(2 * base, color="0.35", lw=0.8, ls="-.", label="2 x calibration")
        on_x = blended_transform_factory(ax.transData, ax.transAxes)
        for v in mine:
            k = int(v["version"])
            if k == 0:
                continue  # the calibration is the horizontal line
            accepted = bool(v.get("accepted", True))
            step = int(v.get("step", 0))
            ax.axvline(step, color="C3" if accepted else "0.45", lw=0.9, ls="-" if accepted else ":",
                       gid=f"twin-version:{device}:v{k}")
            ax.text(step, 0.98, f" v{k} {v.get('source', '?')}", transform=on_x, rotation=90, va="top",
                    ha="right", fontsize=6, color="C3" if accepted else "0.45")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # 1.5, not 1.5 x 10^0
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_ylabel("NMSE / floor")
        ax.set_title(device, fontsize=8, loc="left")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    axes[-1].set_xlabel("step")
    fig.suptitle("twins against their devices during training (solid: version swapped in; dotted: refit not "
                 "kept)", fontsize=9)
    fig.tight_layout()
    return fig


def confusion_figure(pred: np.ndarray, target: np.ndarray, title: str):
    """Counts of true class (rows) against predicted class (columns), written in the cells up to 12 classes."""
    from matplotlib.figure import Figure

    n = int(max(pred.max(initial=0), target.max(initial=0)) + 1)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (target.astype(np.int64), pred.astype(np.int64)), 1)
    fig = Figure(figsize=(4.6, 4.2), dpi=110)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig

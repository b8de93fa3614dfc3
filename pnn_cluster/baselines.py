"""Digital baselines a physical network is measured against.

:func:`logistic_baseline`: multinomial logistic regression on the raw
features, its regularisation chosen on the validation split and the test
split measured once. A physical network that does not beat it has not shown
that its physics helps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pnn_cluster.data import Dataset

__all__ = ["logistic_baseline", "LOGISTIC_CS"]

#: inverse regularisation strengths tried on the validation split: 13 values, log-spaced from 1e-4 to 1e4
#: (two-thirds of a decade apart), wide enough that the choice should land inside (``at_edge`` says if not)
LOGISTIC_CS = tuple(float(c) for c in np.logspace(-4, 4, 13))


def logistic_baseline(data: Dataset, cs: Sequence[float] = LOGISTIC_CS, seed: int = 0,
                      max_iter: int = 500) -> dict[str, Any]:
    """Logistic regression on standardised raw features.

    Returns ``{"test_acc", "val_acc", "C", "at_edge", "grid"}``: ``grid`` is the list of
    ``(C, val_acc)`` tried, in increasing ``C``; ``at_edge`` is True when the chosen ``C`` is the
    smallest or largest of the grid (widen it). ``data`` must carry a validation split
    (:meth:`Dataset.with_validation`); each ``C`` is fitted on the rest of train (lbfgs, from zero:
    warm starts were not faster on mnist5k), the best on validation is kept (the smallest ``C`` on
    a tie), and only that one sees the test split.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    if len(data.y_val) == 0:
        raise ValueError(f"logistic_baseline: dataset {data.name!r} has no validation split; "
                         "use Dataset.with_validation(fraction) first")
    grid_cs = sorted(float(c) for c in cs)
    if not grid_cs or grid_cs[0] <= 0:
        raise ValueError(f"logistic_baseline: C values must be positive, got {list(cs)!r}")
    scaler = StandardScaler().fit(data.x_train)
    xtr, xva = scaler.transform(data.x_train), scaler.transform(data.x_val)
    grid: list[tuple[float, float]] = []
    best: tuple[float, float, Any] | None = None
    # one BLAS thread: these matrices are small, and threads made mnist5k 3x slower on an idle 2-core
    # machine (more on a busy one)
    with threadpool_limits(limits=1):
        for c in grid_cs:
            model = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed)
            model.fit(xtr, data.y_train)
            acc = float((model.predict(xva) == data.y_val).mean())
            grid.append((c, acc))
            if best is None or acc > best[0]:
                best = (acc, c, model)
        val_acc, c, chosen = best
        test_acc = float((chosen.predict(scaler.transform(data.x_test)) == data.y_test).mean())
    return {"test_acc": test_acc, "val_acc": val_acc, "C": c, "at_edge": c in (grid_cs[0], grid_cs[-1]),
            "grid": grid}

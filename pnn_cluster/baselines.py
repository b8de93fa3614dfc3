"""Digital baselines a physical network is measured against.

:func:`logistic_baseline`: multinomial logistic regression on the raw
features, its regularisation chosen on the validation split and the test
split measured once. A physical network that does not beat it has not shown
that its physics helps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pnn_cluster.data import Dataset

__all__ = ["logistic_baseline", "LOGISTIC_CS"]

#: inverse regularisation strengths tried on the validation split
LOGISTIC_CS = (0.01, 0.1, 1.0, 10.0, 100.0)


def logistic_baseline(data: Dataset, cs: Sequence[float] = LOGISTIC_CS, seed: int = 0) -> dict[str, Any]:
    """Logistic regression on standardised raw features: ``{"test_acc", "val_acc", "C"}``.

    ``data`` must carry a validation split (:meth:`Dataset.with_validation`); each ``C`` is fitted on
    the rest of train, the best on validation is kept, and only that one sees the test split.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(data.y_val) == 0:
        raise ValueError(f"logistic_baseline: dataset {data.name!r} has no validation split; "
                         "use Dataset.with_validation(fraction) first")
    scaler = StandardScaler().fit(data.x_train)
    xtr, xva = scaler.transform(data.x_train), scaler.transform(data.x_val)
    best: tuple[float, float, Any] | None = None
    for c in cs:
        model = LogisticRegression(C=float(c), max_iter=2000, random_state=seed).fit(xtr, data.y_train)
        acc = float((model.predict(xva) == data.y_val).mean())
        if best is None or acc > best[0]:
            best = (acc, float(c), model)
    val_acc, c, model = best
    test_acc = float((model.predict(scaler.transform(data.x_test)) == data.y_test).mean())
    return {"test_acc": test_acc, "val_acc": val_acc, "C": c}

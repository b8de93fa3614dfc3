"""The logistic-regression baseline: C chosen on validation from a wide grid, test measured once."""

import numpy as np
import pytest

from pnn_cluster.baselines import LOGISTIC_CS, logistic_baseline
from pnn_cluster.data import digits


def test_grid_is_13_log_spaced_values_from_1e_minus_4_to_1e4():
    assert len(LOGISTIC_CS) == 13
    assert LOGISTIC_CS[0] == pytest.approx(1e-4) and LOGISTIC_CS[-1] == pytest.approx(1e4)
    np.testing.assert_allclose(np.diff(np.log10(LOGISTIC_CS)), 8 / 12)


def test_chosen_c_is_the_best_on_validation_and_at_edge_says_where_it_lies():
    res = logistic_baseline(digits().with_validation(0.1, seed=0))
    cs = [c for c, _ in res["grid"]]
    accs = [a for _, a in res["grid"]]
    assert cs == sorted(LOGISTIC_CS)
    assert res["val_acc"] == max(accs) and dict(res["grid"])[res["C"]] == res["val_acc"]
    assert 0.0 <= res["test_acc"] <= 1.0 and res["test_acc"] > 0.9
    assert res["at_edge"] == (res["C"] in (min(cs), max(cs)))


def test_a_choice_on_the_edge_of_a_narrow_grid_is_flagged():
    res = logistic_baseline(digits().with_validation(0.1, seed=0), cs=[1e-4])
    assert res["C"] == 1e-4 and res["at_edge"] and res["grid"] == [(1e-4, res["val_acc"])]


def test_no_validation_split_is_refused():
    with pytest.raises(ValueError, match="no validation split"):
        logistic_baseline(digits())

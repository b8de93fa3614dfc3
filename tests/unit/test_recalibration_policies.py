"""Recalibration policies decide, the watch acts: each policy's decision for the states a replica can be in."""

from __future__ import annotations

import types

import pytest

from pnn_cluster.training.recalibration_policies import POLICIES, Action, policy_for


def _replica(**state):
    base = {"pending": None, "refine_due": None, "zero_step": 7, "last_warned": None,
            "settings": types.SimpleNamespace(warmup=20)}
    return types.SimpleNamespace(**{**base, **state})


def test_each_policy_decides_what_its_name_says():
    assert POLICIES == ("none", "monitor", "refine", "pause")
    assert not policy_for("none").watches and policy_for("refine").keeps_inputs
    assert policy_for("monitor").on_alarm(_replica(), 50).action is Action.WARN
    refine = policy_for("refine").on_alarm(_replica(), 50)
    assert refine.action is Action.REFINE and refine.since == 7  # from where the change began
    assert policy_for("pause").on_alarm(_replica(), 50).action is Action.PAUSE


def test_nothing_is_started_twice_and_warnings_are_spaced():
    busy = _replica(pending=object())
    assert policy_for("refine").on_alarm(busy, 50).action is Action.NOTHING
    assert policy_for("pause").on_alarm(busy, 50).action is Action.NOTHING
    due = policy_for("refine").on_alarm(_replica(refine_due=40), 50)
    assert due.action is Action.NOTHING and "40" in due.reason
    monitor = policy_for("monitor")
    assert monitor.on_alarm(_replica(last_warned=10), 60).action is Action.NOTHING  # within 100 steps
    assert monitor.on_alarm(_replica(last_warned=10), 110).action is Action.WARN


def test_an_unknown_policy_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'refin' is not allowed; allowed: none, monitor, refine, pause"):
        policy_for("refin")


def test_only_refine_widens_and_only_a_refit_over_its_factor_across_the_range():
    w = _replica(settings=types.SimpleNamespace(warmup=20, widen_factor=2.0))
    assert policy_for("refine").checks_range and not policy_for("pause").checks_range
    far = policy_for("refine").on_range_check(w, 50, 5.3, since=7)
    assert far.action is Action.WIDEN and far.since == 7 and "5.30" in far.reason
    assert policy_for("refine").on_range_check(w, 50, 1.9, since=7).action is Action.NOTHING
    for name in ("monitor", "pause"):
        assert policy_for(name).on_range_check(w, 50, 5.3, since=7).action is Action.NOTHING

"""The CUSUM drift detector: its false-alarm rate is the one asked for, and it sees a drift within a few steps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pnn_cluster.twins.drift import CusumDetector, cusum_arl0, cusum_threshold


def run_length(det: CusumDetector, ratios) -> int | None:
    for i, r in enumerate(ratios, 1):
        if det.update(r):
            return i
    return None


#: a rise of the twin's error by one baseline standard deviation of its log (0.2 below): k = 0.5
RISE = math.exp(0.2)


def no_drift(rng, n, level=3.0, spread=0.2):
    """A twin's error over the floor, step after step, when nothing drifts: lognormal around ``level``."""
    return level * np.exp(spread * rng.standard_normal(n))


def test_threshold_inverts_siegmunds_formula():
    for arl0 in (100, 1_000, 10_000):
        for k in (0.25, 0.5, 1.0):
            h = cusum_threshold(arl0, k)
            assert cusum_arl0(h, k) == pytest.approx(arl0, rel=1e-6)
    assert cusum_threshold(10_000, 0.5) > cusum_threshold(1_000, 0.5)  # rarer false alarms: a higher bar


def test_false_alarms_come_at_the_rate_asked_for():
    # runs with no drift until their first false alarm: the mean run length is the arl0 asked for. A long
    # warm-up makes the baseline all but exact, so what is checked is the threshold (with the 100-step default
    # the baseline's own error spreads run lengths out, some shorter, more longer: test_a_drift counts those)
    rng = np.random.default_rng(0)
    arl0, warmup = 200.0, 1_000
    lengths = []
    for _ in range(300):
        det = CusumDetector(arl0=arl0, rise=RISE, warmup=warmup)
        n = run_length(det, no_drift(rng, 20_000))
        assert n is not None
        lengths.append(n - warmup)
    mean = float(np.mean(lengths))
    assert 0.8 * arl0 < mean < 1.25 * arl0, mean  # 300 runs: the mean's standard error is about 6 %


def test_a_drift_is_seen_within_a_few_steps_and_rarely_before_it():
    rng = np.random.default_rng(1)
    delays, early = [], 0
    for _ in range(50):
        det = CusumDetector(arl0=10_000, rise=RISE)  # the default 100-step warm-up
        if run_length(det, no_drift(rng, 300)) is not None:
            early += 1  # a false alarm in the 200 monitored steps before the drift
            det.rebaseline()
            run_length(det, no_drift(rng, 100))
        # the device drifts: the twin's error grows by 2 baseline standard deviations of its log
        delay = run_length(det, no_drift(rng, 200) * math.exp(2 * 0.2))
        assert delay is not None
        delays.append(delay)
    assert early <= 4  # 50 x 200 steps at about 1e-4 per step: 1 expected
    assert np.median(delays) <= 12, delays


def test_rebaseline_after_a_refit_and_clear_errors():
    rng = np.random.default_rng(2)
    det = CusumDetector(arl0=1_000, warmup=10)
    run_length(det, no_drift(rng, 10))
    assert det.ready
    det.rebaseline()
    assert not det.ready and det.statistic == 0
    run_length(det, no_drift(rng, 10, level=1.5))  # the refined twin is better: a new, lower baseline
    assert det.ready and det.mu0 == pytest.approx(math.log(1.5), abs=0.2)
    with pytest.raises(ValueError, match="ratio"):
        det.update(float("nan"))
    with pytest.raises(ValueError, match="arl0"):
        CusumDetector(arl0=1)
    with pytest.raises(ValueError, match="warmup"):
        CusumDetector(warmup=2)
    with pytest.raises(ValueError, match="rise"):
        CusumDetector(rise=1.0)


def test_the_rise_worth_detecting_is_a_factor_on_the_error_whatever_its_scatter():
    # a very steady series (scatter 1 %): a 10 % rise of the twin's error is no alarm, a doubling is
    rng = np.random.default_rng(3)
    det = CusumDetector(arl0=10_000, rise=1.5, warmup=100)
    assert run_length(det, no_drift(rng, 100, spread=0.01)) is None
    assert run_length(det, no_drift(rng, 1_000, spread=0.01) * 1.1) is None
    assert run_length(det, no_drift(rng, 50, spread=0.01) * 2.0) is not None


def test_a_resumed_detector_goes_on_where_it_was():
    rng = np.random.default_rng(4)
    det = CusumDetector(arl0=1_000, warmup=20)
    series = no_drift(rng, 60)
    run_length(det, series[:40])
    twin = CusumDetector.from_state(det.state_dict())
    for r in series[40:]:
        assert det.update(r) == twin.update(r)
    assert twin.statistic == det.statistic and twin.steps == det.steps


def test_a_lone_spike_raises_no_alarm_but_two_steps_in_a_row_do():
    rng = np.random.default_rng(5)
    det = CusumDetector(arl0=10_000, rise=1.5, warmup=100)
    run_length(det, no_drift(rng, 100, spread=0.1))
    assert not det.update(3.0 * 50)  # one step 50 times the baseline's error: a glitch
    assert not det.update(3.0)       # back to normal: the statistic falls back
    assert det.statistic == 0.0
    assert not det.update(3.0 * 50) and det.update(3.0 * 50)  # it lasts: an alarm on the second step


def test_no_lone_spike_alarms_whatever_the_baselines_scatter():
    # each step adds at most h to the statistic: from zero, a lone spike reaches h and no further, for any
    # baseline. Capping z at k + h instead let (k + h) - k round to an ulp over h for some scatters (the
    # circuit of hybrid_mnist seed 1 alarmed twice without drift, each time on one step)
    rng = np.random.default_rng(6)
    traps = 0
    for spread in np.linspace(0.05, 0.3, 200):
        det = CusumDetector(arl0=10_000, warmup=100)
        assert run_length(det, no_drift(rng, 100, spread=spread)) is None
        traps += (det.k + det.h) - det.k > det.h  # where a z capped at k + h would go over h
        assert det.statistic == 0.0
        assert not det.update(3.0 * 1e3), spread  # a glitch
        assert det.statistic == det.h
    assert traps > 0  # the scatters tried include those where the rounding bit

"""bench_pat's bookkeeping (no training here: the benchmark itself is run by hand, see README)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import ROOT

SCRIPT = ROOT / "scripts" / "bench_pat.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pat", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_task_prefixed_override_applies_to_that_task_alone(bench):
    overrides = ["hybrid_mnist:schedule.epochs=5", "shg_vowels:schedule.epochs=7", "seed=3"]
    hybrid = bench.configuration("hybrid_mnist", False, overrides)
    vowels = bench.configuration("shg_vowels", False, overrides)
    assert (hybrid.schedule.epochs, vowels.schedule.epochs) == (5, 7)
    assert hybrid.seed == vowels.seed == 3 and not hybrid.tracking.enabled


def test_quick_shrinks_every_fitted_twin_and_the_data(bench):
    cfg = bench.configuration("oscillators_mnist", True, [])
    assert cfg.dataset.train_subset == 300 and cfg.schedule.epochs == 1
    for name in cfg.physical_devices():
        twin = cfg.devices[name].twin
        assert (twin.groups, twin.batch, twin.epochs) == (24, 16, 5)


def test_every_finished_run_is_logged_and_a_rerun_skips_it(bench, tmp_path):
    log = tmp_path / "runs.jsonl"
    kept = []

    def record(key, result):
        kept.append(key)
        with log.open("a") as fh:
            fh.write(json.dumps({"key": list(key), "result": result}) + "\n")

    pool = bench.Pool(0)  # in this process
    runs = {("task", "t", "pat", 0): {"test_acc": 0.5}, ("twins", "shg"): {"noise_floor": 0.01}}
    jobs, done = {}, {("logistic", "t"): {"test_acc": 0.4}}

    def fails():
        raise KeyboardInterrupt  # the benchmark stopped midway

    for key, result in runs.items():
        pool.call(key, lambda r=result: r, (), jobs, done, record)
    pool.call(("logistic", "t"), fails, (), jobs, done, record)  # in the log already: not run again
    with pytest.raises(KeyboardInterrupt):
        pool.call(("sweep", 0.5, "pat", 0), fails, (), jobs, done, record)
    # what finished before the stop is in the log at once, not only when everything has run
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [tuple(x["key"]) for x in lines] == list(runs) == kept
    out = pool.gather(jobs, done, record)
    assert set(out) == {*runs, ("logistic", "t")} and kept == list(runs)
    assert bench.mean_sd([0.5, 0.7]) == {"mean": pytest.approx(0.6), "sd": pytest.approx(0.1414, abs=1e-4),
                                         "n": 2, "values": [0.5, 0.7]}


def test_a_pairing_varies_seed_and_split_together_and_vowel_runs_cover_every_fold(bench):
    assert bench.paired_run("hybrid_mnist", 3) == ["seed=3", "dataset.split_seed=3"]
    runs = [bench.configuration("shg_vowels", False, bench.paired_run("shg_vowels", r)) for r in range(10)]
    assert all(c.dataset.folds == bench.VOWEL_FOLDS for c in runs)
    assert {(c.dataset.split_seed, c.dataset.fold) for c in runs} == {(s, f) for s in (0, 1) for f in range(5)}
    assert len({c.seed for c in runs}) == 10
    assert [bench.paper(t) for t in ("shg_vowels", "plate_mnist", "circuit_mnist", "oscillators_mnist")] == \
        [0.93, 0.87, 0.93, None]


def test_a_twins_row_has_every_kind_its_operating_region_and_its_sequential_calibration(bench, monkeypatch):
    import numpy as np

    from pnn_cluster.devices import make_device
    from pnn_cluster.twins import models
    from pnn_cluster.twins.operating import LayerRegion

    rng = np.random.default_rng(0)
    spec = make_device("shg", n_in=4, n_out=4).spec
    params = {p.name: rng.uniform(-0.2, 0.2, size=(3, *p.shape)) for p in spec.params}
    region = LayerRegion(params, rng.uniform(0.2, 0.8, size=(3, 8, 4)), np.arange(3))
    monkeypatch.setattr(bench, "record_region", lambda task, layer, seed, quick: (region, 0.5))  # no training here
    row = bench.fit_twins("shg", {"n_in": 4, "n_out": 4}, 640, 1, 2, True)
    json.dumps(row)
    kinds = [k for k in models.TWIN_KINDS if k not in row.get("skipped", {})]
    assert set(kinds) | set(row.get("skipped", {})) == set(models.TWIN_KINDS) and "physics" in kinds
    op, seq = row["operating"], row["sequential"]
    assert all(row[k] > 0 and op[k] > 0 and f"{k}_seconds" in row for k in kinds)
    assert op["noise_floor"] > 0 and op["device_samples"] == 8 * 16 * 2 and op["settings"] == 3
    assert seq["kind"] == row["best"] and seq["budget"] == 320
    assert seq["reached"] == (seq["samples"] is not None) and (seq["samples"] or 0) <= 320
    assert seq["curve"] and all(n <= 320 for n, _, _ in seq["curve"])

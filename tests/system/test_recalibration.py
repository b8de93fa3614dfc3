"""The twin watch in a whole training run: a bumped device refined while training goes on, and the checkpoint
resumed and evaluated with the twin in use (the watch and its policies step by step:
``tests/unit/test_recalibration.py``).
"""

from __future__ import annotations

from pnn_cluster.config import parse_config


def test_a_run_refines_its_bumped_device_and_its_checkpoint_resumes_and_evaluates_with_the_twin_in_use(tmp_path):
    from pnn_cluster.runner import ExperimentRun
    from pnn_cluster.twins.versions import twin_digest as version_of

    # the circuit is bumped after its calibration (6 x 32 x 2), initialisation (64) and 30 steps of 20
    cfg = parse_config({
        "name": "bumped", "seed": 0, "dataset": {"name": "digits", "train_subset": 330, "test_subset": 100},
        "devices": {"circuit": {
            "driver": {"kind": "simulated", "system": "circuit", "options": {"n_in": 8, "n_out": 8},
                       "imperfections": {"drift": 0, "steps": [{"at_samples": 384 + 64 + 600, "size": 2.0}]}},
            "twin": {"kind": "physics", "groups": 6, "batch": 32, "epochs": 10},
            "recalibration": {"policy": "refine", "warmup": 10, "explore_fraction": 0.1, "epochs": 10}}},
        "stack": [{"kind": "linear", "size": 8}, {"kind": "rescale"}, {"kind": "physical", "device": "circuit"},
                  {"kind": "linear", "size": 10}],
        "init": {"samples": 64},
        "optimizer": {"lr": 0.05}, "schedule": {"epochs": 6, "batch_size": 20, "eval_batch": 100},
        "tracking": {"enabled": False}}, source="bumped.yaml")
    result = ExperimentRun(cfg, keep_checkpoint=True, echo=False).run()
    watch = result.recalibration["circuit"]
    assert watch["alarm_steps"] and watch["alarm_steps"][0] >= 29, watch["alarm_steps"]  # none before the bump
    assert watch["version"] >= 1 and any(r["accepted"] for r in watch["versions_log"])
    # exploration around the parameters (explore_fraction 0.1) and over the range (its own widen_fraction)
    widen = cfg.devices["circuit"].recalibration.widen_fraction
    assert 0 < result.recalibration_samples <= (0.1 + widen) * watch["trained_rows"]
    assert watch["widen_samples"] <= widen * watch["trained_rows"]
    assert result.device_samples_total == (result.device_samples + result.calibration_samples
                                           + result.init_samples + result.recalibration_samples)
    assert "drift_history" not in result.summary() and len(result.drift_history["circuit"]) == result.steps
    state = result.checkpoint
    kept = state["extra"]["recalibration"]["circuit"]
    assert kept["version"] == watch["version"] and kept["detector"]["steps"] == result.steps
    twin_state = {k.split("twin.", 1)[1]: v for k, v in state["model"].items() if ".twin." in k}
    taken = [r for r in watch["versions_log"] if r["accepted"]][-1]
    assert version_of(twin_state) == taken["state_hash"]  # the checkpoint holds the version in use
    evaluated = ExperimentRun(cfg, resume=state, echo=False).evaluate()
    assert evaluated["twin_versions"] == {"circuit": watch["version"]}
    # resumed for two more epochs: the detector goes on from where it was
    more = cfg.with_overrides(["schedule.epochs=8"])
    resumed = ExperimentRun(more, resume=state, keep_checkpoint=True, echo=False).run()
    assert resumed.checkpoint["extra"]["recalibration"]["circuit"]["detector"]["steps"] == resumed.steps

"""`pnn-cluster train` on the shared test cluster: every device in an actor on its instrument's node."""

from __future__ import annotations

import json

import yaml
from helpers import tiny_config

from pnn_cluster.cli import main

CONFIG = tiny_config(name="tiny-cluster", dataset={"train_subset": 120, "test_subset": 60},
                     imperfections={"latency_call_s": 0, "latency_sample_s": 0},
                     placement={"instrument": "circuit-bench-2"},
                     twin={"kind": "physics", "groups": 5, "batch": 24, "epochs": 4}, optimizer={"lr": 0.05},
                     schedule={"epochs": 2, "batch_size": 40, "eval_batch": 60})


def _run(tmp_path, capsys, *extra):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert main(["train", str(path), "--no-track", "--no-progress", "--json", *extra]) == 0
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


def test_train_runs_devices_in_actors_and_matches_in_process(ray_cluster, tmp_path, capsys):
    out, dist = _run(tmp_path, capsys)
    assert "1 device actor(s) on Ray" in out and "the loop runs in a trainer actor" in out
    assert dist["device_actors"] == 1 and dist["steps"] == 6
    assert dist["twin_actors"] == 1 and dist["trainer_actor"] is True
    assert dist["nodes"] == {"circuit": ray_cluster.lab_nodes["circuit-bench-2"]}
    _, local = _run(tmp_path, capsys, "--in-process")
    assert local["device_actors"] == 0 and local["steps"] == 6
    assert local["twin_actors"] == 0 and local["trainer_actor"] is False
    # the same devices (same seeds) measured through the pipeline: the same training within noise
    assert dist["device_samples"] == local["device_samples"]
    assert abs(dist["test_acc"] - local["test_acc"]) <= 0.1, (dist, local)


def test_ctrl_c_stops_the_trainer_actor_after_its_step_keeps_the_checkpoint_and_marks_the_run(ray_cluster, tmp_path,
                                                                                              mlflow_store):
    """`pnn-cluster train` as a person runs it, joined to the cluster; Ctrl-C once the first epoch is reported."""
    import os
    import signal
    import subprocess
    import sys

    from mlflow import MlflowClient

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "schedule": {**CONFIG["schedule"], "epochs": 50}}))
    uri = mlflow_store
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pnn_cluster.cli", "train", str(path), "--tracking-uri", uri,
                             "--no-progress", "--address", ray_cluster.address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines = []
    try:
        for line in proc.stdout:  # the trainer's own report says when the first epoch is done
            lines.append(line)
            if line.strip().startswith("epoch 1:"):
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 130, out[-3000:]
    assert "stopping after the current step" in out and "--resume" in out
    client = MlflowClient(uri)
    run, = [r for r in client.search_runs([client.get_experiment_by_name("pnn-cluster").experiment_id])
            if r.data.tags.get("pnn.command") == "train"]
    assert run.info.status == "KILLED"
    step = int(run.data.tags["pnn.checkpoint_step"])
    assert 3 <= step < 150 and run.data.tags["pnn.end_step"] == str(step)


def test_a_device_placed_on_an_instrument_no_node_declared_fails_at_once_naming_it(ray_cluster, tmp_path, capsys):
    raw = {**CONFIG, "devices": {"circuit": {**CONFIG["devices"]["circuit"],
                                             "placement": {"instrument": "no-such-bench"}}}}
    path = tmp_path / "nowhere.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--no-track", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "device circuit: no node of the cluster declared instrument:no-such-bench" in err
    assert "ray start --address HEAD:6379 --resources '{\"instrument:no-such-bench\": 1}'" in err
    assert "Traceback" not in err

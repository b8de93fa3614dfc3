"""`ray job submit -- pnn-cluster train lab_cluster.yaml --json`, as deploy/README.md documents it.

A Ray head of its own (not the session's test cluster) declares the two lab instruments of the shipped
`lab_cluster.yaml`; the optics device server (ZeroMQ) and the electronics bench (SCPI over TCP) listen on
loopback; the job points the configuration at them with `--set` and runs on the cluster it was submitted to.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import ROOT, free_port

from pnn_cluster.devices import make_device
from pnn_cluster.servers.scpi_bench import SimBench
from pnn_cluster.servers.zmq_server import DeviceServer

pytestmark = pytest.mark.slow

OPTS = {"n_in": 24, "n_out": 24}


@pytest.fixture
def lab_head():
    """`ray start --head --block` declaring the instruments; yields the dashboard address, stops it after."""
    ray_exe = Path(sys.executable).parent / "ray"
    if not ray_exe.exists():
        pytest.skip("the ray command line is not installed")
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    dash = free_port()
    # token authentication, as deploy/ documents it: the head, the job's driver and `ray job submit` share it
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT / "tests"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    resources = json.dumps({"instrument:shg-bench": 1, "instrument:circuit-bench": 1})
    head = subprocess.Popen(
        [str(ray_exe), "start", "--head", "--block", f"--port={free_port()}", "--include-dashboard=true",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--resources={resources}",
         f"--temp-dir={temp}", "--disable-usage-stats",
         # a second Ray on this machine (the session's test cluster): none of its fixed ports may be shared
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    said = []
    try:
        for line in head.stdout:  # the head says when it is up; no polling
            said.append(line)
            if "Ray runtime started" in line:
                break
        else:
            pytest.fail(f"ray start --head ended with {head.wait()}:\n{''.join(said)[-4000:]}")
        yield f"http://127.0.0.1:{dash}", env
    finally:
        # a throwaway head: what a graceful shutdown would keep is not needed, so SIGKILL after a short grace
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # also whatever the leader started and left behind
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_trains_the_lab_configuration_on_the_cluster(lab_head, tmp_path, mlflow_store):
    address, env = lab_head
    shg = make_device("shg", **OPTS).imperfections.with_(seed=31, latency_call_s=0, latency_sample_s=0)
    circ = make_device("circuit", **OPTS).imperfections.with_(seed=32, latency_call_s=0, latency_sample_s=0)
    with DeviceServer(make_device("shg", imperfections=shg, **OPTS), "tcp://127.0.0.1:0") as server, \
            SimBench("circuit", port=0, imperfections=circ, **OPTS) as bench:
        visa = bench.visa_config()
        entry = ["pnn-cluster", "train", "pnn_cluster/configs/lab_cluster.yaml", "--quick", "--json",
                 "--no-progress", "--tracking-uri", mlflow_store,
                 "--set", f"devices.optics.driver.address={server.endpoint}",
                 # a loopback server without CURVE here (tests/deploy/test_secure_deploy.py runs the keys as shipped)
                 "--set", "devices.optics.driver.curve=null",
                 # small: what is tested is the way through the cluster, not the training or the twins' fit
                 "--set", "dataset.train_subset=300", "--set", "dataset.test_subset=100",
                 "--set", "devices.optics.twin.batch=32", "--set", "devices.circuit.twin.batch=32",
                 "--set", f"tracking.runs_dir={tmp_path / 'runs'}",
                 "--set", f"devices.circuit.driver.source.resource={visa['source']['resource']}",
                 "--set", f"devices.circuit.driver.sink.resource={visa['sink']['resource']}"]
        submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--", *entry]
        for _ in range(15):  # the head's job agent registers a little after "Ray runtime started"
            job = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent to submit job" not in job.stdout + job.stderr:
                break
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-5000:]
    result = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{\"config\"")))
    print(json.dumps(result))
    assert result["config"] == "lab_cluster" and result["state"] == "finished"
    assert result["device_actors"] == 2 and result["trainer_actor"] is True
    assert result["twin_actors"] == 3  # the optics twin, and two copies of the circuit's (placement.twins)
    assert result["run_id"] and 0 <= result["test_acc"] <= 1

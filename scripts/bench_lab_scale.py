"""A lab of dozens of instruments on a multi-node cluster, and two jobs contending for one instrument.

Each figure runs on a ``ray.cluster_utils.Cluster`` of its own (a head node and
worker nodes in this machine, each its own raylet), so it measures Ray's real
node-to-node path; when this process is already connected to a Ray instance (a
caller such as ``bench_pipeline.py``), each figure runs in a subprocess of this
script instead. Prints, with ``--json``, one line::

    {"scale": {"nodes": N, "device_actors": M, "step_over_bound": R, ...},
     "contention": {"finished": true, "exact": true, "waited_s": T, "message": "...", ...}}

- scale: ``STAGES`` stages of ``REPLICAS`` latency-only simulated SHG devices
  (noise-free, ``latency_call_s`` per call, ``latency_sample_s`` per row), each
  in its own device actor; each node declares a custom resource and each
  replica asks for one unit of one node's, so every stage's pool spreads over
  every node. One Trainer (RayExecutor, replica pools) trains on them.
  ``step_over_bound``: median time per optimizer step over the bottleneck bound,
  the calls its busiest replica must make per batch times one call's device
  time. Filling and draining the pipeline once per step costs ``stages - 1``
  calls of it, inherently: ``inherent_over_bound`` states that share.
- contention: a node declares one instrument (``instrument:NAME``, one unit);
  two ``pnn-cluster train`` jobs (two driver processes, each its own Ray job and
  trainer actor) want it. The second starts once the first holds it: its device
  actor waits for the unit, and its submitter is told what it waits for, held by
  whom, since when (``message``, the first such line it printed); both must end
  with their exact step counts. ``waited_s``: how long the second's device
  actor waited for the instrument, from its run's result (``instrument_waits`` of
  ``pnn-cluster train --json``); ``waited_line_s``: the same read from the line it
  printed when the instrument came free.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

#: the scale run's lab: stages x replicas device actors over NODES nodes
STAGES, REPLICAS, NODES = 4, 8, 4
WIDTH = 8
NODE_RESOURCE = "scale-node-{}"


def _own_cluster(nodes: int, node_resources: dict[int, dict[str, float]] | None = None, num_cpus: int = 2):
    """A head and ``nodes - 1`` workers in this machine, this process connected to it; (cluster, node ids)."""
    import ray
    from ray.cluster_utils import Cluster

    node_resources = node_resources or {}
    # small object stores: the calls carry kilobytes, and every node's store is memory of this machine
    store = 80 * 1024 ** 2
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": num_cpus, "include_dashboard": False, "object_store_memory": store,
        "resources": node_resources.get(0, {})})
    for i in range(1, nodes):
        cluster.add_node(num_cpus=num_cpus, object_store_memory=store, resources=node_resources.get(i, {}))
    cluster.wait_for_nodes()
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False, runtime_env={"env_vars": env})
    return cluster


def _in_subprocess(which: str, args: list[str], timeout_s: float) -> dict[str, Any]:
    """The figure from a fresh process of this script (this one is connected to another Ray instance)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", which, "--json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])[which]


def _pss_mib(pid: int) -> float:
    """Proportional set size of a process (its share of shared pages counted once over all of them)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- scale -----------------------------------------------------------------------------------------------


def scale_figures(stages: int = STAGES, replicas: int = REPLICAS, nodes: int = NODES, latency_s: float = 0.06,
                  latency_sample_s: float = 0.01, micro_batch: int = 4, calls_per_replica: int = 64,
                  steps: int = 4) -> dict[str, Any]:
    """One training job on ``stages x replicas`` device actors over ``nodes`` nodes: its step time over the bound.

    ``calls_per_replica``: micro-batches each replica measures per batch (the batch is
    ``calls_per_replica x replicas`` micro-batches of ``micro_batch`` rows).
    """
    import ray

    if ray.is_initialized():
        args = [f"--{k.replace('_', '-')}={v}" for k, v in dict(
            stages=stages, replicas=replicas, nodes=nodes, latency_s=latency_s, latency_sample_s=latency_sample_s,
            micro_batch=micro_batch, calls_per_replica=calls_per_replica, steps=steps).items()]
        return _in_subprocess("scale", args, timeout_s=1800)
    if nodes < 1 or stages < 1 or replicas < 1:
        raise ValueError(f"scale_figures: nodes, stages and replicas must be >= 1, got {nodes}, {stages}, {replicas}")
    t0 = time.perf_counter()
    cluster = _own_cluster(nodes, {i: {NODE_RESOURCE.format(i): 1000.0} for i in range(nodes)})
    cluster_s = time.perf_counter() - t0
    try:
        return _scale_run(stages, replicas, nodes, latency_s, latency_sample_s, micro_batch, calls_per_replica,
                          steps) | {"cluster_start_s": round(cluster_s, 2)}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _scale_recipe(stage: int, replica: int, nodes: int, latency_s: float, latency_sample_s: float):
    from pnn_cluster.config import ImperfectionsConfig, PlacementConfig, SimulatedDriver
    from pnn_cluster.runner import DeviceRecipe

    imp = ImperfectionsConfig(ideal=True, latency_call_s=latency_s, latency_sample_s=latency_sample_s)
    driver = SimulatedDriver(kind="simulated", system="shg", options={"n_in": WIDTH, "n_out": WIDTH},
                             imperfections=imp)
    # replica r of every stage on node r mod nodes: each stage's pool spans the cluster
    place = PlacementConfig(resources={NODE_RESOURCE.format(replica % nodes): 1.0})
    return DeviceRecipe(f"shg{stage}", replica, driver, seed=100 * stage + replica, placement=place)


def _scale_run(stages, replicas, nodes, latency_s, latency_sample_s, micro_batch, calls_per_replica, steps):
    import ray
    from torch import nn

    from actors.device import ActorDevice, start_device
    from actors.executor import RayExecutor
    from pnn_cluster.data import Dataset
    from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
    from pnn_cluster.training.pipeline import Replica
    from pnn_cluster.training.trainer import TrainConfig, Trainer
    from pnn_cluster.twins import build_twin

    t0 = time.perf_counter()
    recipes = [[_scale_recipe(s, r, nodes, latency_s, latency_sample_s) for r in range(replicas)]
               for s in range(stages)]
    actors = [[start_device(rc) for rc in row] for row in recipes]
    flat = [a for row in actors for a in row]
    ray.get([a.spec.remote() for a in flat])  # every instrument connected
    startup_s = time.perf_counter() - t0
    try:
        node_of = ray.get([a.node_id.remote() for a in flat])
        pids = ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in flat])
        pss = [_pss_mib(p) for p in pids]
        devices = [[ActorDevice(a, name=rc.label) for a, rc in zip(row, rrow)] for row, rrow in zip(actors, recipes)]

        def twin(dev) -> nn.Module:
            return build_twin("physics", dev.spec, dev.model()).to(torch.get_default_dtype()).requires_grad_(False)

        torch.manual_seed(0)
        layers: list[nn.Module] = []
        pools = {}
        for s, row in enumerate(devices):
            layer = PhysicalLayer(row[0], twin=twin(row[0]), name=f"shg{s}")
            layers += [Rescale(WIDTH, 0.0, 1.0, margin=0.02), layer]
            pools[layer.name] = [Replica(d.handle(), twin=twin(d), name=d.name) for d in row]
        layers.append(Affine(WIDTH))
        model = Stack(*layers)
        batch = calls_per_replica * replicas * micro_batch
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, (batch, WIDTH))
        y = rng.integers(0, WIDTH, batch)
        data = Dataset("scale", x, y, x[:8], y[:8])
        cfg = TrainConfig(epochs=1, batch_size=batch, micro_batch=micro_batch, lr=1e-3, lr_schedule="constant")
        executor = RayExecutor(pools=pools)
        trainer = Trainer(model, data, cfg, executor=executor, progress=False)
        xt = torch.as_tensor(x, dtype=torch.get_default_dtype())
        yt = torch.as_tensor(y)
        times, cpu = [], []
        for i in range(steps + 1):  # the first step warms up (first calls, allocations)
            t, c = time.perf_counter(), time.process_time()
            trainer.step(xt, yt)
            if i:
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        per_call = latency_s + micro_batch * latency_sample_s
        busiest = math.ceil(batch / micro_batch / replicas)
        bound = busiest * per_call
        step_s = statistics.median(times)
        return {"nodes": len(set(node_of)), "device_actors": len(flat), "stages": stages, "replicas": replicas,
                "step_over_bound": round(step_s / bound, 3),
                "inherent_over_bound": round((busiest + stages - 1) / busiest, 3),
                "step_s": round(step_s, 3), "bound_s": round(bound, 3), "step_s_all": [round(t, 3) for t in times],
                "trainer_cpu_s_per_step": round(statistics.median(cpu), 3),
                "call_s": per_call, "micro_batches": batch // micro_batch, "micro_batch": micro_batch,
                "device_calls_per_step": stages * (batch // micro_batch),
                "devices_per_node": {n[:8]: node_of.count(n) for n in sorted(set(node_of))},
                "startup_s": round(startup_s, 2), "device_actor_pss_mib": round(sum(pss) / len(pss), 1),
                "device_actors_pss_mib": round(sum(pss), 1)}
    finally:
        for a in flat:
            ray.kill(a, no_restart=True)


# -- contention -------------------------------------------------------------------------------------------

INSTRUMENT = "contended-bench"
TRAINING = re.compile(r"-- training (\d+) epochs of (\d+) steps")


def contention_config(name: str, latency_s: float, epochs: int) -> dict[str, Any]:
    """The smallest experiment, its one device on the contended instrument, each call taking ``latency_s``."""
    driver = {"kind": "simulated", "system": "circuit", "options": {"n_in": 8, "n_out": 8},
              "imperfections": {"latency_call_s": latency_s, "latency_sample_s": 0.0}}
    return {"name": name, "dataset": {"name": "digits", "train_subset": 120, "test_subset": 30},
            "devices": {"circuit": {"driver": driver, "placement": {"instrument": INSTRUMENT},
                                    "twin": {"kind": "physics", "groups": 4, "batch": 16, "epochs": 2}}},
            "stack": [{"kind": "linear", "size": 8}, {"kind": "rescale"}, {"kind": "physical", "device": "circuit"},
                      {"kind": "linear", "size": 10}],
            "schedule": {"epochs": epochs, "batch_size": 20, "micro_batch": 5}}


class Job:
    """One ``pnn-cluster train`` job: its own driver process (so its own Ray job) joined to the cluster; every
    line it prints, kept with the time it arrived."""

    def __init__(self, config: Path, address: str) -> None:
        cmd = [sys.executable, "-m", "pnn_cluster.cli", "train", str(config), "--no-track", "--no-progress",
               "--json", "--address", address]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=config.parent)
        self.lines: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def first(self, pattern: str, timeout_s: float) -> str | None:
        """The first line containing ``pattern``, waiting for it as lines arrive (None: the job ended without)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                hit = next((line for _, line in self.lines if pattern in line), None)
                if hit is not None or not self._reader.is_alive() or time.monotonic() >= deadline:
                    return hit
                self._changed.wait(timeout=max(0.0, deadline - time.monotonic()))

    def result(self, timeout_s: float) -> dict[str, Any] | None:
        self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        last = [line for _, line in self.lines if line.startswith("{")]
        return json.loads(last[-1]) if self.proc.returncode == 0 and last else None

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _exact(result: dict[str, Any] | None, job: Job, epochs: int) -> bool:
    """Finished with every step its schedule has (the steps per epoch as the run itself announced them)."""
    m = TRAINING.search(job.text())
    return bool(result and m and int(m.group(1)) == epochs and result["state"] == "finished"
                and result["steps"] == epochs * int(m.group(2)))


def contention_figures(latency_s: float = 0.1, epochs: int = 4, timeout_s: float = 900) -> dict[str, Any]:
    """Two jobs, one instrument: the second waits while the first holds it, says why, and both finish exactly."""
    import ray

    if ray.is_initialized():
        return _in_subprocess("contention", [f"--contention-latency-s={latency_s}", f"--contention-epochs={epochs}"],
                              timeout_s=timeout_s + 120)
    from actors.cluster import INSTRUMENT_PREFIX
    from pnn_cluster.runner.leases import GOT, WAITS

    # a head for the trainers and a lab PC declaring the one instrument
    cluster = _own_cluster(2, {1: {INSTRUMENT_PREFIX + INSTRUMENT: 1.0}})
    jobs: list[Job] = []
    try:
        with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
            paths = []
            for name in ("contention-first", "contention-second"):
                path = Path(tmp) / f"{name}.yaml"
                path.write_text(json.dumps(contention_config(name, latency_s, epochs)))  # JSON is YAML
                paths.append(path)
            t0 = time.monotonic()
            jobs.append(Job(paths[0], cluster.address))
            # the second is submitted once the first holds the instrument (its device actor has connected)
            if jobs[0].first("-- making twins", timeout_s) is None:
                raise RuntimeError(f"the first job never connected its device:\n{jobs[0].text()[-3000:]}")
            jobs.append(Job(paths[1], cluster.address))
            message = jobs[1].first(WAITS, timeout_s)
            results = [job.result(timeout_s) for job in jobs]
            wall_s = time.monotonic() - t0
        freed = GOT.search(jobs[1].text())
        waits = (results[1] or {}).get("instrument_waits") or {}
        exact = [_exact(r, j, epochs) for r, j in zip(results, jobs)]
        return {"finished": all(r is not None and r["state"] == "finished" for r in results),
                "exact": all(exact), "waited_s": max(waits.values()) if waits else None,
                "waited_line_s": float(freed.group(2)) if freed else None,
                "message": message.strip() if message else None, "steps": [r and r["steps"] for r in results],
                "seconds": [r and round(r["seconds"], 2) for r in results], "wall_s": round(wall_s, 2),
                "first_waited": WAITS in jobs[0].text(),
                "output_tail": None if all(exact) else [j.text()[-2000:] for j in jobs]}
    finally:
        for job in jobs:
            job.kill()
        ray.shutdown()
        cluster.shutdown()


# -- the command line ------------------------------------------------------------------------------------

FIGURES = {"scale": scale_figures, "contention": contention_figures}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON line (and nothing else on stdout)")
    p.add_argument("--only", choices=sorted(FIGURES), action="append", help="this figure only (repeatable)")
    p.add_argument("--stages", type=int, default=STAGES)
    p.add_argument("--replicas", type=int, default=REPLICAS)
    p.add_argument("--nodes", type=int, default=NODES)
    p.add_argument("--latency-s", type=float, default=0.06, help="each scale device's time per call (default 0.06)")
    p.add_argument("--latency-sample-s", type=float, default=0.01,
                   help="each scale device's time per row (default 0.01: 0.1 s a call of 4 rows)")
    p.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch (default 4)")
    p.add_argument("--calls-per-replica", type=int, default=64,
                   help="micro-batches each replica measures per step (default 64)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps of the scale run (default 4)")
    p.add_argument("--contention-latency-s", type=float, default=0.1,
                   help="the contended device's time per call (default 0.1)")
    p.add_argument("--contention-epochs", type=int, default=4, help="epochs of each contending job (default 4)")
    args = p.parse_args(argv)
    for name in ("stages", "replicas", "nodes", "micro_batch", "calls_per_replica", "steps", "contention_epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    for which in args.only or list(FIGURES):
        if which == "scale":
            result["scale"] = scale_figures(args.stages, args.replicas, args.nodes, args.latency_s,
                                            args.latency_sample_s, args.micro_batch, args.calls_per_replica,
                                            args.steps)
        if which == "contention":
            result["contention"] = contention_figures(args.contention_latency_s, args.contention_epochs)
        if not args.json:
            print(which, json.dumps(result[which], indent=1))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

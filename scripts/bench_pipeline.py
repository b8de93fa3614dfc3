"""Benchmark of the micro-batch pipeline over device actors.

A 3-stage stack of simulated SHG devices that take 20, 40 and 10 ms per call
(``Imperfections.latency_call_s``; the device sleeps what its computation
leaves of that), with digital rescaling between them, trained for a few
steps with the RayExecutor. Prints, with ``--json``, one line::

    {"stages_ms": [20, 40, 10], "efficiency": E, "speedup_vs_sequential": S,
     "efficiency_ceiling": C, "step_breakdown_ms": {...},
     "replica_scaling": {"1": 1.0, "2": R2, "4": R4}, "overhead_ratio_zero_latency": O,
     "overhead_planned": {"ratio": O2, "micro_batches": M},
     "twin_offload": {"in_trainer_s": A, "twin_actors_s": B, "speedup": A/B},
     "demo_epoch": {"in_process_s": T1, "ray_s": T2, "ratio": T2/T1, ...},
     "lab_clock": {"factor": F, "step_over_bound": R, ...},
     "scale": {...}, "contention": {...},
     "call_paths": {"actor_call_ms": A, "compiled_graph_ms": C, "ratio": A/C, ...}}

- efficiency: the bottleneck bound (micro-batches per batch x 40 ms) over the
  measured time per batch (an optimizer step included). Filling and draining
  the pipeline once per step costs (20 + 10) ms of it, inherently.
- efficiency_ceiling: the bound over the bound plus filling and draining (a step's first micro-batch waits
  20 ms before the bottleneck starts, its last 10 ms after): what a step without any other cost would reach.
- step_breakdown_ms: where the pipelined step's time goes beyond the bound, per step (means over the timed
  steps): ``fill_drain_ms`` (above), ``device_overrun_ms`` (the bottleneck device's own busy time past
  32 x 40 ms: the simulation's sleep overshoots), ``device_idle_ms`` (the bottleneck idle while the batch is
  measured, fill and drain aside: each call's turnaround in its actor and the first and last round trips),
  ``backward_ms`` (the backward pass once the batch is measured) and ``rest_ms`` (the optimizer step and the
  trainer's bookkeeping). Read from the executor's ``measure_s``/``backward_s`` stats and the device
  actor's ``busy_s``.
- speedup_vs_sequential: the same stack, executor and devices run one
  micro-batch at a time (``PipelineConfig(schedule="sequential")``).
- replica_scaling: throughput with 1, 2 and 4 replicas of the 40 ms device,
  relative to one. It is measured on that stage alone: in the 3-stage stack
  four replicas would make the 20 ms stage the bottleneck, capping the gain at 2.
- overhead_ratio_zero_latency: time per step of the distributed engine over
  the in-process one (SequentialExecutor, devices in this process), both with
  devices that take no time, batch 256 in micro-batches of 32 (8 calls per
  device and step: what each call through an actor costs).
- overhead_runner_always: the same, alternated with it on the same actors,
  with every call that waits for its turn handed to the device actor's runner
  thread (``DeviceWorker.set_handover(0)``), as before calls were timed: by
  default a device whose calls take under ``InTurn.HANDOVER_S`` runs waiting
  calls on their own threads.
- overhead_planned: the same with the micro-batch count left to the executor
  (planned from the devices' declared timing: for devices that take no time,
  one call per step): the overhead of the default path.
- demo_epoch: the shipped ``hybrid_mnist`` stack (twins fitted on fewer
  samples: calibration is not timed), seconds per epoch in one process and on
  Ray (trainer actor, device and twin actors: what ``pnn-cluster train`` does
  by default), alternated, and their ratio.
- lab_clock: the same stack with its devices at their labs' sample rates times
  ``--lab-clock`` (SHG 20 samples/s, circuit 1,000), on Ray: time per step over
  the slowest instrument's own time for the batch in one call.
- twin_offload: one device (5 ms per call) whose twin's VJP takes 40 ms per
  micro-batch of 8 (simulated: the twin sleeps 5 ms per row), batch 64. In the
  trainer the batch's backward pass runs there after the measurements
  (``in_trainer_s``); with 2 twin actors each micro-batch's VJP goes to a free
  one as soon as it is measured, while the next is being measured
  (``twin_actors_s``). ``speedup`` is their ratio.
- call_paths: what one round trip to an actor costs, a micro-batch of 16 x 16
  there and its measurement back, by the path the executor takes (an actor
  method call: submit, wait, fetch) and through a Ray compiled graph
  (``ray.dag``'s ``experimental_compile``: shared-memory channels set up once,
  the lever the executor does not use yet), alternated in rounds on one
  stand-in actor that does no work. What a step could save per device call.

Run on an idle machine for stable figures; ``--address`` joins a running
cluster instead of starting a local Ray.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from actors.cluster import connect
from actors.device import ActorDevice, start_device
from actors.executor import RayExecutor
from actors.twin import RayTwinHandle, start_twin
from pnn_cluster.config import ImperfectionsConfig, SimulatedDriver
from pnn_cluster.data import Dataset
from pnn_cluster.devices.shg import SHGModel
from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
from pnn_cluster.runner import DeviceRecipe
from pnn_cluster.training.pipeline import PipelineConfig, Replica, TwinPool
from pnn_cluster.training.trainer import SequentialExecutor, TrainConfig, Trainer
from pnn_cluster.training.workers import InTurn, twin_payload
from pnn_cluster.twins import build_twin
from pnn_cluster.twins.versions import twin_digest

STAGES_MS = (20, 40, 10)
#: the figures, in the order they are measured (``--sections``)
SECTIONS = ("pipeline", "replicas", "overhead", "offload", "demo", "lab_clock", "scale", "contention", "call_paths")
WIDTH = 16
OPTIONS = {"n_in": WIDTH, "n_out": WIDTH}


def recipe(latency_s: float, seed: int) -> DeviceRecipe:
    # the device's latency is all per call, so a micro-batch costs the same whatever its size
    imp = ImperfectionsConfig(noise=0.01, shot=0.01, gap=0.0, latency_call_s=latency_s, latency_sample_s=0.0)
    return DeviceRecipe(f"shg-{seed}", 0, SimulatedDriver(kind="simulated", system="shg", options=OPTIONS,
                                                          imperfections=imp), seed=seed)


def ideal_twin(device) -> nn.Module:
    return build_twin("physics", device.spec, device.model()).requires_grad_(False)


def stack_of(devices) -> Stack:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, dev in enumerate(devices):
        layers += [Rescale(WIDTH, 0.0, 1.0, margin=0.02), PhysicalLayer(dev, twin=ideal_twin(dev), name=f"shg{i}")]
    layers.append(Affine(WIDTH))
    return Stack(*layers)


def trainer_for(model: Stack, executor, batch: int, micro: int) -> Trainer:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch, WIDTH))
    y = rng.integers(0, WIDTH, batch)
    data = Dataset("bench", x, y, x[:8], y[:8])
    cfg = TrainConfig(epochs=1, batch_size=batch, micro_batch=micro, lr=1e-3, lr_schedule="constant")
    return Trainer(model, data, cfg, executor=executor, progress=False)


def seconds_per_step(trainer: Trainer, steps: int, warmup: int = 1, warm: Any = None) -> float:
    """The median seconds of ``steps`` optimizer steps after ``warmup`` untimed ones (``warm()`` is called
    between them)."""
    x = torch.as_tensor(trainer.data.x_train, dtype=torch.get_default_dtype())
    y = torch.as_tensor(trainer.data.y_train)
    times = []
    for i in range(warmup + steps):
        if i == warmup and warm is not None:
            warm()
        t0 = time.perf_counter()
        trainer.step(x, y)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def start(latency_s: float, seed: int):
    return start_device(recipe(latency_s, seed))


def kill(actors) -> None:
    for a in actors:
        ray.kill(a, no_restart=True)


def pipeline_figures(micro_batches: int, micro: int, steps: int) -> dict[str, float]:
    actors = [start(ms / 1e3, seed=i) for i, ms in enumerate(STAGES_MS)]
    try:
        devices = [ActorDevice(a) for a in actors]
        batch = micro_batches * micro
        bottleneck = actors[STAGES_MS.index(max(STAGES_MS))]
        out, seen = {}, {}

        def warm() -> None:  # after the warm-up step: the timed steps' totals start here
            seen.update(stats=collections.Counter(ex.stats), busy=ray.get(bottleneck.health.remote())["busy_s"])

        for schedule, n in (("pipelined", steps), ("sequential", max(2, steps // 2))):
            ex = RayExecutor(config=PipelineConfig(schedule=schedule))
            out[schedule] = seconds_per_step(trainer_for(stack_of(devices), ex, batch, micro), n, warm=warm)
            if schedule == "pipelined":
                busy = ray.get(bottleneck.health.remote())["busy_s"] - seen["busy"]
                done = collections.Counter(ex.stats)
                done.subtract(seen["stats"])
                timed = max(1, done["steps"])
                parts = {"measure_s": done["measure_s"] / timed, "backward_s": done["backward_s"] / timed,
                         "bottleneck_busy_s": busy / timed}
        bound = micro_batches * max(STAGES_MS) / 1e3
        fill = (sum(STAGES_MS) - max(STAGES_MS)) / 1e3
        # where the pipelined step's time beyond the bound goes, per step (means over the timed steps)
        breakdown = {
            "fill_drain_ms": fill * 1e3,  # the other stages' time for the first and the last micro-batch
            # the bottleneck device's own time past its 40 ms per call (a simulation's sleep overshoots)
            "device_overrun_ms": (parts["bottleneck_busy_s"] - bound) * 1e3,
            # the bottleneck idle while measurements are under way: the calls' turnaround in its actor, and
            # the first and last calls' round trips
            "device_idle_ms": (parts["measure_s"] - parts["bottleneck_busy_s"] - fill) * 1e3,
            "backward_ms": parts["backward_s"] * 1e3,  # the batch's backward pass through the twins
            # the optimizer step and the trainer's bookkeeping (medians and means differ: may be slightly off)
            "rest_ms": (out["pipelined"] - parts["measure_s"] - parts["backward_s"]) * 1e3,
        }
        return {"efficiency": bound / out["pipelined"], "speedup_vs_sequential": out["sequential"] / out["pipelined"],
                "pipelined_s": out["pipelined"], "sequential_s": out["sequential"], "bound_s": bound,
                "ceiling": bound / (bound + fill), "breakdown": {k: round(v, 1) for k, v in breakdown.items()}}
    finally:
        kill(actors)


def replica_figures(micro_batches: int, micro: int, steps: int) -> dict[str, float]:
    bottleneck = max(STAGES_MS) / 1e3
    actors = [start(bottleneck, seed=10 + r) for r in range(4)]
    try:
        devices = [ActorDevice(a) for a in actors]
        batch = micro_batches * micro
        per_batch = {}
        for k in (1, 2, 4):
            model = stack_of(devices[:1])
            layer = model.physical_layers()[0]
            pool = [Replica(d.handle(), twin=ideal_twin(d), name=f"shg0/{j}") for j, d in enumerate(devices[:k])]
            ex = RayExecutor(pools={layer.name: pool})
            per_batch[k] = seconds_per_step(trainer_for(model, ex, batch, micro), steps)
        return {str(k): per_batch[1] / per_batch[k] for k in (1, 2, 4)}
    finally:
        kill(actors)


def overhead_ratio(steps: int, batch: int = 256, micro: int | None = 32, rounds: int = 8,
                   handover_arm: bool = False) -> dict[str, float]:
    local = [recipe(0.0, i).build() for i in range(len(STAGES_MS))]
    in_process = trainer_for(stack_of(local), SequentialExecutor(), batch, micro)
    actors = [start(0.0, seed=i) for i in range(len(STAGES_MS))]
    try:
        remote = [ActorDevice(a) for a in actors]
        ex = RayExecutor()
        distributed = trainer_for(stack_of(remote), ex, batch, micro)
        # steps take tens of ms: alternate short blocks so all see the same load on a shared machine; the third
        # arm has every waiting call handed to the device actors' runner threads, whatever the calls take
        t_local, t_ray, t_runner = [], [], []
        for _ in range(rounds):
            t_local.append(seconds_per_step(in_process, steps, warmup=1))
            t_ray.append(seconds_per_step(distributed, steps, warmup=1))
            if handover_arm:
                ray.get([a.set_handover.remote(0.0) for a in actors])
                t_runner.append(seconds_per_step(distributed, steps, warmup=1))
                ray.get([a.set_handover.remote(InTurn.HANDOVER_S) for a in actors])
    finally:
        kill(actors)
    t_local_s, t_ray_s = statistics.median(t_local), statistics.median(t_ray)
    out = {"ratio": t_ray_s / t_local_s, "in_process_s": t_local_s, "distributed_s": t_ray_s,
           "micro_batches": ex.stats["micro_batches"] / max(1, ex.stats["steps"])}
    if t_runner:
        out["runner_always_s"] = statistics.median(t_runner)
        out["ratio_runner_always"] = out["runner_always_s"] / t_local_s
    return out


class SlowSHGModel(SHGModel):
    """The SHG physics model, taking ``per_row_s`` per row it is asked about: a twin that integrates an ODE or
    runs a large network costs time in proportion to its batch."""

    per_row_s = 0.0

    def forward(self, x, params):
        time.sleep(self.per_row_s * x.shape[0])
        return super().forward(x, params)


def twin_offload_figures(steps: int, batch: int = 64, micro: int = 8, per_micro_s: float = 0.040,
                         device_ms: float = 5, copies: int = 2) -> dict[str, float]:
    actor = start(device_ms / 1e3, seed=20)
    twins = []
    try:
        device = ActorDevice(actor)
        model = stack_of([device])
        layer = model.physical_layers()[0]
        slow = SlowSHGModel.__new__(SlowSHGModel)
        slow.__dict__.update(copy.deepcopy(device.model()).__dict__)  # the device's own model, made slow
        slow.per_row_s = per_micro_s / micro
        layer.twin = build_twin("physics", device.spec, slow)
        in_trainer = seconds_per_step(trainer_for(model, RayExecutor(), batch, micro), steps)
        twins = [start_twin(layer.twin) for _ in range(copies)]
        payload = twin_payload(layer.twin)
        pool = TwinPool([RayTwinHandle(t) for t in twins], payload, twin_digest(payload["state"]))
        ex = RayExecutor(pools={layer.name: [Replica(device.handle(), twins=pool, name=layer.name)]})
        offloaded = seconds_per_step(trainer_for(model, ex, batch, micro), steps)
        assert ex.stats["twin_calls"] > 0
        return {"in_trainer_s": in_trainer, "twin_actors_s": offloaded, "speedup": in_trainer / offloaded}
    finally:
        kill([actor, *twins])


#: the demo's run, cut to what an epoch needs: twins fitted on fewer samples (calibration is not timed),
#: no MLflow run (the tracking benchmark measures that)
DEMO_OVERRIDES = ("devices.optics.twin.groups=60", "devices.circuit.twin.groups=12")


def _epoch_seconds(result) -> list[float]:
    return [h["epoch_seconds"] for h in result.history]


def demo_epoch_figures(epochs: int = 2, rounds: int = 2) -> dict[str, Any]:
    """The shipped ``hybrid_mnist`` stack trained in this process and on Ray (a trainer actor, device and twin
    actors: the default path of ``pnn-cluster train``), side by side: seconds per epoch, the median over
    ``rounds`` runs of each (alternated, so both see the same load), every epoch after the first of a run
    (which includes one-off costs: the optimizer's first step, lazily loaded code)."""
    from actors.launch import RayLauncher
    from pnn_cluster.config import load_config
    from pnn_cluster.config.loader import example_config_path
    from pnn_cluster.runner.launch import InProcessLauncher

    cfg = load_config(example_config_path("hybrid_mnist"), [*DEMO_OVERRIDES, f"schedule.epochs={epochs}"])
    times: dict[str, list[float]] = {"in_process": [], "ray": []}
    accs: dict[str, list[float]] = {"in_process": [], "ray": []}
    steps = {}
    for _ in range(rounds):
        for name, launcher in (("in_process", InProcessLauncher()), ("ray", RayLauncher(out=_Quiet()))):
            # the in-process run prints its progress: to stderr, stdout holds the JSON line
            with contextlib.redirect_stdout(sys.stderr):
                result = launcher.run(cfg)
            times[name] += _epoch_seconds(result)[1:] or _epoch_seconds(result)
            accs[name].append(result.test_acc)
            steps[name] = (result.steps, result.executor.get("micro_batches"))
    t_in, t_ray = statistics.median(times["in_process"]), statistics.median(times["ray"])
    return {"in_process_s": round(t_in, 3), "ray_s": round(t_ray, 3), "ratio": round(t_ray / t_in, 3),
            "epochs": epochs, "rounds": rounds, "steps": steps["ray"][0],
            "ray_micro_batches_per_step": steps["ray"][1] / max(1, steps["ray"][0]) if steps["ray"][1] else None,
            "test_acc": {k: [round(a, 4) for a in v] for k, v in accs.items()}}


class _Quiet:
    """Where the Ray launcher prints the trainer's progress: nowhere (stdout holds the JSON line)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def lab_clock_figures(factor: float = 1.0, steps: int = 4) -> dict[str, Any]:
    """The shipped ``hybrid_mnist`` stack with its devices at their labs' sample rates (SHG optics 20
    samples/s, analog circuit 1,000: :mod:`pnn_cluster.devices.lab`) times ``factor``, trained on Ray: the
    time per step (the second epoch of ``steps`` steps, no validation split) over the bound, the slowest
    instrument's own time for the batch in one call. What a step adds to the bound is fixed (the last
    micro-batch's way back through the twins, the optimizer step): a smaller ``factor`` (slower devices,
    nearer the real lab's 1) makes it a smaller share."""
    from actors.launch import RayLauncher
    from pnn_cluster.config import load_config
    from pnn_cluster.config.loader import example_config_path
    from pnn_cluster.runner.build import device_recipes

    cfg = load_config(example_config_path("hybrid_mnist"), [
        "devices.optics.twin.groups=12", "devices.circuit.twin.groups=6", "schedule.epochs=2",
        "dataset.val_fraction=0", "schedule.keep=last", f"dataset.train_subset={64 * steps}", "dataset.test_subset=64",
        f"devices.optics.driver.imperfections.lab_clock={factor}",
        f"devices.circuit.driver.imperfections.lab_clock={factor}"])
    with contextlib.redirect_stdout(sys.stderr):
        result = RayLauncher(out=_Quiet()).run(cfg)
    batch = cfg.schedule.batch_size
    bound = max(recipes[0].build().spec.timing.seconds(batch) for recipes in device_recipes(cfg).values())
    per_step = result.history[-1]["epoch_seconds"] / steps
    return {"factor": factor, "step_over_bound": round(per_step / bound, 3), "step_s": round(per_step, 4),
            "bound_s": round(bound, 4), "steps": result.steps,
            "micro_batches_per_step": result.executor.get("micro_batches", 0) / max(1, result.steps)}


@ray.remote(num_cpus=0)
class _Echo:
    """A stand-in device actor that takes no time: what is left of a call is the path to it and back."""

    def measure(self, x: np.ndarray) -> np.ndarray:
        return x * 2.0


def call_path_figures(calls: int = 200, rounds: int = 3) -> dict[str, Any]:
    """Round trip of one micro-batch by an actor method call and by a compiled graph, alternated."""
    from ray.dag import InputNode

    x = np.random.default_rng(0).random((16, WIDTH))
    plain_actor, graph_actor = _Echo.remote(), _Echo.remote()
    with InputNode() as inp:
        graph = graph_actor.measure.bind(inp).experimental_compile()
    plain, compiled = [], []
    try:
        ray.get(plain_actor.measure.remote(x))
        ray.get(graph.execute(x))
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(calls):
                ray.get(plain_actor.measure.remote(x))
            plain.append((time.perf_counter() - t0) / calls)
            t0 = time.perf_counter()
            for _ in range(calls):
                ray.get(graph.execute(x))
            compiled.append((time.perf_counter() - t0) / calls)
    finally:
        graph.teardown()
        kill([plain_actor, graph_actor])
    a, c = statistics.median(plain), statistics.median(compiled)
    return {"actor_call_ms": round(a * 1e3, 3), "compiled_graph_ms": round(c * 1e3, 3), "ratio": round(a / c, 3),
            "calls": calls, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON line (and nothing else on stdout)")
    p.add_argument("--micro-batches", type=int, default=32, help="micro-batches per batch (default 32)")
    p.add_argument("--micro-batch", type=int, default=8, help="samples per micro-batch (default 8)")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per figure (default 6)")
    p.add_argument("--lab-clock", type=float, default=1.0,
                   help="lab_clock: the devices' real sample rates times this (default 1: the labs' own)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated figures to measure (default all: {','.join(SECTIONS)})")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else local)")
    args = p.parse_args(argv)
    for name in ("micro_batches", "micro_batch", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    sections = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: {unknown[0]!r} is not one of {', '.join(SECTIONS)}")
    torch.set_num_threads(1)
    # actors' log lines are forwarded to the driver's stdout; with --json stdout is one line of JSON
    connect(args.address, log_to_driver=not args.json)
    result: dict[str, Any] = {"stages_ms": list(STAGES_MS)}
    pipe = over = offload = None
    if "pipeline" in sections:
        pipe = pipeline_figures(args.micro_batches, args.micro_batch, args.steps)
        result.update(efficiency=round(pipe["efficiency"], 3),
                      speedup_vs_sequential=round(pipe["speedup_vs_sequential"], 3),
                      efficiency_ceiling=round(pipe["ceiling"], 3), step_breakdown_ms=pipe["breakdown"])
    if "replicas" in sections:
        reps = replica_figures(args.micro_batches, args.micro_batch, args.steps)
        result["replica_scaling"] = {k: round(v, 3) for k, v in reps.items()}
    if "overhead" in sections:
        over = overhead_ratio(args.steps, handover_arm=True)
        planned = overhead_ratio(args.steps, micro=None)
        result["overhead_ratio_zero_latency"] = round(over["ratio"], 3)
        # the same actors with every waiting call handed to their runner threads (as before calls were timed)
        result["overhead_runner_always"] = round(over["ratio_runner_always"], 3)
        result["overhead_planned"] = {"ratio": round(planned["ratio"], 3), "micro_batches": planned["micro_batches"]}
    if "offload" in sections:
        offload = twin_offload_figures(args.steps)
        result["twin_offload"] = {k: round(v, 4) for k, v in offload.items()}
    if "demo" in sections:
        result["demo_epoch"] = demo_epoch_figures()
    if "lab_clock" in sections:
        result["lab_clock"] = lab_clock_figures(args.lab_clock)
    if "scale" in sections or "contention" in sections:
        import bench_lab_scale  # a cluster of its own per figure (run in a subprocess: this one is connected)

        if "scale" in sections:
            result["scale"] = bench_lab_scale.scale_figures()
        if "contention" in sections:
            result["contention"] = bench_lab_scale.contention_figures()
    if "call_paths" in sections:
        result["call_paths"] = call_path_figures()
    if args.json:
        print(json.dumps(result))
    else:
        if pipe is not None:
            print(f"stages {list(STAGES_MS)} ms, {args.micro_batches} micro-batches of {args.micro_batch} per batch")
            print(f"  pipelined   {pipe['pipelined_s'] * 1e3:8.1f} ms/batch "
                  f"(bottleneck bound {pipe['bound_s'] * 1e3:.0f} ms) -> efficiency {pipe['efficiency']:.3f}")
            print(f"  sequential  {pipe['sequential_s'] * 1e3:8.1f} ms/batch "
                  f"-> speedup {pipe['speedup_vs_sequential']:.2f}x")
        if over is not None:
            print(f"  zero latency, batch 256: in-process {over['in_process_s'] * 1e3:.1f} ms, distributed "
                  f"{over['distributed_s'] * 1e3:.1f} ms per step -> ratio {over['ratio']:.2f}")
        if offload is not None:
            print(f"  twin VJP 40 ms per micro-batch: in the trainer {offload['in_trainer_s'] * 1e3:.0f} ms, on 2 "
                  f"twin actors {offload['twin_actors_s'] * 1e3:.0f} ms per step -> speedup {offload['speedup']:.2f}x")
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training step time with MLflow tracking on, over the same step with tracking off, measured side by side.

Prints one JSON line::

    {"step_time_ratio_on_off": R, "ratio_mean": M, "step_ms_on": A, "step_ms_off": B, "pairs": N,
     "flushes": F, "flush_every_s": S, "config": NAME, "latency": true}

Two identical experiments are built from one configuration with the runner's
parts (same devices, same seeds, same data, the runner's pipeline executor;
every twin the uncalibrated ideal model): one trainer carries an :class:`MlflowCallback`
writing to a temporary SQLite store, the other none. They take turns one
step at a time on the same batch, in ABBA order, so load from other
processes on the machine falls on both alike. R is the median over pairs of
(step time with tracking) / (step time without); ``ratio_mean`` is the
ratio of the total times, which also carries the steps that wrote the
buffered metrics (journaled every ``flush_every_s`` and sent by the outbox thread).
A and B are median step times. Target: R <= 1.05. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(cfg, data):
    """The configuration's stack on devices of its own, ready to train, as the runner prepares it.

    Every twin is ``kind: ideal`` here: the shell of the configured kind is the uncalibrated ideal
    model already, so nothing is fitted (a twin's quality does not change a step's cost).
    """
    from pnn_cluster.layers import init_rescales_
    from pnn_cluster.runner import InProcessPlacement, build_stack, device_recipes
    from pnn_cluster.runner.build import train_config
    from pnn_cluster.runner.twins import twin_shell
    from pnn_cluster.training.pipeline import PipelineExecutor, Replica
    from pnn_cluster.training.trainer import Trainer

    placement = InProcessPlacement()
    refs = placement.start_devices([r for rs in device_recipes(cfg).values() for r in rs])
    stack = build_stack(cfg, {ref.recipe.name: ref.device for ref in refs if ref.recipe.replica == 0},
                        data.n_features)
    stack.set_mode(cfg.method)
    layers = {layer.name: layer for layer in stack.physical_layers()}
    executor = PipelineExecutor(placement.backend)
    pools: dict[str, list[Replica]] = {name: [] for name in layers}
    for ref in refs:
        name = ref.recipe.name
        twin = twin_shell(cfg.devices[name].twin, ref).requires_grad_(False)
        if ref.recipe.replica == 0:
            layers[name].twin = twin
        pools[name].append(Replica(ref.handle, twin=twin, name=ref.label, timeout_s=cfg.devices[name].timeout_s))
    for name, replicas in pools.items():
        executor.set_pool(name, replicas)
    xs = torch.as_tensor(data.x_train[: cfg.init.samples], dtype=torch.get_default_dtype())
    with stack.mode_as("in_silico" if cfg.method == "in_silico" else "pat"):
        init_rescales_(stack, xs, spread=cfg.init.spread, logit_scale=cfg.init.logit_scale)
    return stack, executor, train_config(cfg), placement, Trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the one-line JSON result (always printed)")
    p.add_argument("--config", default=None, help="experiment YAML (default: the shipped hybrid_mnist)")
    p.add_argument("--pairs", type=int, default=300, help="on/off step pairs (default 300)")
    p.add_argument("--flush-every-s", type=float, default=None,
                   help="seconds between metric writes (default: the configuration's tracking.flush_every_s)")
    p.add_argument("--no-latency", action="store_true",
                   help="devices without simulated latency (the hardest case for the overhead ratio)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from pnn_cluster.config import example_config_path, load_config
    from pnn_cluster.runner import load_data
    from pnn_cluster.tracking import MlflowCallback

    overrides = ["dataset.train_subset=2000", "dataset.test_subset=200"]
    path = args.config or example_config_path("hybrid_mnist")
    cfg = load_config(path)
    for name, dev in cfg.devices.items():
        # twin quality does not change a step's cost; the ideal model saves the fit
        overrides.append(f"devices.{name}.twin.kind=ideal")
        if args.no_latency and dev.driver.kind == "simulated":
            overrides += [f"devices.{name}.driver.imperfections.latency_call_s=0",
                          f"devices.{name}.driver.imperfections.latency_sample_s=0"]
    cfg = load_config(path, overrides)
    data = load_data(cfg)
    log(f"bench_tracking: {cfg.name}, batch {cfg.schedule.batch_size}, {args.pairs} pairs of steps")

    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        flush = args.flush_every_s if args.flush_every_s is not None else cfg.tracking.flush_every_s
        tracker = MlflowCallback(uri, experiment="bench-tracking", run_name="tracking on", config=cfg.resolved(),
                                 flush_every_s=flush, command="bench", runs_root=Path(tmp) / "runs")
        stack_on, executor_on, train, placement_on, Trainer = build(cfg, data)
        stack_off, executor_off, _, placement_off, _ = build(cfg, data)
        on = Trainer(stack_on, data, train, callbacks=[tracker], executor=executor_on, progress=False)
        off = Trainer(stack_off, data, train, executor=executor_off, progress=False)
        tracker.on_train_start(on)  # the run, its parameters and the device snapshot, as in a real training

        xs = torch.as_tensor(data.x_train, dtype=torch.get_default_dtype())
        ys = torch.as_tensor(data.y_train)
        bs = cfg.schedule.batch_size
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, len(ys), (bs,), generator=g) for _ in range(32)]

        def timed_step(trainer, idx) -> float:
            t0 = time.perf_counter()
            trainer.step(xs[idx], ys[idx])
            return time.perf_counter() - t0

        flushes = 0
        original_flush = tracker.flush

        def counting_flush(wait: bool = False) -> None:
            nonlocal flushes
            flushes += 1
            original_flush(wait)

        tracker.flush = counting_flush
        for idx in batches[:3]:  # warm-up: first-call allocations and caches
            timed_step(on, idx), timed_step(off, idx)
        ratios, t_on, t_off = [], [], []
        for i in range(args.pairs):
            idx = batches[i % len(batches)]
            if i % 2 == 0:  # ABBA: neither side always goes first
                a, b = timed_step(on, idx), timed_step(off, idx)
            else:
                b, a = timed_step(off, idx), timed_step(on, idx)
            t_on.append(a)
            t_off.append(b)
            ratios.append(a / b)
        tracker.end()
        placement_on.close()
        placement_off.close()
    result = {
        "step_time_ratio_on_off": round(statistics.median(ratios), 4),
        "ratio_mean": round(sum(t_on) / sum(t_off), 4),
        "step_ms_on": round(1000 * statistics.median(t_on), 3),
        "step_ms_off": round(1000 * statistics.median(t_off), 3),
        "pairs": args.pairs, "flushes": flushes, "flush_every_s": flush,
        "config": cfg.name, "latency": not args.no_latency,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``pnn-cluster demo``: the hybrid optical-electronic stack on MNIST, PAT against in silico."""

from __future__ import annotations

import argparse
import json
import time

from pnn_cluster.commands._table import format_table
from pnn_cluster.experiments import METHODS, TASKS, run_method
from pnn_cluster.tracking import add_tracking_args, demo_tracking


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="train the hybrid SHG-optics + analog-circuit stack on MNIST (PAT vs in silico)",
        description="Calibrates digital twins of a simulated SHG optics device and an analog circuit, trains "
                    "the hybrid stack with physics-aware training and in silico, and prints the test accuracy "
                    "measured on the physical devices, the device samples used and the wall time per method.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (under 2 minutes)")
    p.add_argument("--task", default="hybrid_mnist", choices=sorted(TASKS), help="task to run")
    p.add_argument("--methods", default="pat,in_silico",
                   help=f"comma-separated methods from {', '.join(METHODS)} (default: pat,in_silico)")
    p.add_argument("--seed", type=int, default=0, help="seed of devices, data order and initialisation")
    p.add_argument("--data", default=None, help="dataset file, for tasks that read one (vowels CSV)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line as well")
    p.add_argument("--address", default=None,
                   help="join the Ray cluster at this address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--in-process", action="store_true", help="run devices and training in this process, without Ray")
    add_tracking_args(p)
    p.set_defaults(func=run)


def parse_methods(text: str) -> list[str]:
    from pnn_cluster.cli import UsageError

    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"--methods: unknown method(s) {bad or text!r}; allowed: {', '.join(METHODS)}")
    return methods


def run(args: argparse.Namespace) -> int:
    params = {k: getattr(args, k) for k in ("task", "methods", "quick", "seed")}
    with demo_tracking(args, params) as tracking:  # a run for the demo, a child run per method
        return _run(args, tracking)


def _run(args: argparse.Namespace, tracking) -> int:
    methods = parse_methods(args.methods)
    task = TASKS[args.task]
    print(f"pnn-cluster demo: task {task.name} ({task.doc}){' [quick]' if args.quick else ''}")
    t0 = time.perf_counter()
    results = []
    runner = run_method if args.in_process else _distributed(args)
    for m in methods:
        print(f"-- {m}: {'calibrating twins, ' if m != 'oracle' else ''}training ...", flush=True)
        r = runner(task, m, quick=args.quick, seed=args.seed, data_path=args.data, progress=True,
                   callbacks=tracking.callbacks(m, task, task.quick_train if args.quick else task.train))
        tracking.record(r)
        results.append(r)
        print(f"   {m}: test accuracy {r.test_acc:.3f} on the physical devices, {r.device_samples} device "
              f"samples, {r.seconds:.1f} s", flush=True)
    print()
    print(results_table(results))
    print(f"\ntotal wall time {time.perf_counter() - t0:.1f} s")
    if args.json:
        print(json.dumps({"task": task.name, "methods": {r.method: r.summary() for r in results}}))
    return 0


def results_table(results) -> str:
    rows = [("method", "test acc (physical)", "device samples", "twin NMSE", "wall time (s)")]
    for r in results:
        rows.append((r.method, f"{r.test_acc:.3f}", f"{r.device_samples:,}",
                     "-" if r.twin_nmse is None else f"{r.twin_nmse:.2e}", f"{r.seconds:.1f}"))
    return format_table(rows)


def _distributed(args: argparse.Namespace):
    """run_method with every device in its own Ray actor; Ray is imported only when used."""
    from functools import partial

    from actors.trainer import run_method_distributed

    return partial(run_method_distributed, address=args.address)

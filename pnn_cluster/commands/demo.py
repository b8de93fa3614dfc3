"""``pnn-cluster demo``: the hybrid optical-electronic stack on MNIST, PAT against in silico.

The demo is the shipped ``hybrid_mnist.yaml`` (or another shipped configuration, ``--task``) run once per
method through the same runner as ``pnn-cluster train``: each method is an MLflow run of its own, a child
of the demo's run, that ``pnn-cluster evaluate RUN_ID`` can measure again.
"""

from __future__ import annotations

import argparse
import json
import time

from pnn_cluster.commands._table import format_table
from pnn_cluster.commands._tracking import add_tracking_args, demo_tracking
from pnn_cluster.commands.train import add_placement_args, launcher_for, tracking_for
from pnn_cluster.config import METHODS, example_config_path, example_configs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="train the hybrid SHG-optics + analog-circuit stack on MNIST (PAT vs in silico)",
        description="Calibrates digital twins of a simulated SHG optics device and an analog circuit, trains "
                    "the hybrid stack with physics-aware training and in silico, and prints the test accuracy "
                    "measured on the physical devices, the device samples used and the wall time per method. "
                    "The stack is pnn_cluster/configs/hybrid_mnist.yaml; every device runs in its own Ray actor "
                    "and the loop in a trainer actor (a local Ray is started), unless --in-process.",
    )
    p.add_argument("--quick", action="store_true", help="the configuration's quick version (about 2 minutes)")
    p.add_argument("--task", default="hybrid_mnist", choices=example_configs(),
                   help="shipped configuration to run (pnn_cluster/configs/NAME.yaml)")
    p.add_argument("--methods", default="pat,in_silico,ablation,digital",
                   help=f"comma-separated methods from {', '.join(METHODS)} (default: pat,in_silico,ablation,digital: "
                        "the ablation trains the same digital layers with the physical ones replaced by fixed random "
                        "orthogonal maps, digital with trainable MLPs of as many parameters as the devices have "
                        "settings, so the table shows what the physics adds; logistic regression on the raw "
                        "features and the paper's figure are printed beside them)")
    p.add_argument("--seed", type=int, default=0, help="seed of devices, data order and initialisation")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration key, e.g. --set dataset.path=vowels.csv (repeatable)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line as well")
    add_placement_args(p)
    add_tracking_args(p)
    p.set_defaults(func=run, no_progress=True)


def parse_methods(text: str) -> list[str]:
    from pnn_cluster.commands import UsageError

    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"--methods: unknown method(s) {bad or text!r}; allowed: {', '.join(METHODS)}")
    return methods


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.commands import UsageError
    from pnn_cluster.config import ConfigError, load_config

    methods = parse_methods(args.methods)
    try:
        base = load_config(example_config_path(args.task))
        if args.quick:  # what --set says wins over the quick section
            base = base.quick_version()
        base = base.with_overrides([*args.overrides, f"seed={args.seed}"])
        configs = {m: base.with_overrides([f"method={m}"]) for m in methods}
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    params = {"task": args.task, "methods": ",".join(methods), "quick": args.quick, "seed": args.seed}
    with demo_tracking(args, params) as tracking:  # a run for the demo, a child run per method
        return _run(args, base, configs, tracking)


def _run(args: argparse.Namespace, base, configs, tracking) -> int:
    print(f"pnn-cluster demo: {base.name} ({base.description}){' [quick]' if args.quick else ''}", flush=True)
    t0 = time.perf_counter()
    launcher = launcher_for(args)
    results = []
    for method, cfg in configs.items():
        doing = {"oracle": "training", "ablation": "training the digital layers alone (fixed random maps for the "
                 "physical ones)", "digital": "training the digital layers with parameter-matched MLPs for the "
                 "physical ones"}.get(method, "calibrating twins, training")
        print(f"-- {method}: {doing} ...", flush=True)
        child = tracking.child(method)
        track = tracking_for(cfg, args, **child) if child is not None else None
        r = launcher.run(cfg, tracking=track)
        tracking.record(r)
        results.append(r)
        if r.state == "stopped":
            print("stopped", flush=True)
            return 130
        where = "digitally, no device" if cfg.digital_only else "on the physical devices"
        print(f"   {method}: test accuracy {r.test_acc:.3f} {where}, {r.device_samples_total} device "
              f"samples, {r.seconds:.1f} s", flush=True)
    logistic = _logistic(base)
    print()
    print(results_table(results, logistic, base.reference))
    print(f"\ntotal wall time {time.perf_counter() - t0:.1f} s")
    if args.json:
        print(json.dumps({"task": base.name, "logistic": logistic and logistic["test_acc"],
                          "paper": base.reference.accuracy if base.reference else None, "methods": {
            r.method: {"test_acc": r.test_acc, "device_samples": r.device_samples_total, "seconds": r.seconds,
                       "run_id": r.run_id, "device_actors": r.device_actors, "twin_actors": r.twin_actors,
                       "trainer_actor": r.trainer_actor} for r in results}}))
    return 0


def _logistic(cfg) -> dict | None:
    """Logistic regression on the run's raw features and split (regularisation chosen on validation)."""
    from pnn_cluster.baselines import logistic_baseline
    from pnn_cluster.runner import load_data

    data = load_data(cfg)
    if len(data.y_val) == 0:
        return None
    return logistic_baseline(data)


def results_table(results, logistic: dict | None = None, reference=None) -> str:
    rows = [("method", "test accuracy", "device samples", "twin NMSE", "wall time (s)")]
    for r in results:
        rows.append((r.method, f"{r.test_acc:.3f}", f"{r.device_samples_total:,}",
                     "-" if r.twin_nmse is None else f"{r.twin_nmse:.2e}", f"{r.seconds:.1f}"))
    if logistic is not None:
        rows.append(("logistic regression", f"{logistic['test_acc']:.3f}", "0", "-", "-"))
    if reference is not None:
        rows.append(("the paper", f"{reference.accuracy:.3f}", "-", "-", "-"))
    table = format_table(rows)
    if reference is not None:
        table += f"\n(the paper: {reference.source})"
    return table

"""PAT against in silico and the oracle, on the paper's tasks and across the sim-reality gap.

Prints one JSON line::

    {"tasks": [{"task": NAME, "methods": {"oracle": {"test_acc", "device_samples", "seconds"},
                                         "pat": {...}, "in_silico": {...}}}, ...],
     "sweep": [{"gap": G, "twin_nmse": E, "oracle": A, "pat": A, "in_silico": A}, ...]}

Accuracies are fractions measured on the (simulated) physical devices. The
sweep runs ``hybrid_mnist`` with a twin that does not learn the gap (the
uncalibrated ideal model), at several sizes of the device's miscalibration;
``twin_nmse`` is measured on the devices, averaged over the stack's layers;
each point averages several device seeds (each seed is a different physical
copy with its own miscalibration pattern).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from pnn_cluster.experiments import METHODS, TASKS, default_vowels_path, run_method, task_dataset
from pnn_cluster.training.trainer import TrainConfig

FULL_GAPS = [0.5, 1.2, 2.0, 2.8, 3.6]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the one-line JSON result (always printed)")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (under 3 minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gaps", default=None, help="comma-separated gap sizes for the sweep")
    p.add_argument("--tasks", default="hybrid_mnist,shg_vowels")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--sweep-seeds", type=int, default=None,
                   help="device/initialisation seeds averaged per sweep point (default 2, 1 with --quick)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t_all = time.perf_counter()

    out: dict = {"tasks": [], "sweep": []}
    for name in [t for t in args.tasks.split(",") if t]:
        task = TASKS[name]
        if task.dataset == "vowels" and default_vowels_path() is None:
            log(f"skipping {name}: vowel CSV not found (set PNN_VOWELS_CSV)")
            continue
        data = task_dataset(task, quick=args.quick)
        methods = {}
        for m in METHODS:
            r = run_method(task, m, quick=args.quick, seed=args.seed, data=data)
            methods[m] = r.summary()
            log(f"{name:14s} {m:10s} acc {r.test_acc:.3f}  samples {r.device_samples:>8d}  {r.seconds:6.1f} s")
        out["tasks"].append({"task": name, "methods": methods})

    if not args.no_sweep:
        gaps = [float(g) for g in args.gaps.split(",")] if args.gaps else FULL_GAPS
        task = TASKS["hybrid_mnist"]
        if args.quick:
            # the sweep's shape, not its polish: a smaller subset and two epochs per point
            task = dataclasses.replace(task, quick_subset=(1000, 300),
                                       quick_train=TrainConfig(epochs=2, batch_size=64, lr=task.quick_train.lr))
        data = task_dataset(task, quick=args.quick)
        seeds = args.sweep_seeds or (1 if args.quick else 2)
        for g in gaps:
            acc: dict[str, list[float]] = {m: [] for m in METHODS}
            nmses: list[float] = []
            for k in range(seeds):
                for m in METHODS:
                    r = run_method(task, m, quick=args.quick, seed=args.seed + k, gap=g, twin="ideal", data=data)
                    acc[m].append(r.test_acc)
                    if r.twin_nmse is not None and m == "pat":
                        nmses.append(r.twin_nmse)
            row: dict = {"gap": g, "twin_nmse": sum(nmses) / len(nmses), "seeds": seeds}
            row.update({m: sum(v) / len(v) for m, v in acc.items()})
            log(f"sweep gap {g:4.2f}  twin NMSE {row['twin_nmse']:.4f}  oracle {row['oracle']:.3f}  "
                f"pat {row['pat']:.3f}  in_silico {row['in_silico']:.3f}  ({seeds} seed(s))")
            out["sweep"].append(row)
    out["seconds"] = time.perf_counter() - t_all
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

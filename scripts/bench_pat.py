"""PAT against in silico and the oracle, on the paper's tasks and across the sim-reality gap.

Prints one JSON line::

    {"tasks": [{"task": NAME, "methods": {"oracle": {"test_acc", "device_samples", "seconds"},
                                         "pat": {...}, "in_silico": {...}}}, ...],
     "sweep": [{"gap": G, "twin_nmse": E, "oracle": A, "pat": A, "in_silico": A}, ...]}

Accuracies are fractions measured on the (simulated) physical devices;
``device_samples`` counts every measurement a method cost (calibration,
initialisation and training). Each task is its shipped configuration
(``pnn_cluster/configs/NAME.yaml``; ``--quick``: its ``quick`` section) run
through the same runner as ``pnn-cluster train``, in this process. The
sweep runs ``hybrid_mnist`` with a twin that does not learn the gap (the
uncalibrated ideal model, ``twin.kind: ideal``), at several sizes of the
device's miscalibration (``driver.imperfections.gap``);
``twin_nmse`` is measured on the devices, averaged over the stack's layers;
each point averages several device seeds (each seed is a different physical
copy with its own miscalibration pattern).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from pnn_cluster.config import ExperimentConfig, example_config_path, load_config
from pnn_cluster.runner import InProcessPlacement, RunResult, default_vowels_path, run_experiment

METHODS = ("oracle", "pat", "in_silico")
FULL_GAPS = [0.5, 1.2, 2.0, 2.8, 3.6]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cfg: ExperimentConfig, method: str) -> RunResult:
    return run_experiment(cfg.with_overrides([f"method={method}"]), InProcessPlacement(), echo=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the one-line JSON result (always printed)")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (under 3 minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gaps", default=None, help="comma-separated gap sizes for the sweep")
    p.add_argument("--tasks", default="hybrid_mnist,shg_vowels", help="shipped configurations to run")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--sweep-seeds", type=int, default=None,
                   help="device/initialisation seeds averaged per sweep point (default 2, 1 with --quick)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of every configuration run, e.g. --set schedule.epochs=1 (repeatable)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t_all = time.perf_counter()

    def configuration(name: str, extra: list[str] = ()) -> ExperimentConfig:
        cfg = load_config(example_config_path(name))
        if args.quick:
            cfg = cfg.quick_version()
        return cfg.with_overrides([*extra, *args.overrides, "tracking.enabled=false"])

    out: dict = {"tasks": [], "sweep": []}
    for name in [t for t in args.tasks.split(",") if t]:
        cfg = configuration(name, [f"seed={args.seed}"])
        if cfg.dataset.name == "vowels" and cfg.dataset.path is None and default_vowels_path() is None:
            log(f"skipping {name}: vowel CSV not found (set PNN_VOWELS_CSV)")
            continue
        methods = {}
        for m in METHODS:
            r = run(cfg, m)
            methods[m] = {"test_acc": r.test_acc, "device_samples": r.device_samples_total, "seconds": r.seconds}
            log(f"{name:14s} {m:10s} acc {r.test_acc:.3f}  samples {r.device_samples_total:>8d}  {r.seconds:6.1f} s")
        out["tasks"].append({"task": name, "methods": methods})

    if not args.no_sweep:
        gaps = [float(g) for g in args.gaps.split(",")] if args.gaps else FULL_GAPS
        # the sweep's shape, not its polish: with --quick a smaller subset and two epochs per point
        quick = ["dataset.train_subset=1000", "dataset.test_subset=300", "schedule.epochs=2"] if args.quick else []
        names = load_config(example_config_path("hybrid_mnist")).physical_devices()
        seeds = args.sweep_seeds or (1 if args.quick else 2)
        for g in gaps:
            acc: dict[str, list[float]] = {m: [] for m in METHODS}
            nmses: list[float] = []
            for k in range(seeds):
                # the ideal twin is measured against the devices (not fitted): a few groups are enough
                twin = [f"devices.{d}.{key}" for d in names for key in (
                    f"driver.imperfections.gap={g}", "twin.kind=ideal", "twin.groups=8", "twin.batch=64")]
                cfg = configuration("hybrid_mnist", [*quick, *twin, f"seed={args.seed + k}"])
                for m in METHODS:
                    r = run(cfg, m)
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

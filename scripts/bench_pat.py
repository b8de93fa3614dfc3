"""PAT against in silico, the oracle, a digital ablation and logistic regression, over seeds; the twins.

Prints one JSON line::

    {"seeds": N, "quick": bool,
     "tasks": [{"task": NAME, "methods": {"oracle": {"mean", "sd", "values", "val_mean"}, "pat": {...},
                                         "in_silico": {...}, "ablation": {...}},
                "logistic": A, "logistic_val": A, "device_samples": {"pat": N, ...}}, ...],
     "sweep": [{"gap": G, "twin_nmse": E, "oracle": A, "pat": A, "in_silico": A, "seeds": N}, ...],
     "twins": [{"system": NAME, "noise_floor": F, "physics": E, "residual": E, "mlp": E,
                "device_samples": N, "best": KIND}, ...],
     "seconds": S}

Protocol. Every task is its shipped configuration (``pnn_cluster/configs/NAME.yaml``; ``--quick``: its
``quick`` section) run through the same runner as ``pnn-cluster train``. Each seed is a different
physical copy of every device (its own miscalibration and noise), initialisation and batch order.
Training reads the validation split carved from train (``dataset.val_fraction``); the test split is
measured once per run, on the (simulated) physical devices, after training. ``ablation`` is the same
stack with every physical layer replaced by a fixed digital map of its shape (identity where widths
match), trained the same way; ``logistic`` is logistic regression on the raw features, its
regularisation chosen on the same validation split. ``device_samples`` counts every measurement a
method cost (twin calibration, initialisation, training), mean over seeds.

The sweep runs ``hybrid_mnist`` with a twin that does not learn the gap (the uncalibrated ideal model,
``twin.kind: ideal``) at several sizes of the devices' miscalibration; ``twin_nmse`` is measured on
the devices, averaged over the stack's layers and seeds.

The twins section collects ``--twin-samples`` device samples (two repeats of each input, so the
noise floor is measured) from each simulated system with its unmodelled physics on, fits the
physics, residual and MLP twins with early stopping on held-out parameter settings, and reports each
one's NMSE on a further held-out set next to the noise floor.

Runs are Ray tasks, ``--workers`` at a time (one CPU each); ``--workers 0`` runs them in this process.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

TASKS = ("hybrid_mnist", "shg_vowels", "oscillators_mnist")
METHODS = ("oracle", "pat", "in_silico", "ablation")
SWEEP_METHODS = ("oracle", "pat", "in_silico")
FULL_GAPS = (0.5, 1.5, 2.5, 3.5, 4.5)
QUICK_GAPS = (0.5, 2.5, 4.5)
#: --quick: the benchmark's shape in minutes, not its figures (on top of each task's own quick section)
QUICK = ["dataset.train_subset=300", "dataset.test_subset=200", "schedule.epochs=1", "init.samples=64"]
QUICK_TWIN = {"groups": 24, "batch": 16, "epochs": 5}
#: the twins section: each system at the size a task uses it
TWIN_SYSTEMS = {
    "shg": {"n_in": 24, "n_out": 24},
    "circuit": {"n_in": 24, "n_out": 24},
    "plate": {},
    "oscillators": {"n_in": 24, "n_out": 24},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def configuration(name: str, quick: bool, overrides: list[str]):
    from pnn_cluster.config import example_config_path, load_config

    cfg = load_config(example_config_path(name))
    if quick:
        cfg = cfg.quick_version()
        twins = [f"devices.{d}.twin.{k}={v}" for d in cfg.physical_devices() for k, v in QUICK_TWIN.items()
                 if cfg.devices[d].twin.kind != "ideal"]
        cfg = cfg.with_overrides([*QUICK, *twins])
    # TASK:KEY=VALUE applies to that task alone
    mine = [o.split(":", 1)[1] if ":" in o.split("=", 1)[0] else o for o in overrides
            if ":" not in o.split("=", 1)[0] or o.split(":", 1)[0] == name]
    return cfg.with_overrides([*mine, "tracking.enabled=false"])


def run_task(name: str, quick: bool, overrides: list[str]) -> dict[str, Any]:
    """One training run (one task, method and seed) in this process; what the benchmark keeps of it."""
    import torch

    from pnn_cluster.runner import InProcessPlacement, run_experiment

    torch.set_num_threads(1)
    cfg = configuration(name, quick, overrides)
    r = run_experiment(cfg, InProcessPlacement(), echo=False)
    return {"test_acc": r.test_acc, "val_acc": r.val_acc, "device_samples": r.device_samples_total,
            "seconds": r.seconds, "twin_nmse": r.twin_nmse,
            "twins": {k: {"kind": v["kind"], "ratio_to_floor": v.get("ratio_to_floor")} for k, v in r.twins.items()}}


def logistic(name: str, quick: bool, overrides: list[str]) -> dict[str, Any]:
    from pnn_cluster.baselines import logistic_baseline
    from pnn_cluster.runner import load_data

    return logistic_baseline(load_data(configuration(name, quick, overrides)))


def fit_twins(system: str, options: dict[str, int], samples: int, seed: int, epochs: int | None) -> dict[str, Any]:
    """The three twin kinds on one simulated system's samples: NMSE on held-out settings, and the floor."""
    import torch

    from pnn_cluster.devices import make_device
    from pnn_cluster.twins import build_twin, collect, fit_twin
    from pnn_cluster.twins.fit import fit_splits

    torch.set_num_threads(1)
    device = make_device(system, **options)
    device = make_device(system, imperfections=device.imperfections.with_(seed=seed, latency_call_s=0.0,
                                                                          latency_sample_s=0.0), **options)
    batch = 16
    groups = max(12, samples // (2 * batch))
    data = collect(device, groups=groups, batch=batch, repeats=2, seed=seed, progress=False)
    fit_on, stop, val = fit_splits(data, 0.2, seed)
    out: dict[str, Any] = {"system": system, "noise_floor": val.noise_floor(), "device_samples": data.device_samples}
    scores = {}
    for kind in ("physics", "residual", "mlp"):
        twin = build_twin(kind, device.spec, device.model())
        res = fit_twin(twin, fit_on, val, seed=seed, progress=False, stop=stop, epochs=epochs)
        out[kind] = res.nmse_val
        out[f"{kind}_seconds"] = res.seconds
        scores[kind] = res.nmse_stop
    out["best"] = min(scores, key=scores.get)  # chosen on the early-stopping samples, never on val
    out["best_ratio"] = out[out["best"]] / out["noise_floor"]
    return out


class Pool:
    """Runs calls as Ray tasks (``workers`` at once, one CPU each), or here when ``workers`` is 0."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._remote = {}
        if workers:
            import ray

            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
            self._ray = ray

    def submit(self, fn, *args):
        if not self.workers:
            return fn(*args)
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(num_cpus=1, max_retries=0)(fn)
        return remote.remote(*args)

    def gather(self, jobs: dict, done: dict, record) -> dict:
        """Every job's result as it finishes (``record(key, result)`` keeps it at once); ``done`` are kept ones."""
        out = dict(done)
        if not self.workers:  # submit already ran them: the "refs" are the results
            for key, result in jobs.items():
                if key not in done:
                    out[key] = result
                    record(key, result)
            return out
        waiting = {ref: key for key, ref in jobs.items() if key not in done}
        while waiting:
            ready, _ = self._ray.wait(list(waiting), num_returns=1)
            key = waiting.pop(ready[0])
            out[key] = self._ray.get(ready[0])
            record(key, out[key])
        return out


def mean_sd(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the one-line JSON result (always printed)")
    p.add_argument("--quick", action="store_true",
                   help="each task's quick section, 2 seeds, a small sweep and twin budget (under 5 minutes)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per task and sweep point (default 5; 2 with --quick)")
    p.add_argument("--tasks", default=",".join(TASKS), help="shipped configurations to run")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sections", default="tasks,sweep,twins", help="any of tasks, sweep, twins")
    p.add_argument("--gaps", default=None, help="comma-separated miscalibration sizes for the sweep")
    p.add_argument("--sweep-seeds", type=int, default=None, help="seeds per sweep point (default 3; 1 with --quick)")
    p.add_argument("--twin-samples", type=int, default=None,
                   help="device samples per system in the twins section (default 20000; 4000 with --quick)")
    p.add_argument("--workers", type=int, default=2, help="runs at once as Ray tasks (0: in this process)")
    p.add_argument("--log", default=None, metavar="FILE",
                   help="append each finished run to FILE (JSON lines) and skip runs FILE already holds, so an "
                        "interrupted benchmark continues where it stopped")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of every task's configuration, e.g. --set schedule.epochs=1, or of one "
                        "task: --set hybrid_mnist:schedule.epochs=5 (repeatable)")
    args = p.parse_args(argv)
    t_all = time.perf_counter()
    seeds = args.seeds or (2 if args.quick else 5)
    sections = set(args.sections.split(","))
    methods = [m for m in args.methods.split(",") if m]
    done: dict[tuple, Any] = {}
    if args.log:
        try:
            with open(args.log) as fh:
                for line in fh:
                    entry = json.loads(line)
                    done[tuple(entry["key"])] = entry["result"]
        except FileNotFoundError:
            pass

    def record(key: tuple, result: Any) -> None:
        log(f"done {' '.join(map(str, key))}")
        if args.log:
            with open(args.log, "a") as fh:
                fh.write(json.dumps({"key": list(key), "result": result}) + "\n")

    pool = Pool(args.workers)
    out: dict[str, Any] = {"seeds": seeds, "quick": args.quick, "tasks": [], "sweep": [], "twins": []}

    # everything is submitted first, so the workers never wait on the driver
    jobs: dict[tuple, Any] = {}

    def submit(key: tuple, fn, *fn_args) -> None:
        if key not in done:  # the log already holds it
            jobs[key] = pool.submit(fn, *fn_args)

    tasks = [t for t in args.tasks.split(",") if t] if "tasks" in sections else []
    for name in tasks:
        submit(("logistic", name), logistic, name, args.quick, args.overrides)
        for seed in range(seeds):
            for m in methods:
                submit(("task", name, m, seed), run_task, name, args.quick,
                       [*args.overrides, f"seed={seed}", f"method={m}"])
    gaps = [float(g) for g in args.gaps.split(",")] if args.gaps else list(QUICK_GAPS if args.quick else FULL_GAPS)
    sweep_seeds = args.sweep_seeds or (1 if args.quick else min(seeds, 3))
    if "sweep" in sections:
        from pnn_cluster.config import example_config_path, load_config

        names = load_config(example_config_path("hybrid_mnist")).physical_devices()
        # the sweep's shape, not its polish: a smaller subset and fewer epochs per point
        small = QUICK if args.quick else ["dataset.train_subset=1500", "schedule.epochs=4"]
        for g in gaps:
            # the ideal twin is measured against the devices, not fitted: a few groups are enough
            twin = [f"devices.{d}.{key}" for d in names for key in (
                f"driver.imperfections.gap={g}", "twin.kind=ideal", "twin.groups=8", "twin.batch=64")]
            for seed in range(sweep_seeds):
                for m in SWEEP_METHODS:
                    submit(("sweep", g, m, seed), run_task, "hybrid_mnist", False,
                           [*small, *twin, f"seed={seed}", f"method={m}"])
    if "twins" in sections:
        budget = args.twin_samples or (600 if args.quick else 20000)
        for system, options in TWIN_SYSTEMS.items():
            submit(("twins", system), fit_twins, system, options, budget, 0, 5 if args.quick else None)

    results = pool.gather(jobs, done, record)

    for name in tasks:
        row: dict[str, Any] = {"task": name, "methods": {}, "device_samples": {}}
        for m in methods:
            runs = [results[("task", name, m, s)] for s in range(seeds)]
            row["methods"][m] = {**mean_sd([r["test_acc"] for r in runs]),
                                 "val_mean": statistics.fmean(r["val_acc"] for r in runs if r["val_acc"] is not None)
                                 if any(r["val_acc"] is not None for r in runs) else None,
                                 "seconds": statistics.fmean(r["seconds"] for r in runs)}
            row["device_samples"][m] = int(statistics.fmean(r["device_samples"] for r in runs))
            if m == "pat":
                row["twins"] = runs[0]["twins"]
            acc = row["methods"][m]
            log(f"{name:18s} {m:10s} test {acc['mean']:.3f} +- {acc['sd']:.3f} over {seeds} seeds; "
                f"{row['device_samples'][m]} device samples")
        lr = results[("logistic", name)]
        row["logistic"], row["logistic_val"], row["logistic_C"] = lr["test_acc"], lr["val_acc"], lr["C"]
        log(f"{name:18s} logistic   test {lr['test_acc']:.3f} (C={lr['C']:g} chosen on validation)")
        out["tasks"].append(row)
    if "sweep" in sections:
        for g in gaps:
            point: dict[str, Any] = {"gap": g, "seeds": sweep_seeds}
            nmses = []
            for m in SWEEP_METHODS:
                runs = [results[("sweep", g, m, s)] for s in range(sweep_seeds)]
                point[m] = statistics.fmean(r["test_acc"] for r in runs)
                point[f"{m}_sd"] = statistics.stdev(r["test_acc"] for r in runs) if sweep_seeds > 1 else 0.0
                nmses += [r["twin_nmse"] for r in runs if r["twin_nmse"] is not None]
            point["twin_nmse"] = statistics.fmean(nmses) if nmses else None
            log(f"sweep gap {g:4.2f}  twin NMSE {point['twin_nmse']:.4f}  oracle {point['oracle']:.3f}  "
                f"pat {point['pat']:.3f}  in_silico {point['in_silico']:.3f}")
            out["sweep"].append(point)
        out["sweep"].sort(key=lambda r: r["twin_nmse"] if r["twin_nmse"] is not None else 0.0)
    if "twins" in sections:
        for system in TWIN_SYSTEMS:
            t = results[("twins", system)]
            log(f"twins {system:12s} floor {t['noise_floor']:.2e}  physics {t['physics']:.2e}  residual "
                f"{t['residual']:.2e}  mlp {t['mlp']:.2e}  best {t['best']} ({t['best_ratio']:.2f} x floor), "
                f"{t['device_samples']} device samples")
            out["twins"].append(t)
    out["seconds"] = time.perf_counter() - t_all
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

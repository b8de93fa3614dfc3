"""PAT against in silico, the oracle, two digital controls and logistic regression, over paired runs; the twins.

Prints one JSON line::

    {"seeds": N, "quick": bool,
     "tasks": [{"task": NAME, "runs": N, "paper": A | null,
                "methods": {"oracle" | "pat" | "in_silico" | "ablation" | "digital":
                            {"mean", "sd", "n", "values", "val_mean", "seconds"}},
                "logistic": A, "logistic_sd": SD, "logistic_val": A, "logistic_C": [C, ...],
                "logistic_at_edge": K, "device_samples": {"pat": N, ...}, "targets": {...}}, ...],
     "sweep": [{"gap": G, "control": bool, "twin_nmse": E, "grad_cosine": C, "oracle": A, "pat": A,
                "in_silico": A, "seeds": N, ...}, ...],
     "twins": [{"system": NAME, "noise_floor": F, KIND: E (every kind of twins.models.TWIN_KINDS that applies),
                "device_samples": N, "best": KIND,
                "operating": {"noise_floor": F, KIND: E, "device_samples": N, "task": T, "layer": L, ...},
                "sequential": {"samples": N, "nmse": E, "target": E, "curve": [[N, E_decide, E_report], ...]}},
               ...],
     "seconds": S}

Protocol. Every task is its shipped configuration (``pnn_cluster/configs/NAME.yaml``; ``--quick``: its
``quick`` section) run through the same runner as ``pnn-cluster train``, on the simulated systems' default
imperfections (drift included). Run ``r`` of a task is one pairing: all its methods (arms) share the device
copies (miscalibration), the devices' noise streams (one per purpose: calibration, initialisation, training,
test; so an arm that spent samples on a twin sees the same training noise as one that did not), the
initialisation and batch order (``seed=r``) and the data split (``dataset.split_seed=r``; vowels: the 259
rows pooled into 5 stratified folds, run ``r`` testing on fold ``r % 5`` of split seed ``r // 5``, 20 runs by
default; the file has no speaker column, so folds cannot be grouped by speaker). Training reads the
validation split carved from train (``dataset.val_fraction``) and, where the configuration says
``schedule.keep: best``, tests the epoch with the best validation accuracy; the test split is measured once
per run, on the (simulated) physical devices, after training.

The controls, each trained the same way on the same splits: ``ablation`` replaces every physical layer by a
fixed random orthogonal map of its shape (what channel mixing alone gives the digital layers); ``digital``
replaces it by the same fixed map plus a trainable MLP with at least as many parameters as the device has
settings (a network matched in parameter count); ``logistic`` is logistic regression on the raw features of
the run's split, its regularisation chosen on its validation split from a grid of 1e-4..1e4. ``paper`` is the
paper's figure for the task. ``device_samples`` counts every measurement a method cost (twin calibration,
initialisation, training), mean over runs.

The sweep runs ``hybrid_mnist`` on its shipped schedule with a twin that does not learn the gap (the
uncalibrated ideal model, ``twin.kind: ideal``) at several sizes of the devices' miscalibration, and a
control row (``"control": true``: no miscalibration, no unmodelled physics, no drift; the ideal twin is the
exact physics and PAT must equal the oracle). ``twin_nmse`` is measured on the devices, averaged over the
stack's layers and seeds; ``grad_cosine`` is the cosine between PAT's gradient and the exact one on a
validation batch (:func:`pnn_cluster.gradients.gradient_agreement`), at the start and after each epoch of the
PAT runs.

The twins section collects ``--twin-samples`` device samples (two repeats of each input, so the
noise floor is measured) from each simulated system with its unmodelled physics on, fits every twin kind
(``twins.models.TWIN_KINDS``; a kind that does not apply to the system is listed under ``skipped``) with
early stopping on held-out parameter settings, and reports each one's NMSE on a further held-out set next to
the noise floor. ``operating``: the same twins on settings and inputs drawn from the operating region of a
short PAT training of the shipped task that uses the system (``TWIN_REGIONS``; its quick section, physics
twins, the second half of its steps recorded by ``training.operating.OperatingRecorder``), measured with
two repeats so that the region's own noise floor comes out. ``sequential``: a sequential calibration
(``twins.sequential``) of the best kind on a fresh copy of the device, in rounds, until its NMSE on one half
of the held-out settings reaches the best twin's NMSE there; ``samples`` is every device sample it measured
by then (its own held-out set included; null when not within half the random budget), ``nmse`` and
``target`` its and the best twin's NMSE on the other half. ``--twin-systems`` and ``--twin-seed`` pick the
systems and the seed (each system is one ``--log`` entry).

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

TASKS = ("hybrid_mnist", "shg_vowels", "plate_mnist", "circuit_mnist", "oscillators_mnist")
METHODS = ("oracle", "pat", "in_silico", "ablation", "digital")
SWEEP_METHODS = ("oracle", "pat", "in_silico")
FULL_GAPS = (0.5, 1.5, 2.5, 3.5, 4.5)
QUICK_GAPS = (0.5, 2.5, 4.5)
#: vowels: the 259 rows pooled and split into stratified folds; each run tests on one fold
VOWEL_FOLDS = 5
#: --quick: the benchmark's shape in minutes, not its figures (on top of each task's own quick section)
QUICK = ["dataset.train_subset=300", "dataset.test_subset=200", "schedule.epochs=1", "init.samples=64"]
QUICK_TWIN = {"groups": 24, "batch": 16, "epochs": 5}
#: the twins section: each system at the size a task uses it
TWIN_SYSTEMS = {
    "shg": {"n_in": 24, "n_out": 24},
    "circuit": {"n_in": 24, "n_out": 24},
    "plate": {"n_in": 16, "n_out": 10},
    "oscillators": {"n_in": 24, "n_out": 24},
}
#: where each system's operating region comes from: (shipped task, its physical layer on that system). The
#: systems above have the sizes these layers have, so the recorded settings and inputs apply to them
TWIN_REGIONS = {"shg": ("hybrid_mnist", "optics"), "circuit": ("hybrid_mnist", "circuit"),
                "plate": ("plate_mnist", "plate"), "oscillators": ("oscillators_mnist", "pendula1")}
#: --quick: the region's training, on top of the task's quick section
QUICK_REGION = ["dataset.train_subset=600", "schedule.epochs=1"]
#: sequential calibration in the twins section: no stopping rule of its own (the benchmark's target stops it)
SEQUENTIAL_BENCH: dict[str, Any] = {"factor": 0.0}
#: --quick: a sequential calibration that fits the quick budget
SEQUENTIAL_QUICK: dict[str, Any] = {"holdout_groups": 3, "initial_groups": 3, "ensemble": 2, "round_epochs": 3,
                                    "first_epochs": 5}


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


def paper(name: str) -> float | None:
    """The paper's accuracy on the task, from its configuration's ``reference`` (None: the paper has none)."""
    ref = configuration(name, False, []).reference
    return ref.accuracy if ref is not None else None


def paired_run(name: str, run: int) -> list[str]:
    """What run ``run`` of a task varies, the same for all of its methods (its arms): the device copies and
    noise streams, the initialisation and batch order (``seed``) and the data split. Vowels: run ``r`` tests on
    fold ``r % VOWEL_FOLDS`` of the folds drawn with split seed ``r // VOWEL_FOLDS``."""
    if name == "shg_vowels":
        return [f"seed={run}", f"dataset.folds={VOWEL_FOLDS}", f"dataset.fold={run % VOWEL_FOLDS}",
                f"dataset.split_seed={run // VOWEL_FOLDS}"]
    return [f"seed={run}", f"dataset.split_seed={run}"]


class GradientWatch:
    """A trainer callback: PAT's gradient against the exact one on a fixed validation batch, at the start of
    training and after each epoch (:func:`pnn_cluster.gradients.gradient_agreement`)."""

    def __init__(self, batch: int = 256) -> None:
        self.batch = batch
        self.cosines: list[float] = []
        self.relative_errors: list[float] = []

    def _measure(self, trainer) -> None:
        import torch

        from pnn_cluster.gradients import gradient_agreement

        data = trainer.data
        x = torch.as_tensor(data.x_val[: self.batch], dtype=torch.get_default_dtype())
        y = torch.as_tensor(data.y_val[: self.batch])
        devices = [layer.device for layer in trainer.model.physical_layers()]
        # the check's measurements draw noise of their own: training's stream stays the oracle arm's
        for d in devices:
            d.noise_stream("gradient check")
        try:
            g = gradient_agreement(trainer.model, x, y)
        finally:
            for d in devices:
                d.noise_stream("training")
        self.cosines.append(g["cosine"])
        self.relative_errors.append(g["relative_error"])

    def on_train_start(self, trainer) -> None:
        self._measure(trainer)

    def on_step_end(self, trainer, metrics) -> None: ...

    def on_epoch_end(self, trainer, metrics) -> None:
        self._measure(trainer)

    def on_train_end(self, trainer, metrics) -> None: ...

    def on_test_end(self, trainer, result) -> None: ...


def run_task(name: str, quick: bool, overrides: list[str], gradients: bool = False) -> dict[str, Any]:
    """One training run (one task, method and seed) in this process; what the benchmark keeps of it.
    ``gradients``: PAT's gradient compared with the exact one along the run (``grad_cosine``)."""
    import torch

    from pnn_cluster.runner import InProcessPlacement, run_experiment

    torch.set_num_threads(1)
    cfg = configuration(name, quick, overrides)
    watch = GradientWatch() if gradients and cfg.method == "pat" else None
    r = run_experiment(cfg, InProcessPlacement(), echo=False, callbacks=[watch] if watch else ())
    out = {"test_acc": r.test_acc, "val_acc": r.val_acc, "device_samples": r.device_samples_total,
           "seconds": r.seconds, "twin_nmse": r.twin_nmse,
           "twins": {k: {"kind": v["kind"], "ratio_to_floor": v.get("ratio_to_floor")} for k, v in r.twins.items()}}
    if watch is not None:
        out["grad_cosine"] = statistics.fmean(watch.cosines)
        out["grad_cosines"] = watch.cosines
        out["grad_relative_error"] = statistics.fmean(watch.relative_errors)
    return out


def logistic(name: str, quick: bool, overrides: list[str]) -> dict[str, Any]:
    """Logistic regression on the run's own split (its regularisation chosen on its validation split)."""
    from pnn_cluster.baselines import logistic_baseline
    from pnn_cluster.runner import load_data

    return logistic_baseline(load_data(configuration(name, quick, overrides)))


def record_region(task: str, layer: str, seed: int, quick: bool) -> Any:
    """The operating region of ``layer`` in a short PAT training of the shipped ``task``: its ``quick`` section
    (``--quick``: ``QUICK_REGION`` on top), each of its twins a physics twin of ``twin.groups`` 24 (the region
    is what training visits, not what its twin costs), the second half of its steps recorded."""
    from pnn_cluster.config import example_config_path, load_config
    from pnn_cluster.runner import InProcessPlacement, run_experiment
    from pnn_cluster.training.operating import OperatingRecorder

    cfg = load_config(example_config_path(task)).quick_version()
    twins = [f"devices.{d}.twin.{k}" for d in cfg.physical_devices() for k in ("kind=physics", "groups=24")]
    short = QUICK_REGION if quick else []
    cfg = cfg.with_overrides([*twins, *short, f"seed={seed}", f"dataset.split_seed={seed}", "tracking.enabled=false"])
    recorder = OperatingRecorder(rows=16, max_steps=256, skip_fraction=0.5, seed=seed,
                                 meta={"task": task, "seed": seed})
    run = run_experiment(cfg, InProcessPlacement(), echo=False, callbacks=[recorder])
    region = recorder.region()
    region.meta.update(test_acc=run.test_acc, epochs=int(cfg.schedule.epochs))
    return region[layer], run.test_acc


def sequential_figures(system: str, fresh, best_twin, best: str, val, budget: int, seed: int, quick: bool = False,
                       plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sequential calibration of kind ``best`` on ``fresh`` (a copy of the device: its own noise), in rounds,
    until it reaches ``best_twin``'s NMSE or spends ``budget`` device samples. Half the held-out settings
    ``val`` decide when it has (judged against the best twin's NMSE there), the other half report it: the round
    that first dips below the target is not also the one scored. ``plan``: settings in place of the
    benchmark's (``scripts/search_sequential.py``)."""
    from pnn_cluster.twins import build_twin, evaluate_twin
    from pnn_cluster.twins.sequential import SequentialPlan, calibrate_sequential

    decide, report = val.split(0.5, seed=seed + 2)
    target = evaluate_twin(best_twin, decide)
    fresh.noise_stream("sequential calibration")
    curve: list[list[float]] = []

    def reached(twin, n: int) -> bool:
        score = evaluate_twin(twin, decide)
        curve.append([n, score, evaluate_twin(twin, report)])
        log(f"twins {system}: sequential {best} twin at {n} device samples: NMSE {score:.3e} (target {target:.3e})")
        return score <= target

    plan_ = SequentialPlan(**{**SEQUENTIAL_BENCH, **(SEQUENTIAL_QUICK if quick else {}), "budget": budget,
                              "batch": 16, **(plan or {})})
    seq = calibrate_sequential(build_twin(best, fresh.spec, fresh.model()), plan_, device=fresh, seed=seed + 3,
                               stop=reached, progress=False)
    done = seq.reason == "the caller's stopping rule"
    return {"samples": seq.device_samples if done else None, "nmse": evaluate_twin(seq.twin, report),
            "target": evaluate_twin(best_twin, report), "kind": best, "reached": done, "budget": plan_.budget,
            "curve": curve, "seconds": seq.seconds, "nmse_all_val": evaluate_twin(seq.twin, val),
            "plan": plan_.as_dict()}


def fit_twins(system: str, options: dict[str, int], samples: int, seed: int, epochs: int | None,
              quick: bool = False) -> dict[str, Any]:
    """Every twin kind on one simulated system's samples: NMSE on held-out settings and the floor; the same on
    the operating region of a short training of the shipped task that uses the system; and the device samples
    sequential calibration needs to reach the best twin's NMSE."""
    import torch

    from pnn_cluster.devices import make_device
    from pnn_cluster.twins import build_twin, collect, fit_twin, models
    from pnn_cluster.twins.fit import fit_splits
    from pnn_cluster.twins.operating import measure_region, region_figures

    torch.set_num_threads(1)
    t0 = time.perf_counter()

    def same_device():
        base = make_device(system, **options)
        return make_device(system, imperfections=base.imperfections.with_(seed=seed, latency_call_s=0.0,
                                                                          latency_sample_s=0.0), **options)

    device = same_device()
    model = device.model()
    batch = 16
    groups = max(12, samples // (2 * batch))
    data = collect(device, groups=groups, batch=batch, repeats=2, seed=seed, progress=False)
    fit_on, stop, val = fit_splits(data, 0.2, seed)
    out: dict[str, Any] = {"system": system, "noise_floor": val.noise_floor(), "device_samples": data.device_samples,
                           "seed": seed}
    scores, twins, skipped = {}, {}, {}
    for kind in models.TWIN_KINDS:
        try:
            twin = build_twin(kind, device.spec, model)
        except ValueError as e:  # a kind that does not apply to this device (no physics model, wrong shape)
            skipped[kind] = str(e)
            continue
        res = fit_twin(twin, fit_on, val, seed=seed, progress=False, stop=stop, epochs=epochs)
        log(f"twins {system}: {kind} twin fitted in {res.seconds:.0f} s")
        out[kind] = res.nmse_val
        out[f"{kind}_seconds"] = res.seconds
        scores[kind], twins[kind] = res.nmse_stop, twin.requires_grad_(False)
    if skipped:
        out["skipped"] = skipped
    best = out["best"] = min(scores, key=scores.get)  # chosen on the early-stopping samples, never on val
    out["best_ratio"] = out[best] / out["noise_floor"]

    # the operating region: settings and inputs a short training of the shipped task gave this system
    task, layer = TWIN_REGIONS[system]
    region, acc = record_region(task, layer, seed, quick)
    log(f"twins {system}: operating region of {task}/{layer} recorded ({len(region)} settings, test {acc:.3f})")
    device.noise_stream("operating region")
    op = measure_region(device, region, groups=max(8, groups // 5), batch=batch, repeats=2, seed=seed + 1)
    out["operating"] = {**region_figures(twins, op), "task": task, "layer": layer, "settings": len(region),
                        "task_test_acc": acc}
    out["operating"]["best_ratio"] = out["operating"][best] / out["operating"]["noise_floor"]

    out["sequential"] = sequential_figures(system, same_device(), twins[best], best, val, samples // 2, seed, quick)
    out["seconds"] = time.perf_counter() - t0
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

    def call(self, key: tuple, fn, args: tuple, jobs: dict, done: dict, record) -> None:
        """``fn(*args)`` under ``key``, unless ``done`` holds it: here and now when ``workers`` is 0, its result
        kept in ``done`` and recorded at once (a benchmark stopped midway loses only the run it was in), else
        submitted as a task into ``jobs`` for :meth:`gather`."""
        if key in done:  # the log already holds it
            return
        if not self.workers:
            done[key] = fn(*args)
            record(key, done[key])
            return
        jobs[key] = self.submit(fn, *args)

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
        if not self.workers:  # nothing is left: the caller ran each call here as it was submitted
            return out
        waiting = {ref: key for key, ref in jobs.items() if key not in done}
        while waiting:
            ready, _ = self._ray.wait(list(waiting), num_returns=1)
            key = waiting.pop(ready[0])
            out[key] = self._ray.get(ready[0])
            record(key, out[key])
        return out


def read_log(path: str | None) -> dict[tuple, Any]:
    """The finished runs a ``--log`` file holds, by key (none when there is no file yet)."""
    done: dict[tuple, Any] = {}
    if path:
        try:
            with open(path) as fh:
                for line in fh:
                    entry = json.loads(line)
                    done[tuple(entry["key"])] = entry["result"]
        except FileNotFoundError:
            pass
    return done


def mean_sd(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


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
    p.add_argument("--sweep-seeds", type=int, default=None, help="seeds per sweep point (default 5; 1 with --quick)")
    p.add_argument("--vowel-runs", type=int, default=None,
                   help=f"paired runs of shg_vowels, each testing on one of {VOWEL_FOLDS} stratified folds "
                        "(default 20; 2 with --quick)")
    p.add_argument("--runs", action="append", default=[], metavar="TASK=N",
                   help="paired runs of one task, instead of --seeds or --vowel-runs (repeatable)")
    p.add_argument("--twin-samples", type=int, default=None,
                   help="device samples per system in the twins section (default 20000; 4000 with --quick)")
    p.add_argument("--twin-systems", default=",".join(TWIN_SYSTEMS),
                   help="simulated systems of the twins section (each a --log entry of its own)")
    p.add_argument("--twin-seed", type=int, default=0,
                   help="seed of the twins section's devices, samples and region training (the benchmark's is 0)")
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
    args.vowel_runs = args.vowel_runs or (2 if args.quick else 20)
    sections = set(args.sections.split(","))
    methods = [m for m in args.methods.split(",") if m]
    done = read_log(args.log)

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
        pool.call(key, fn, fn_args, jobs, done, record)

    tasks = [t for t in args.tasks.split(",") if t] if "tasks" in sections else []
    runs_of = {name: args.vowel_runs if name == "shg_vowels" else seeds for name in tasks}
    for item in args.runs:
        name, _, n = item.partition("=")
        if name not in runs_of or not n.isdigit() or int(n) < 1:
            p.error(f"--runs {item}: expected TASK=N with TASK one of {', '.join(tasks)} and N >= 1")
        runs_of[name] = int(n)
    for name in tasks:
        for run in range(runs_of[name]):
            pair = paired_run(name, run)
            submit(("logistic", name, run), logistic, name, args.quick, [*args.overrides, *pair])
            for m in methods:
                submit(("task", name, m, run), run_task, name, args.quick, [*args.overrides, *pair, f"method={m}"])
    gaps = [float(g) for g in args.gaps.split(",")] if args.gaps else list(QUICK_GAPS if args.quick else FULL_GAPS)
    sweep_seeds = args.sweep_seeds or (1 if args.quick else min(seeds, 5))
    # the control: no miscalibration, no unmodelled physics, no drift; the ideal twin is then the exact
    # physics, and PAT must train exactly as the oracle does
    points = [(0.0, True), *((g, False) for g in gaps)]
    if "sweep" in sections:
        from pnn_cluster.config import example_config_path, load_config

        names = load_config(example_config_path("hybrid_mnist")).physical_devices()
        # the shipped schedule (or the quick one): the sweep measures a stack that trains
        small = QUICK if args.quick else []
        for g, control in points:
            # the ideal twin is measured against the devices, not fitted: a few groups are enough
            keys = [f"driver.imperfections.gap={g}", "twin.kind=ideal", "twin.groups=8", "twin.batch=64"]
            if control:
                keys += ["driver.imperfections.unmodelled=0", "driver.imperfections.drift=0"]
            twin = [f"devices.{d}.{key}" for d in names for key in keys]
            for seed in range(sweep_seeds):
                for m in SWEEP_METHODS:
                    submit(("sweep", "control" if control else g, m, seed), run_task, "hybrid_mnist", args.quick,
                           [*small, *twin, *paired_run("hybrid_mnist", seed), f"method={m}"], m == "pat")
    twin_systems = [t for t in args.twin_systems.split(",") if t]
    if unknown := set(twin_systems) - set(TWIN_SYSTEMS):
        p.error(f"--twin-systems: unknown {sorted(unknown)}; allowed: {', '.join(TWIN_SYSTEMS)}")
    if "twins" in sections:
        budget = args.twin_samples or (600 if args.quick else 20000)
        for system in twin_systems:
            submit(("twins", system, args.twin_seed), fit_twins, system, TWIN_SYSTEMS[system], budget, args.twin_seed,
                   5 if args.quick else None, args.quick)

    results = pool.gather(jobs, done, record)

    for name in tasks:
        n = runs_of[name]
        row: dict[str, Any] = {"task": name, "runs": n, "methods": {}, "device_samples": {}, "paper": paper(name)}
        for m in methods:
            runs = [results[("task", name, m, s)] for s in range(n)]
            vals = [r["val_acc"] for r in runs if r["val_acc"] is not None]
            row["methods"][m] = {**mean_sd([r["test_acc"] for r in runs]),
                                 "val_mean": statistics.fmean(vals) if vals else None,
                                 "seconds": statistics.fmean(r["seconds"] for r in runs)}
            row["device_samples"][m] = int(statistics.fmean(r["device_samples"] for r in runs))
            if m == "pat":
                row["twins"] = runs[0]["twins"]
            acc = row["methods"][m]
            log(f"{name:18s} {m:10s} test {acc['mean']:.3f} +- {acc['sd']:.3f} over {n} runs; "
                f"{row['device_samples'][m]} device samples")
        lrs = [results[("logistic", name, s)] for s in range(n)]
        lr = mean_sd([r["test_acc"] for r in lrs])
        row["logistic"], row["logistic_sd"] = lr["mean"], lr["sd"]
        row["logistic_val"] = statistics.fmean(r["val_acc"] for r in lrs)
        row["logistic_C"] = [r["C"] for r in lrs]
        row["logistic_at_edge"] = sum(bool(r.get("at_edge")) for r in lrs)
        log(f"{name:18s} logistic   test {lr['mean']:.3f} +- {lr['sd']:.3f} (C chosen on validation: "
            f"{sorted(set(row['logistic_C']))}, at the grid's edge in {row['logistic_at_edge']} of {n})")
        if "pat" in row["methods"]:
            pat = row["methods"]["pat"]["mean"]
            row["targets"] = {
                "pat_over_ablation": pat - row["methods"]["ablation"]["mean"] if "ablation" in row["methods"] else None,
                "pat_over_digital": pat - row["methods"]["digital"]["mean"] if "digital" in row["methods"] else None,
                "pat_over_logistic": pat - row["logistic"],
                "oracle_minus_pat": row["methods"]["oracle"]["mean"] - pat if "oracle" in row["methods"] else None,
                "pat_minus_paper": pat - row["paper"] if row["paper"] is not None else None,
            }
        out["tasks"].append(row)
    if "sweep" in sections:
        for g, control in points:
            point: dict[str, Any] = {"gap": g, "control": control, "seeds": sweep_seeds}
            nmses, cosines = [], []
            for m in SWEEP_METHODS:
                runs = [results[("sweep", "control" if control else g, m, s)] for s in range(sweep_seeds)]
                point[m] = statistics.fmean(r["test_acc"] for r in runs)
                point[f"{m}_sd"] = statistics.stdev(r["test_acc"] for r in runs) if sweep_seeds > 1 else 0.0
                point[f"{m}_values"] = [r["test_acc"] for r in runs]
                nmses += [r["twin_nmse"] for r in runs if r["twin_nmse"] is not None]
                cosines += [r["grad_cosine"] for r in runs if r.get("grad_cosine") is not None]
            point["twin_nmse"] = statistics.fmean(nmses) if nmses else None
            point["grad_cosine"] = statistics.fmean(cosines) if cosines else None
            log(f"sweep gap {g:4.2f}{' (control)' if control else ''}  twin NMSE {point['twin_nmse']:.4f}  "
                f"gradient cosine {point['grad_cosine']:.3f}  oracle {point['oracle']:.3f}  pat {point['pat']:.3f}  "
                f"in_silico {point['in_silico']:.3f}")
            out["sweep"].append(point)
        out["sweep"].sort(key=lambda r: r["twin_nmse"] if r["twin_nmse"] is not None else 0.0)
    if "twins" in sections:
        for system in twin_systems:
            t = results[("twins", system, args.twin_seed)]
            kinds = [k for k in t if f"{k}_seconds" in t]
            op, seq = t["operating"], t["sequential"]
            log(f"twins {system:12s} floor {t['noise_floor']:.2e}  "
                + "  ".join(f"{k} {t[k]:.2e}" for k in kinds)
                + f"  best {t['best']} ({t['best_ratio']:.2f} x floor), {t['device_samples']} device samples")
            log(f"      operating   floor {op['noise_floor']:.2e}  " + "  ".join(f"{k} {op[k]:.2e}" for k in kinds)
                + f"  best {t['best']} ({op['best_ratio']:.2f} x floor), {op['settings']} recorded settings of "
                f"{op['task']}/{op['layer']}")
            log(f"      sequential  {seq['kind']}: {seq['samples'] or 'not within ' + str(seq['budget'])} device "
                f"samples to reach NMSE {seq['target']:.2e} (reached {seq['nmse']:.2e})")
            out["twins"].append(t)
    out["seconds"] = time.perf_counter() - t_all
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

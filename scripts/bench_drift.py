"""Twins that stay true during long runs: each recalibration policy on drifting devices, over seeds.

Prints one JSON line::

    {"scenarios": [{"name": NAME, "steps": S, "seeds": N, "drift_off": {"test_acc": A, ...} (slow drift),
                    "policy": {"none": {"test_acc": A, "test_acc_sd": SD, "twin_nmse_end": E,
                                        "twin_nmse_first": E0, "twin_nmse_end_ratio": R,
                                        "device_samples": N, "recalibration_samples": M, "refits": K,
                                        "values": [...]},
                               "monitor": {...}, "refine": {...}, "pause": {...}},
                    "ablation": {"test_acc": A, "test_acc_sd": SD},
                    "detection_delay_steps": D, "false_alarms": F}, ...],
     "targets": {...}, "seconds": S}

Scenarios, all on the shipped ``hybrid_mnist`` (SHG optics feeding the analog circuit), every device
with the same policy:

- ``slow_drift``: a run ``--slow-factor`` times as long as the shipped one (epochs x 3 by default), both
  devices drifting at ``--slow-rate`` times their systems' default rates (``Imperfections.drift``, a
  random walk of every calibration constant; the defaults and their physical reasons are in
  ``pnn_cluster/devices/simulated.py``); ``drift_off`` is the same long run on devices that do not
  drift, the reference for what drift costs (``--slow-seeds`` seeds: these runs are the longest);
- ``step_change``: the shipped run with no slow drift; halfway through training the optics are bumped:
  every calibration constant jumps by one natural spread times a normal draw (``imperfections.steps``),
  the size of the miscalibration a twin is fitted to learn in the first place;
- ``no_drift``: the shipped run with drift off: every alarm is a false one;
- ``large_step``: as ``step_change`` with a bump of three spreads (a fibre knocked well out of its
  coupling, a connector half out): a drift that may cost PAT accuracy, where the target of +5 points for
  ``refine`` can apply. Not run by default (``--scenarios`` names it).

Figures. ``test_acc``: the test split, measured once per run on the devices, after training; mean and standard
deviation over seeds (each seed is another physical copy of every device, initialisation and batch order).
``twin_nmse_end``: after the test, each device's twin in use is checked against fresh samples of its device (8
groups of 64 inputs, two repeats); the figure is the NMSE of the device whose twin lost most since its first
calibration, ``twin_nmse_first`` that device's NMSE at calibration and ``twin_nmse_end_ratio`` the worst
end/first ratio (mean over seeds). ``device_samples``: training's measurements; ``recalibration_samples``:
those spent on the twins during training (exploratory samples of refinements, their checks over the whole
range and widened refinements, full recalibrations, references measured again at alarms). ``ablation``: the
same stack with fixed digital maps in place of the devices (what the physical layers add).
``detection_delay_steps``: with ``monitor``, from the step in which the change happened (the device's own
record of its step change) or, for slow drift, from the first step at which the twin's error, averaged over 25
steps, has grown by the detector's ``rise`` over its warm-up baseline, to the first alarm (median over seeds
and devices; null if never). ``false_alarms``: ``monitor`` alarms on a device that did not change (no drift:
every device; the step change: the other device, and the bumped one before its bump), summed over seeds and
devices (``monitor`` raises one every few steps while the error stays high), and ``false_alarm_device_runs``:
how many of the ``device_runs`` (seeds x devices) had any. With slow drift every device drifts: none is false,
and ``alarms_before_onset`` counts those before the error had grown by ``rise``. An alarm whose reference
(what the device measured when the baseline was set, measured again) shows the device unchanged is not taken
as drift (the twin is off where training has moved): ``region_alarms`` counts those, and they count neither as
detections nor as false alarms.

``none`` and ``monitor`` make the same device calls and draw the same noise (watching changes no gradient;
a reference measured again at an alarm draws its noise from a stream of its own), so their runs are the same
unless an alarm's reference samples move a step change's sample clock: ``none`` is run for the first ``--none-seeds``
seeds (default 1) and checked equal to ``monitor`` there (``none_equals_monitor``); for the other seeds
its figures are ``monitor``'s (``none_runs`` says how many were run), but for the device samples on the twins:
none (``monitor``'s references are its own).

Runs are Ray tasks, ``--workers`` at a time (one CPU each); ``--workers 0`` runs them in this process.
``--out FILE`` keeps every finished run (JSON lines) and a rerun with the same file skips them.
``--merge FILE`` prints FILE's result (a committed ``docs/bench_drift.json``) with what this run measured in
place of what it held: each policy run replaces that policy's figures in its scenario, the detection and
false-alarm figures are replaced only where ``monitor`` ran, the ablation only where it ran, and the targets
are judged again on the whole; ``merged`` lists what was replaced, by this merge and the file's earlier ones.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_pat import Pool, log

from pnn_cluster.training.trainer import Callback

POLICIES = ("none", "monitor", "refine", "pause")
SCENARIOS = ("slow_drift", "step_change", "no_drift", "large_step")
#: step changes: the bump's size in spreads of each calibration constant
STEP_SIZE = {"step_change": 1.0, "large_step": 3.0}
TASK = "hybrid_mnist"
#: --quick: the benchmark's shape in minutes, not its figures
QUICK = ["dataset.train_subset=600", "dataset.test_subset=300", "schedule.epochs=4", "init.samples=64",
         "devices.optics.twin.groups=60", "devices.circuit.twin.groups=12"]


def configuration(scenario: str, policy: str, seed: int, quick: bool, slow_factor: int, slow_rate: float):
    from pnn_cluster.config import example_config_path, load_config
    from pnn_cluster.devices import make_device

    cfg = load_config(example_config_path(TASK))
    over = [f"seed={seed}", "tracking.enabled=false"] + (QUICK if quick else [])
    cfg = cfg.with_overrides(over)
    devices = cfg.physical_devices()
    over = [f"devices.{d}.recalibration.policy={'none' if policy == 'drift_off' else policy}" for d in devices]
    if quick:
        over += [f"devices.{d}.recalibration.warmup=10" for d in devices]
    if scenario == "slow_drift":
        over.append(f"schedule.epochs={cfg.schedule.epochs * slow_factor}")
        for d in devices:
            if policy == "drift_off":  # the reference: the same long run on devices that do not drift
                over.append(f"devices.{d}.driver.imperfections.drift=0")
                continue
            driver = cfg.devices[d].driver
            rate = make_device(driver.system, **driver.options).imperfections.drift
            over.append(f"devices.{d}.driver.imperfections.drift={rate * slow_rate}")
    elif scenario == "no_drift":
        over += [f"devices.{d}.driver.imperfections.drift=0" for d in devices]
    elif scenario in STEP_SIZE:
        # the step alone (no slow drift beside it: an alarm before it is a false one), halfway through
        # training, counted in the optics' own samples: calibration and initialisation first
        over += [f"devices.{d}.driver.imperfections.drift=0" for d in devices]
        tc = cfg.devices["optics"].twin
        steps = -(-int(len_train(cfg)) // cfg.schedule.batch_size) * cfg.schedule.epochs
        at = tc.groups * tc.batch * tc.repeats + cfg.init.samples + steps * cfg.schedule.batch_size // 2
        size = STEP_SIZE[scenario]
        over.append(f"devices.optics.driver.imperfections.steps=[{{at_samples: {at}, size: {size}}}]")
    else:
        raise ValueError(f"scenario {scenario!r}; allowed: {', '.join(SCENARIOS)}")
    return cfg.with_overrides(over)


def len_train(cfg) -> int:
    from pnn_cluster.runner import load_data

    return len(load_data(cfg).y_train)


class Probe(Callback):
    """Notes the step in which each device's step change happened; after the test, checks each twin."""

    def __init__(self) -> None:
        self.changes: dict[str, list[int]] = {}
        self.end: dict[str, dict[str, float]] = {}
        self._seen: dict[str, int] = {}

    def on_train_start(self, trainer) -> None:
        for layer in trainer.model.physical_layers():
            self._seen[layer.name] = len(getattr(layer.device, "drift_events", []))

    def on_step_end(self, trainer, metrics) -> None:
        for layer in trainer.model.physical_layers():
            events = getattr(layer.device, "drift_events", [])
            if len(events) > self._seen.get(layer.name, 0):
                self.changes.setdefault(layer.name, []).extend([trainer.global_step] * (len(events)
                                                                                        - self._seen[layer.name]))
                self._seen[layer.name] = len(events)

    def on_test_end(self, trainer, result) -> None:
        from pnn_cluster.twins import collect, evaluate_twin

        for i, layer in enumerate(trainer.model.physical_layers()):
            fresh = collect(layer.device, groups=8, batch=64, repeats=2, seed=424_242 + i, progress=False)
            self.end[layer.name] = {"nmse": evaluate_twin(layer.twin, fresh), "noise_floor": fresh.noise_floor()}


def run_one(scenario: str, policy: str, seed: int, quick: bool, slow_factor: int, slow_rate: float) -> dict:
    import torch

    from pnn_cluster.runner import ExperimentRun, InProcessPlacement

    torch.set_num_threads(1)
    if policy == "ablation":
        cfg = configuration(scenario, "none", seed, quick, slow_factor, slow_rate).with_overrides(["method=ablation"])
    else:
        cfg = configuration(scenario, policy, seed, quick, slow_factor, slow_rate)
    probe = Probe()
    r = ExperimentRun(cfg, InProcessPlacement(), echo=False, callbacks=[probe]).run()
    return {"scenario": scenario, "policy": policy, "seed": seed, "test_acc": r.test_acc, "steps": r.steps,
            "device_samples": r.device_samples, "recalibration_samples": r.recalibration_samples,
            "first": {k: v["nmse_val"] for k, v in r.twins.items()}, "end": probe.end, "changes": probe.changes,
            "recalibration": r.recalibration, "drift_history": r.drift_history, "seconds": r.seconds}


def onset(history: list[tuple[int, float]], warmup: int, rise: float, window: int = 25) -> int | None:
    """The first step at which the twin's error, averaged over ``window`` steps, has grown by ``rise``."""
    import numpy as np

    if len(history) <= warmup + window:
        return None
    steps = [s for s, _ in history]
    logs = np.log([r for _, r in history])
    base = logs[:warmup].mean()
    run = np.convolve(logs, np.ones(window) / window, mode="valid")
    over = np.nonzero(run[warmup:] > base + np.log(rise))[0]
    return int(steps[warmup + over[0] + window - 1]) if len(over) else None


def summarise(scenario: str, runs: list[dict], warmup: int, rise: float) -> dict[str, Any]:
    out: dict[str, Any] = {"name": scenario, "policy": {}}
    ran_none = {r["seed"]: r for r in runs if r["policy"] == "none"}
    monitor = {r["seed"]: r for r in runs if r["policy"] == "monitor"}
    same = [ran_none[k]["test_acc"] == monitor[k]["test_acc"] and ran_none[k]["end"] == monitor[k]["end"]
            for k in ran_none if k in monitor]
    # a run without a watch measures nothing beside training (monitor's references at alarms are its own)
    runs = runs + [{**m, "policy": "none", "recalibration_samples": 0} for k, m in monitor.items()
                   if k not in ran_none] if ran_none else runs
    for policy in POLICIES:
        rs = [r for r in runs if r["policy"] == policy]
        if not rs:
            continue
        accs = [r["test_acc"] for r in rs]
        worst = []
        for r in rs:
            ratios = {d: r["end"][d]["nmse"] / r["first"][d] for d in r["end"] if r["first"].get(d)}
            d = max(ratios, key=ratios.get)
            worst.append((r["end"][d]["nmse"], r["first"][d], ratios[d], d))
        refits = [sum(v["versions"] - 1 for v in (r["recalibration"] or {}).values()) for r in rs]
        out["policy"][policy] = {
            "test_acc": statistics.fmean(accs), "test_acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "values": accs, "twin_nmse_end": statistics.fmean(w[0] for w in worst),
            "twin_nmse_first": statistics.fmean(w[1] for w in worst),
            "twin_nmse_end_ratio": statistics.fmean(w[2] for w in worst), "worst_devices": [w[3] for w in worst],
            "device_samples": statistics.fmean(r["device_samples"] for r in rs),
            "recalibration_samples": statistics.fmean(r["recalibration_samples"] for r in rs),
            "refits": statistics.fmean(refits), "seconds": statistics.fmean(r["seconds"] for r in rs),
            "seeds": len(rs)}
        out["steps"] = rs[0]["steps"]
    off = [r["test_acc"] for r in runs if r["policy"] == "drift_off"]
    if off:
        out["drift_off"] = {"test_acc": statistics.fmean(off),
                            "test_acc_sd": statistics.stdev(off) if len(off) > 1 else 0.0, "seeds": len(off)}
    ablation = [r["test_acc"] for r in runs if r["policy"] == "ablation"]
    if ablation:
        out["ablation"] = {"test_acc": statistics.fmean(ablation),
                           "test_acc_sd": statistics.stdev(ablation) if len(ablation) > 1 else 0.0}
    delays, false_alarms, false_runs, early, region = [], 0, 0, 0, 0
    for r in (r for r in runs if r["policy"] == "monitor"):
        for device, watch in (r["recalibration"] or {}).items():
            # an alarm whose reference measured as before is not taken as drift (the twin is off where training
            # moved): counted apart, neither a detection nor a false alarm of drift
            not_drift = set(watch.get("region_steps", []))
            region += len(not_drift)
            alarms = [a for a in watch["alarm_steps"] if a not in not_drift]
            changed = r["changes"].get(device)
            if scenario == "no_drift" or (scenario in STEP_SIZE and not changed):
                false = alarms  # nothing changed on this device: every alarm is a false one
            elif scenario in STEP_SIZE:
                false = [a for a in alarms if a < changed[0]]
                after = [a for a in alarms if a >= changed[0]]
                if after:
                    delays.append(after[0] - changed[0])
            else:  # slow drift: every device drifts; an alarm before the error has grown by `rise` is early
                false = []
                start = onset(r["drift_history"].get(device, []), warmup, rise)
                if start is not None:
                    early += sum(a < start for a in alarms)
                    after = [a for a in alarms if a >= start]
                    if after:
                        delays.append(after[0] - start)
            false_alarms += len(false)
            false_runs += bool(false)
    out["detection_delay_steps"] = statistics.median(delays) if delays else None
    out["detections"] = len(delays)
    out["false_alarms"] = None if scenario == "slow_drift" else false_alarms
    out["false_alarm_device_runs"] = None if scenario == "slow_drift" else false_runs
    out["region_alarms"] = region
    if scenario == "slow_drift":
        out["alarms_before_onset"] = early
    out["device_runs"] = sum(len(r["recalibration"] or {}) for r in runs if r["policy"] == "monitor")
    out["none_runs"] = len(ran_none)
    out["none_equals_monitor"] = all(same) if same else None
    out["seeds"] = len({r["seed"] for r in runs})
    return out


def targets(scenarios: list[dict]) -> dict[str, Any]:
    """The issue's targets, each with the figures it was judged on."""
    out: dict[str, Any] = {}
    for sc in scenarios:
        pol = sc["policy"]
        if sc["name"] == "no_drift":
            out["no_drift_false_alarms_zero"] = sc["false_alarms"] == 0
            continue
        if "refine" in pol:
            out[f"{sc['name']}_refine_twin_within_2x_of_first"] = pol["refine"]["twin_nmse_end_ratio"] <= 2.0
            out[f"{sc['name']}_refine_samples_at_most_10pct"] = (
                pol["refine"]["recalibration_samples"] <= 0.1 * pol["refine"]["device_samples"])
            out[f"{sc['name']}_refine_samples_at_most_5pct"] = (
                pol["refine"]["recalibration_samples"] <= 0.05 * pol["refine"]["device_samples"])
        if "none" in pol and "refine" in pol:
            # what drift costs: against the same run on devices that do not drift (slow drift: its drift_off
            # runs; the step change: the no-drift scenario, the same run without the bump)
            base = sc.get("drift_off")
            if base is None:
                other = next((s for s in scenarios if s["name"] == "no_drift"), None)
                base = other["policy"].get("none") if other is not None else None
            if base is not None:
                loss = base["test_acc"] - pol["none"]["test_acc"]
                gain = pol["refine"]["test_acc"] - pol["none"]["test_acc"]
                out[f"{sc['name']}_none_loses_points"] = round(100 * loss, 2)
                out[f"{sc['name']}_refine_gains_points"] = round(100 * gain, 2)
                out[f"{sc['name']}_refine_5_points_above_none_where_none_loses_5"] = \
                    gain >= 0.05 if loss >= 0.05 else "not applicable (none lost less than 5 points)"
    return out


#: a scenario's figures that come from its monitor runs
MONITOR_FIGURES = ("detection_delay_steps", "detections", "false_alarms", "false_alarm_device_runs", "region_alarms",
                   "alarms_before_onset", "device_runs", "none_runs", "none_equals_monitor")


def merge(base: list[dict], measured: list[dict], policies: list[str]) -> tuple[list[dict], dict[str, list[str]]]:
    """``base``'s scenarios with the ``policies`` of ``measured``'s in place of theirs (see the docstring)."""
    out = [dict(sc, policy=dict(sc["policy"])) for sc in base]
    replaced: dict[str, list[str]] = {}
    for new in measured:
        old = next((sc for sc in out if sc["name"] == new["name"]), None)
        if old is None:
            out.append(new)
            replaced[new["name"]] = ["all"]
            continue
        ran = [p for p in POLICIES if p in new["policy"]]
        old["policy"].update({p: new["policy"][p] for p in ran})
        if "monitor" in ran:
            old.update({k: new[k] for k in MONITOR_FIGURES if k in new})
        if "ablation" in policies and "ablation" in new:
            old["ablation"] = new["ablation"]
            ran.append("ablation")
        replaced[new["name"]] = ran
    return out, replaced


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the one JSON line (always printed; kept for scripts)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed .. first-seed + seeds - 1 (others than the benchmark's choose settings)")
    p.add_argument("--quick", action="store_true", help="minutes, not the figures: small data, short runs")
    p.add_argument("--scenarios", default=",".join(SCENARIOS[:3]))
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--slow-factor", type=int, default=3, help="slow drift: the run is this many times as long")
    p.add_argument("--slow-rate", type=float, default=1.0,
                   help="slow drift: the systems' default drift rates times this")
    p.add_argument("--slow-seeds", type=int, default=None,
                   help="seeds of the slow-drift scenario (default: --seeds; its runs are the longest)")
    p.add_argument("--none-seeds", type=int, default=1,
                   help="seeds run with policy none (the others report monitor's identical runs)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="keep finished runs here (JSON lines); a rerun skips them")
    p.add_argument("--merge", default=None,
                   help="print this result file with the policies run here in place of its figures for them")
    args = p.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    policies = [s for s in args.policies.split(",") if s] + ([] if args.no_ablation else ["ablation"])
    slow_seeds = args.seeds if args.slow_seeds is None else args.slow_seeds
    for s in scenarios:
        if s not in SCENARIOS:
            p.error(f"--scenarios: {s!r}; allowed: {', '.join(SCENARIOS)}")
    for s in policies:
        if s not in POLICIES + ("ablation",):
            p.error(f"--policies: {s!r}; allowed: {', '.join(POLICIES)}")
    t0 = time.perf_counter()
    done: dict[tuple, dict] = {}
    out_path = Path(args.out) if args.out else None
    if out_path is not None and out_path.exists():
        for line in out_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["scenario"], r["policy"], r["seed"], r.get("quick", False))] = r

    def record(key: tuple, result: dict) -> None:
        result["quick"] = args.quick
        log(f"{key[0]} {key[1]} seed {key[2]}: test {result['test_acc']:.3f}, "
            f"{result['recalibration_samples']} recalibration samples, {result['seconds']:.0f} s")
        if out_path is not None:
            with out_path.open("a") as f:
                f.write(json.dumps(result) + "\n")

    pool = Pool(args.workers)
    jobs = {}
    for i in range(args.seeds):
        seed = args.first_seed + i
        for scenario in scenarios:
            if scenario == "slow_drift" and i >= slow_seeds:
                continue
            for policy in policies + (["drift_off"] if scenario == "slow_drift" else []):
                if policy == "none" and i >= args.none_seeds:
                    continue
                key = (scenario, policy, seed, args.quick)
                if key in done:
                    continue
                job = pool.submit(run_one, scenario, policy, seed, args.quick, args.slow_factor, args.slow_rate)
                if args.workers:
                    jobs[key] = job
                else:  # run here, now: kept at once, so an interrupted benchmark resumes from it
                    done[key] = job
                    record(key, job)
    results = pool.gather(jobs, done, record)
    from pnn_cluster.training.recalibration import Recalibration

    warmup, rise = (10 if args.quick else Recalibration.warmup), Recalibration.rise
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    summary = [summarise(s, [r for k, r in results.items() if k[0] == s and k[3] == args.quick and k[2] in seeds],
                         warmup, rise) for s in scenarios]
    result = {"scenarios": summary, "quick": args.quick, "slow_factor": args.slow_factor,
              "slow_rate": args.slow_rate, "seconds": round(time.perf_counter() - t0, 1)}
    if args.merge:
        base = json.loads(Path(args.merge).read_text())
        merged, replaced = merge(base["scenarios"], summary, policies)
        # a scenario merged again says what this merge replaced; the others keep what earlier merges said
        result = {**base, "scenarios": merged, "merged": {**base.get("merged", {}), **replaced}}
        summary = merged
    print(json.dumps({**result, "targets": targets(summary)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

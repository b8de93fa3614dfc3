"""The documented search behind the shipped paper tasks: candidate settings scored on the validation split.

Prints one JSON line::

    {"task": NAME, "seeds": [S, ...], "candidates": [{"label": L, "overrides": [...], "val_mean": A,
     "val_sd": SD, "val": [A, ...], "seconds": T}, ...], "chosen": L, "seconds": S}

Protocol. Each candidate is a set of ``KEY=VALUE`` overrides of the task's shipped configuration (a whole
``stack`` and ``devices`` section where the candidate is another encoding), run with PAT on the simulated
devices' default imperfections on search seeds that the benchmark never uses (100 and up: other device
copies, splits and initialisations). Training selects its epoch on the validation split and the test split is
never measured (``measure_test=False``; vowels: the rows pooled into 5 stratified folds, the seed's fold held
out and never looked at). The candidate with the best mean validation accuracy is chosen; a tie keeps the
shipped settings (candidates labelled ``shipped``). The chosen settings are then written into
``pnn_cluster/configs/NAME.yaml`` by hand, and this log (``--log docs/search/NAME.jsonl``) is kept beside it.

    python scripts/search_pat.py --task plate_mnist --log docs/search/plate_mnist.jsonl
    python scripts/search_pat.py --task shg_vowels --epochs 60 --log docs/search/shg_vowels.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from bench_pat import Pool, configuration, log, read_log

#: the benchmark uses seeds 0..; the search never does
SEARCH_SEED = 100


def _stack_overrides(devices: dict, stack: list, lr: float, spread: float, epochs: int) -> list[str]:
    return [f"devices={json.dumps(devices)}", f"stack={json.dumps(stack)}", f"optimizer.lr={lr}",
            f"init.spread={spread}", f"schedule.epochs={epochs}", "schedule.keep=best", "quick={}"]


def _waveform(system: str, widths: list[int], front: int | None, lr: float, spread: float,
              epochs: int) -> list[str]:
    """Devices of one system in sequence, data and parameters interleaved in each drive waveform, element-wise
    rescaling between them and an element-wise affine readout of the last. ``front``: a trainable digital
    layer 784 -> front before the first; None: the paper's way, a 7 x 7 image written straight into the
    first drive."""
    twin = {"kind": "physics", "groups": 24, "batch": 128}
    stack = [{"kind": "pool", "size": 7}] if front is None else [{"kind": "linear", "size": front}]
    devices, n_in = {}, 49 if front is None else front
    for k, n_out in enumerate(widths, start=1):
        name = f"{system}{k}"
        devices[name] = {"driver": {"kind": "simulated", "system": system, "options": {"n_in": n_in, "n_out": n_out}},
                         "twin": twin}
        stack += [{"kind": "rescale"}, {"kind": "physical", "device": name}]
        n_in = n_out
    stack.append({"kind": "affine"})
    return _stack_overrides(devices, stack, lr, spread, epochs)


def _hybrid(width: int, passes: int, lr: float, spread: float, epochs: int) -> list[str]:
    """The paper's hybrid network: a trainable digital input layer, ``passes`` SHG transformations in sequence
    whose data fill the whole shaped spectrum (data and parameter phases on every pixel), a digital readout."""
    devices, stack = {}, [{"kind": "linear", "size": width}]
    for k in range(1, passes + 1):
        name = f"shg{k}"
        devices[name] = {"driver": {"kind": "simulated", "system": "shg",
                                    "options": {"n_in": width, "n_out": width, "n_pixels": width}},
                         "twin": {"kind": "residual", "groups": 313, "batch": 32}}
        stack += [{"kind": "rescale"}, {"kind": "physical", "device": name}]
    stack.append({"kind": "linear", "size": 10})
    return _stack_overrides(devices, stack, lr, spread, epochs)


def _shg_features(front: dict, n_in: int, n_out: int, n_pixels: int, epochs: int,
                  noiseless: bool = False) -> list[str]:
    """One SHG pass as a feature map: ``front`` (a trainable linear layer or a fixed pool) into the data pixels,
    the spectrometer's bins standardised (``affine``) and read out by a linear layer. ``noiseless``: the
    device without measurement noise or shot fluctuation (what its noise costs; never a shipped setting)."""
    quiet = {"imperfections": {"noise": 0.0, "shot": 0.0}} if noiseless else {}
    devices = {"shg1": {"driver": {"kind": "simulated", "system": "shg",
                                   "options": {"n_in": n_in, "n_out": n_out, "n_pixels": n_pixels}, **quiet},
                        "twin": {"kind": "residual", "groups": 313, "batch": 32}}}
    stack = [front, {"kind": "rescale"}, {"kind": "physical", "device": "shg1"}, {"kind": "affine"},
             {"kind": "linear", "size": 10}]
    return _stack_overrides(devices, stack, 0.01, 0.3, epochs)


def candidates(task: str, epochs: int) -> list[tuple[str, list[str]]]:
    """Every candidate of a task's search, labelled."""
    keep = ["schedule.keep=best", f"schedule.epochs={epochs}"]
    if task in ("plate_mnist", "circuit_mnist"):
        system = task.split("_")[0]
        out = [(f"shipped lr {lr}", [f"optimizer.lr={lr}", *keep]) for lr in (0.01, 0.03)]
        out += [(f"784-24 then {system} 24-24-10 lr {lr} spread {s}", _waveform(system, [24, 10], 24, lr, s, epochs))
                for lr in (0.01, 0.03) for s in (0.3, 1.0)]
        out.append((f"7x7 image into {system} 49-30-30-10 lr 0.01 spread 1.0",
                    _waveform(system, [30, 30, 10], None, 0.01, 1.0, epochs)))
        return out
    if task == "hybrid_mnist":
        out = [("shipped (SHG 24 of 48 pixels, circuit)", keep)]
        out += [(f"784-{w} then SHG on all {w} pixels x{p} lr 0.01 spread {s}", _hybrid(w, p, 0.01, s, epochs))
                for w, p in ((48, 1), (48, 2)) for s in (0.3, 1.0)]
        linear, pool = ({"kind": "linear", "size": 24}, {"kind": "linear", "size": 96}), {"kind": "pool", "size": 7}
        out += [("784-24 into 24 of 96 pixels, 96 bins", _shg_features(linear[0], 24, 96, 96, epochs)),
                ("784-96 into all 96 pixels, 96 bins", _shg_features(linear[1], 96, 96, 96, epochs)),
                ("784-96 into all 96 pixels, 96 bins, no device noise",
                 _shg_features(linear[1], 96, 96, 96, epochs, noiseless=True)),
                ("7x7 image into 49 of 98 pixels, 98 bins", _shg_features(pool, 49, 98, 98, epochs)),
                ("14x14 image into 196 of 392 pixels, 196 bins",
                 _shg_features({"kind": "pool", "size": 14}, 196, 196, 392, epochs))]
        return out
    if task == "shg_vowels":
        return [(f"{'shipped ' if (lr, s) == (0.02, 1.5) else ''}lr {lr} spread {s}",
                 [f"optimizer.lr={lr}", f"init.spread={s}", *keep]) for lr in (0.01, 0.02) for s in (0.5, 1.5)]
    raise SystemExit(f"search_pat: no search for task {task!r} (plate_mnist, circuit_mnist, hybrid_mnist, "
                     "shg_vowels)")


def run_candidate(task: str, overrides: list[str]) -> dict[str, Any]:
    import torch

    from pnn_cluster.runner import InProcessPlacement
    from pnn_cluster.runner.run import ExperimentRun

    torch.set_num_threads(1)
    cfg = configuration(task, False, overrides)
    r = ExperimentRun(cfg, InProcessPlacement(), echo=False, measure_test=False).run()
    return {"val_acc": r.val_acc, "seconds": r.seconds, "device_samples": r.device_samples_total,
            "val_history": [h.get("val_acc") for h in r.history]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--seeds", type=int, default=2, help="search seeds per candidate (100, 101, ...)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per candidate run")
    p.add_argument("--only", default=None, help="comma-separated candidate indices to run (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a further override on every candidate (e.g. dataset.train_subset=2000)")
    p.add_argument("--method", default="pat", help="training method of every run (oracle: the physics' ceiling, "
                   "exact gradients; ablation, digital: the controls on the same designs); only pat chooses")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--log", default=None, metavar="FILE", help="JSON lines of finished runs; runs it holds are "
                   "skipped, so an interrupted search continues")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cands = candidates(args.task, args.epochs)
    if args.only:
        keep = {int(i) for i in args.only.split(",")}
        cands = [c for i, c in enumerate(cands) if i in keep]
    done = read_log(args.log)
    seeds = [SEARCH_SEED + i for i in range(args.seeds)]
    pool = Pool(args.workers)
    jobs = {}
    for label, ov in cands:
        for s in seeds:
            key = (args.task, label, s) if args.method == "pat" else (args.task, label, s, args.method)
            if key not in done:
                split = ["dataset.folds=5", f"dataset.fold={s % 5}"] if args.task == "shg_vowels" else []
                jobs[key] = pool.submit(run_candidate, args.task,
                                        [*ov, *args.overrides, f"method={args.method}", f"seed={s}",
                                         f"dataset.split_seed={s}", *split])

    def record(key: tuple, result: Any) -> None:
        log(f"done {' | '.join(map(str, key))}: validation {result['val_acc']}")
        if args.log:
            with open(args.log, "a") as fh:
                fh.write(json.dumps({"key": list(key), "overrides": dict(cands)[key[1]], "result": result}) + "\n")

    results = pool.gather(jobs, done, record)
    out: dict[str, Any] = {"task": args.task, "method": args.method, "seeds": seeds, "epochs": args.epochs,
                           "candidates": []}
    for label, ov in cands:
        keys = [(args.task, label, s) if args.method == "pat" else (args.task, label, s, args.method) for s in seeds]
        vals = [results[k]["val_acc"] for k in keys]
        out["candidates"].append({"label": label, "overrides": ov, "val": vals, "val_mean": statistics.fmean(vals),
                                  "val_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                  "seconds": statistics.fmean(results[k]["seconds"] for k in keys)})
        log(f"{label:48s} validation {out['candidates'][-1]['val_mean']:.3f} +- {out['candidates'][-1]['val_sd']:.3f}")
    # ties (the vowels' 21 validation rows saturate) keep the shipped settings: no evidence, no change
    best = max(c["val_mean"] for c in out["candidates"])
    tied = [c for c in out["candidates"] if c["val_mean"] >= best - 1e-9]
    if args.method != "pat":  # a ceiling or a control: nothing is chosen from it
        out["seconds"] = time.perf_counter() - t0
        print(json.dumps(out))
        return 0
    out["chosen"] = next((c["label"] for c in tied if c["label"].startswith("shipped")), tied[0]["label"])
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sequential calibration's settings, searched under the twins benchmark's protocol, as lines of a search log.

For one system and seed (others than the benchmark's 0): the benchmark's 20,000 random samples
(``collect(device, groups, 16, repeats=2, seed)``, ``fit_splits(data, 0.2, seed)``), the best twin kind fitted
on them (its NMSE on half the held-out settings is the target), then one sequential calibration per plan given,
each on a fresh copy of the device, exactly as ``scripts/bench_pat.py --sections twins`` runs it
(``sequential_figures``). Prints one JSON line per plan (and appends it to ``--log``)::

    python scripts/search_sequential.py shg 1 --plans '[{}, {"candidates": 1}, {"growth": 0.25}]' \\
        --log docs/search/sequential.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import bench_pat  # scripts beside this one (a script's own folder is on its path)
import torch
from search_twins import OPTIONS

from pnn_cluster.devices import make_device
from pnn_cluster.twins import build_twin, collect, fit_twin
from pnn_cluster.twins.fit import fit_splits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("system", choices=sorted(OPTIONS))
    p.add_argument("seed", type=int)
    p.add_argument("--kind", default=None, help="the twin kind (default: the best on the early-stopping samples "
                                                "of physics, residual and, where it applies, structured)")
    p.add_argument("--plans", default="[{}]", help="JSON list of SequentialPlan settings, one run each")
    p.add_argument("--samples", type=int, default=20000, help="random samples of the target twin (default 20,000)")
    p.add_argument("--log", default=None, help="append each line to this file")
    args = p.parse_args(argv)
    if args.seed == 0:
        p.error("seed 0 is the benchmark's: search on other seeds")
    plans = json.loads(args.plans)
    if not isinstance(plans, list) or not all(isinstance(x, dict) for x in plans):
        p.error(f"--plans: a JSON list of objects, got {args.plans!r}")
    torch.set_num_threads(1)
    options = OPTIONS[args.system]

    def same_device():
        base = make_device(args.system, **options)
        return make_device(args.system, imperfections=base.imperfections.with_(
            seed=args.seed, latency_call_s=0.0, latency_sample_s=0.0), **options)

    device = same_device()
    data = collect(device, groups=max(12, args.samples // 32), batch=16, repeats=2, seed=args.seed, progress=False)
    fit_on, stop, val = fit_splits(data, 0.2, args.seed)
    kinds = [args.kind] if args.kind else ["physics", "residual", "structured"]
    fitted = {}
    for kind in kinds:
        try:
            twin = build_twin(kind, device.spec, device.model())
        except ValueError:  # a kind that does not apply to this device
            continue
        res = fit_twin(twin, fit_on, val, seed=args.seed, progress=False, stop=stop)
        fitted[kind] = (res.nmse_stop, res.nmse_val, twin.requires_grad_(False))
    best = min(fitted, key=lambda k: fitted[k][0])
    for plan in plans:
        t0 = time.perf_counter()
        seq = bench_pat.sequential_figures(args.system, same_device(), fitted[best][2], best, val,
                                           args.samples // 2, args.seed, plan=plan)
        line = {"system": args.system, "seed": args.seed, "kind": best, "plan_changes": plan,
                "noise_floor": val.noise_floor(), "best_nmse": fitted[best][1],
                "sequential": {k: v for k, v in seq.items() if k != "plan"}, "plan": seq["plan"],
                "seconds": round(time.perf_counter() - t0, 1)}
        text = json.dumps(line)
        print(text, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

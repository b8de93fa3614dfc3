"""One twin fit under the twins benchmark's protocol, as a line of the twin search log.

The protocol of ``scripts/bench_pat.py``'s twins section: ``collect(device, groups, batch, repeats=2,
seed)`` of 20,000 samples on ``make_device(system, **options)`` with latency off, ``fit_splits(data, 0.2,
seed)``, ``fit_twin(twin, fit_on, val, seed=seed, stop=stop)``. Settings are chosen on seeds other than the
benchmark's (0). Prints one JSON line (and appends it to ``--log``)::

    python scripts/search_twins.py oscillators 1 residual --log docs/search/twins_mlp.jsonl
    python scripts/search_twins.py oscillators 1 residual --stages physics,residual   # without the joint stage
    python scripts/search_twins.py shg 1 mlp --config '{"members": 1}' --fit '{"patience": 200}' --batch 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from pnn_cluster.devices import make_device
from pnn_cluster.twins import build_twin, collect, fit_twin
from pnn_cluster.twins.fit import fit_splits

#: each system at the size its task uses it (as scripts/bench_pat.py's TWIN_SYSTEMS)
OPTIONS = {"shg": {"n_in": 24, "n_out": 24}, "circuit": {"n_in": 24, "n_out": 24},
           "plate": {"n_in": 16, "n_out": 10}, "oscillators": {"n_in": 24, "n_out": 24}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("system", choices=sorted(OPTIONS))
    p.add_argument("seed", type=int)
    p.add_argument("kind")
    p.add_argument("--config", default="{}", help="JSON: options for build_twin")
    p.add_argument("--fit", default="{}", help="JSON: options for fit_twin (epochs, lr, patience, ...)")
    p.add_argument("--samples", type=int, default=20000, help="device samples (default 20,000)")
    p.add_argument("--batch", type=int, default=16, help="inputs per parameter setting (default 16)")
    p.add_argument("--stages", default=None,
                   help="comma-separated stage names to keep of the twin's fit_stages (default: all)")
    p.add_argument("--log", default=None, help="append the line to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    options = OPTIONS[args.system]
    base = make_device(args.system, **options)
    device = make_device(args.system, imperfections=base.imperfections.with_(
        seed=args.seed, latency_call_s=0.0, latency_sample_s=0.0), **options)
    data = collect(device, groups=max(12, args.samples // (2 * args.batch)), batch=args.batch, repeats=2,
                   seed=args.seed, progress=False)
    fit_on, stop, val = fit_splits(data, 0.2, args.seed)
    twin = build_twin(args.kind, device.spec, device.model(), **json.loads(args.config))
    if args.stages is not None:
        keep = args.stages.split(",")
        every = twin.fit_stages()
        unknown = sorted(set(keep) - {name for name, _ in every})
        if unknown:
            p.error(f"--stages: {unknown} not among this twin's stages {[name for name, _ in every]}")
        twin.fit_stages = lambda: [s for s in every if s[0] in keep]
    t0 = time.perf_counter()
    res = fit_twin(twin, fit_on, val, seed=args.seed, progress=False, stop=stop, **json.loads(args.fit))
    floor = val.noise_floor()
    line = {"system": args.system, "seed": args.seed, "kind": args.kind, "config": json.loads(args.config),
            "fit": json.loads(args.fit), "samples": data.device_samples, "batch": args.batch,
            "stages": res.stages, "floor": floor, "nmse_val": res.nmse_val, "ratio": res.nmse_val / floor,
            "nmse_stop": res.nmse_stop, "nmse_train": res.nmse_train, "best_epoch": res.best_epoch,
            "epochs_run": len(res.history), "seconds": round(time.perf_counter() - t0, 1),
            "command": "python scripts/search_twins.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    text = json.dumps(line)
    print(text)
    if args.log:
        with open(args.log, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

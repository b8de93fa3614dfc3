"""``pnn-cluster calibrate``: fit twins of a device and compare them with its noise floor."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pnn_cluster.commands._table import format_table
from pnn_cluster.commands._tracking import add_tracking_args
from pnn_cluster.devices import SYSTEMS, make_device
from pnn_cluster.twins import TWIN_KINDS, calibrate, save_twin


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="collect samples from a device, fit twins, report NMSE against the noise floor",
        description="Measures random inputs and parameter settings on a device (each twice, to measure its "
                    "noise floor), fits the twin kinds asked for, and prints each twin's held-out NMSE next "
                    "to the device's noise floor. The best twin can be saved as state_dict + JSON metadata.",
    )
    p.add_argument("--system", required=True, choices=sorted(SYSTEMS), help="simulated system to calibrate")
    p.add_argument("--twins", default="physics,residual,mlp", help="comma-separated twin kinds")
    p.add_argument("--groups", type=int, default=625,
                   help="parameter settings to measure (many settings teach a twin more than many inputs per "
                        "setting; the default 625 x 16 inputs x 2 repeats is 20,000 device samples)")
    p.add_argument("--batch", type=int, default=16, help="inputs per parameter setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, metavar="DIR", help="save the best twin under DIR")
    p.add_argument("--json", action="store_true", help="print the table as one JSON line as well")
    add_tracking_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.commands import UsageError
    from pnn_cluster.commands._tracking import log_calibration

    kinds = [k.strip() for k in args.twins.split(",") if k.strip()]
    bad = [k for k in kinds if k not in TWIN_KINDS]
    if bad or not kinds:
        raise UsageError(f"--twins: unknown kind(s) {bad or args.twins!r}; allowed: {', '.join(TWIN_KINDS)}")
    if args.groups < 3 or args.batch < 1:
        raise UsageError(f"--groups must be >= 3 and --batch >= 1, got {args.groups} and {args.batch}")
    device = make_device(args.system)
    started = time.time()
    cal = calibrate(device, kinds=kinds, groups=args.groups, batch=args.batch, seed=args.seed, progress=True)
    print(f"{args.system}: noise floor NMSE {cal.noise_floor:.3e}; ideal model (uncalibrated) NMSE "
          f"{cal.ideal_nmse:.3e}; {cal.device_samples} device samples")
    rows = [("twin", "early-stop NMSE", "held-out NMSE", "noise floor", "NMSE / floor", "fit time (s)")]
    for r in cal.results.values():
        stop = f"{r.nmse_stop:.3e}" if r.nmse_stop is not None else "-"
        rows.append((r.kind, stop, f"{r.nmse_val:.3e}", f"{r.noise_floor:.3e}", f"{r.ratio_to_floor:.2f}",
                     f"{r.seconds:.1f}"))
    print(format_table(rows))
    print(f"best: {cal.best_kind} ({cal.results[cal.best_kind].ratio_to_floor:.2f} x the noise floor; "
          "chosen on the early-stopping settings, reported on the held-out ones)")
    if args.save:
        path = save_twin(cal.best, Path(args.save) / f"{args.system}_{cal.best_kind}",
                         system=args.system, fit=cal.results[cal.best_kind].as_dict(),
                         device=device.identity())
        print(f"saved {path}")
    params = {k: getattr(args, k) for k in ("system", "twins", "groups", "batch", "seed")}
    log_calibration(args, args.system, device, cal, params, started=started)
    if args.json:
        print(json.dumps({"system": args.system, "noise_floor": cal.noise_floor, "ideal_nmse": cal.ideal_nmse,
                          "twins": cal.table(), "best": cal.best_kind}))
    return 0

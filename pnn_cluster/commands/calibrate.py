"""``pnn-cluster calibrate``: fit twins of a device and compare them with its noise floor, on uniform held-out
settings and, given a recorded operating region, where a trained network runs the device."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pnn_cluster.commands._table import format_table
from pnn_cluster.commands._tracking import add_tracking_args
from pnn_cluster.devices import SYSTEMS, make_device
from pnn_cluster.twins import TWIN_KINDS, calibrate, save_twin
from pnn_cluster.twins.sequential import SequentialPlan

_PLAN = SequentialPlan()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="collect samples from a device, fit twins, report NMSE against the noise floor",
        description="Measures random inputs and parameter settings on a device (each twice, to measure its "
                    "noise floor), fits the twin kinds asked for, and prints each twin's held-out NMSE next "
                    "to the device's noise floor. With --operating (a region a training run recorded), each "
                    "twin is also judged on settings and inputs drawn from that region, next to the region's "
                    "own noise floor. With --sequential the samples are measured in rounds where an ensemble "
                    "of twins disagrees most, until the held-out NMSE is within --factor of the floor or "
                    "--budget is spent. The best twin can be saved as state_dict + JSON metadata.",
    )
    p.add_argument("--system", required=True, choices=sorted(SYSTEMS), help="simulated system to calibrate")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a size option of the system, e.g. --option n_in=24 (repeatable)")
    p.add_argument("--twins", default="physics,residual,mlp", help="comma-separated twin kinds")
    p.add_argument("--groups", type=int, default=625,
                   help="parameter settings to measure (many settings teach a twin more than many inputs per "
                        "setting; the default 625 x 16 inputs x 2 repeats is 20,000 device samples)")
    p.add_argument("--batch", type=int, default=16, help="inputs per parameter setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--operating", default=None, metavar="FILE",
                   help="an operating region (.npz) a training run recorded (OperatingRecorder): judge each twin "
                        "there as well")
    p.add_argument("--layer", default=None,
                   help="the region's layer to use (default: the only one, or the one named like --system)")
    p.add_argument("--operating-groups", type=int, default=125,
                   help="settings drawn from the operating region (x --batch inputs x 2 repeats)")
    p.add_argument("--sequential", action="store_true",
                   help="measure in rounds where the twins are least sure instead of all at random")
    p.add_argument("--budget", type=int, default=_PLAN.budget, help="--sequential: device samples at most")
    p.add_argument("--factor", type=float, default=_PLAN.factor,
                   help="--sequential: stop when the held-out NMSE is within this factor of the noise floor")
    p.add_argument("--near", type=float, default=0.0,
                   help="--sequential with --operating: share of candidate settings drawn near the region")
    p.add_argument("--save", default=None, metavar="DIR", help="save the best twin under DIR")
    p.add_argument("--json", action="store_true", help="print the table as one JSON line as well")
    add_tracking_args(p)
    p.set_defaults(func=run)


def _region(args: argparse.Namespace, device):
    from pnn_cluster.commands import UsageError
    from pnn_cluster.twins.operating import OperatingRegion

    try:
        region = OperatingRegion.load(args.operating)
    except (OSError, ValueError) as e:
        raise UsageError(f"--operating {args.operating}: {e}") from None
    names = list(region.layers)
    layer = args.layer or (names[0] if len(names) == 1 else args.system if args.system in names else None)
    if layer not in region.layers:
        raise UsageError(f"--layer {layer!r}: the region {args.operating} holds layers {names}; name one")
    try:
        region[layer].check(device.spec, layer)
    except ValueError as e:
        raise UsageError(f"--operating: {e} (size options: --option n_in=..)") from None
    return layer, region[layer]


def _sequential(device, kinds: list[str], args: argparse.Namespace, region) -> Any:
    """Each kind calibrated sequentially; the figures as a :class:`~pnn_cluster.twins.Calibration`."""
    from pnn_cluster.twins import Calibration, FitResult, build_twin, evaluate_twin
    from pnn_cluster.twins.sequential import calibrate_sequential

    plan = SequentialPlan(budget=args.budget, factor=args.factor, batch=args.batch, near=args.near)
    model = device.model()
    results, twins, runs = {}, {}, {}
    for i, kind in enumerate(kinds):
        seq = calibrate_sequential(build_twin(kind, device.spec, model), plan, device=device, seed=args.seed + 97 * i,
                                   region=region, progress=True)
        print(f"  {kind}: {seq.device_samples} device samples in {len(seq.rounds)} rounds; stopped by {seq.reason}")
        results[kind] = FitResult(kind, evaluate_twin(seq.twin, seq.train), seq.nmse, seq.noise_floor, seq.seconds,
                                  [r["nmse"] for r in seq.rounds], nmse_stop=seq.nmse)
        twins[kind], runs[kind] = seq.twin, seq
    first = runs[kinds[0]]
    ideal = evaluate_twin(build_twin("physics", device.spec, model).requires_grad_(False), first.holdout) \
        if model is not None else None
    samples = sum(r.device_samples for r in runs.values())
    return Calibration(results, twins, first.noise_floor, ideal, samples, first.train, first.holdout)


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.commands import UsageError
    from pnn_cluster.commands._tracking import log_calibration
    from pnn_cluster.commands.serve_device import parse_options

    kinds = [k.strip() for k in args.twins.split(",") if k.strip()]
    bad = [k for k in kinds if k not in TWIN_KINDS]
    if bad or not kinds:
        raise UsageError(f"--twins: unknown kind(s) {bad or args.twins!r}; allowed: {', '.join(TWIN_KINDS)}")
    if args.groups < 3 or args.batch < 1:
        raise UsageError(f"--groups must be >= 3 and --batch >= 1, got {args.groups} and {args.batch}")
    if args.operating_groups < 2:
        raise UsageError(f"--operating-groups must be >= 2, got {args.operating_groups}")
    if args.near and not args.operating:
        raise UsageError(f"--near {args.near}: needs --operating (the region to draw near)")
    try:
        device = make_device(args.system, **parse_options(args.option))
    except (TypeError, ValueError) as e:
        raise UsageError(f"--option: {e}") from None
    layer, region = _region(args, device) if args.operating else (None, None)
    started = time.time()
    if args.sequential:
        try:
            cal = _sequential(device, kinds, args, region)
        except ValueError as e:
            raise UsageError(f"--sequential: {e}") from None
    else:
        cal = calibrate(device, kinds=kinds, groups=args.groups, batch=args.batch, seed=args.seed, progress=True)
    ideal = f"{cal.ideal_nmse:.3e}" if cal.ideal_nmse is not None else "-"
    print(f"{args.system}: noise floor NMSE {cal.noise_floor:.3e}; ideal model (uncalibrated) NMSE {ideal}; "
          f"{cal.device_samples} device samples")
    operating = None
    if region is not None:
        from pnn_cluster.twins.operating import measure_region, region_figures

        device.noise_stream("operating region")
        samples = measure_region(device, region, groups=args.operating_groups, batch=args.batch, seed=args.seed + 1,
                                 progress=True)
        operating = {**region_figures(cal.twins, samples), "layer": layer, "file": str(args.operating),
                     "settings": len(region)}
    rows = [("twin", "early-stop NMSE", "held-out NMSE", "noise floor", "NMSE / floor", "fit time (s)")]
    if operating:
        rows[0] += ("operating NMSE", "operating / floor")
    for r in cal.results.values():
        stop = f"{r.nmse_stop:.3e}" if r.nmse_stop is not None else "-"
        row = (r.kind, stop, f"{r.nmse_val:.3e}", f"{r.noise_floor:.3e}", f"{r.ratio_to_floor:.2f}",
               f"{r.seconds:.1f}")
        if operating:
            row += (f"{operating[r.kind]:.3e}", f"{operating[r.kind] / operating['noise_floor']:.2f}")
        rows.append(row)
    print(format_table(rows))
    if operating:
        print(f"operating region: {operating['settings']} recorded settings of layer {layer}, "
              f"{operating['device_samples']} device samples, noise floor NMSE {operating['noise_floor']:.3e}")
    print(f"best: {cal.best_kind} ({cal.results[cal.best_kind].ratio_to_floor:.2f} x the noise floor; "
          "chosen on the early-stopping settings, reported on the held-out ones)")
    if args.save:
        path = save_twin(cal.best, Path(args.save) / f"{args.system}_{cal.best_kind}",
                         system=args.system, fit=cal.results[cal.best_kind].as_dict(),
                         device=device.identity())
        print(f"saved {path}")
    params = {k: getattr(args, k) for k in ("system", "twins", "groups", "batch", "seed", "sequential")}
    if args.sequential:
        params.update(budget=args.budget, factor=args.factor, near=args.near)
    if operating:
        params.update(operating=str(args.operating), operating_layer=layer, operating_groups=args.operating_groups)
    log_calibration(args, args.system, device, cal, params, started=started, operating=operating)
    if args.json:
        print(json.dumps({"system": args.system, "noise_floor": cal.noise_floor, "ideal_nmse": cal.ideal_nmse,
                          "twins": cal.table(), "best": cal.best_kind, "device_samples": cal.device_samples,
                          "operating": operating}))
    return 0

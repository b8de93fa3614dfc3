"""``pnn-cluster devices``: list the simulated systems or a configuration's devices, and check their health."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from pnn_cluster.devices.base import DeviceError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "devices", help="list simulated systems or a configuration's devices, with a health check",
        description="Without CONFIG, lists the simulated systems with their default spec (ports, trainable "
                    "parameters and limits). With CONFIG, lists the configured devices with driver, address and "
                    "placement. Unless --no-check, each device is connected and measures one small batch inside "
                    "its limits; the time it took and the device's health counters are shown. Exit codes: 0 all "
                    "healthy, 1 a device failed its check, 2 bad configuration.",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG", help="experiment YAML whose devices to list")
    p.add_argument("--no-check", action="store_true", help="list only; do not connect or measure")
    p.add_argument("--probe-batch", type=int, default=4, help="inputs measured by the health check (default 4)")
    p.add_argument("--json", action="store_true", help="print the list as one JSON line as well")
    p.set_defaults(func=run)


def probe(device: Any, batch: int = 4, seed: int = 0) -> dict[str, Any]:
    """Connect, measure ``batch`` random inputs inside the input limits, report time and health."""
    t0 = time.perf_counter()
    try:
        device.connect()
        port = device.spec.input
        lo = port.low if np.isfinite(port.low) else -1.0
        hi = port.high if np.isfinite(port.high) else 1.0
        x = np.random.default_rng(seed).uniform(lo, hi, size=(batch, port.size))
        y = device.forward(x)
        ok = bool(np.isfinite(y).all())
        out = {"ok": ok, "ms": 1000 * (time.perf_counter() - t0), "output_range": [float(y.min()), float(y.max())]}
        if not ok:
            out["error"] = "non-finite output"
    except Exception as exc:  # the point of a health check: report, never crash
        out = {"ok": False, "ms": 1000 * (time.perf_counter() - t0), "error": f"{type(exc).__name__}: {exc}"}
    try:
        out["health"] = {k: v for k, v in device.health().items() if isinstance(v, (int, float, str, bool))}
    except Exception:
        pass
    with_close = getattr(device, "close", None)
    if with_close is not None:
        try:
            with_close()
        except Exception:
            pass
    return out


def _spec_row(spec) -> dict[str, Any]:
    def rng(lo: float, hi: float, unit: str) -> str:
        return f"[{lo:.4g}, {hi:.4g}]{' ' + unit if unit else ''}"

    return {
        "input": f"{spec.input.size} in {rng(spec.input.low, spec.input.high, spec.input.unit)}",
        "output": f"{spec.output.size}{' ' + spec.output.unit if spec.output.unit else ''}",
        "params": ", ".join(f"{p.name}{p.shape} in {rng(p.low, p.high, p.unit)}" for p in spec.params),
    }


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.commands import UsageError

    if args.probe_batch < 1:
        raise UsageError(f"--probe-batch {args.probe_batch}; allowed: >= 1")
    rows: list[dict[str, Any]] = []
    if args.config is None:
        from pnn_cluster.devices import SYSTEMS, make_device

        for name in sorted(SYSTEMS):
            dev = make_device(name)
            row = {"name": name, "driver": "simulated", "where": "in process", **_spec_row(dev.spec),
                   "imperfections": dev.imperfections.to_dict()}
            if not args.no_check:
                row["check"] = probe(dev, args.probe_batch)
            rows.append(row)
    else:
        from pnn_cluster.config import ConfigError, load_config
        from pnn_cluster.runner import device_recipes

        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        for recipe in (r for rs in device_recipes(cfg).values() for r in rs):
            drv = recipe.driver
            if drv.kind == "zmq":
                where, what = drv.address, "zmq"
            elif drv.kind == "visa":
                where = f"{drv.source.resource} -> {drv.sink.resource}"
                what = f"visa {drv.source.driver}/{drv.sink.driver}"
            elif drv.kind == "python":
                where, what = "in process", f"python {drv.class_}"
            else:
                where, what = "in process", f"simulated {drv.system}"
            row: dict[str, Any] = {"name": recipe.label, "driver": what, "where": where,
                                   "placement": recipe.placement.model_dump(exclude_defaults=True)}
            try:
                dev = recipe.build()
            except (ValueError, TypeError, ImportError) as exc:
                raise UsageError(f"device {recipe.label}: {exc}") from None
            try:
                row.update(_spec_row(dev.spec))
            except DeviceError:
                row["input"] = "(spec read from the device on connect)"
            if not args.no_check:
                row["check"] = probe(dev, args.probe_batch)
                if row["check"].get("ok"):
                    row.update(_spec_row(dev.spec))
            rows.append(row)
    for row in rows:
        check = row.get("check")
        status = "" if check is None else (f"  OK {check['ms']:.1f} ms" if check["ok"] else
                                           f"  FAILED: {check.get('error')}")
        print(f"{row['name']}: {row['driver']} ({row['where']}){status}")
        if "output" in row:
            print(f"    input {row['input']}; output {row['output']}")
        else:
            print(f"    {row['input']}")
        if row.get("params"):
            print(f"    parameters {row['params']}")
        if row.get("placement"):
            print(f"    placement {row['placement']}")
    if args.json:
        print(json.dumps(rows, default=str))
    return 1 if any(r.get("check") and not r["check"]["ok"] for r in rows) else 0

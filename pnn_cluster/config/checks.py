"""What one key cannot say alone: the checks across a configuration's keys, after each key's type is right.

A layer names a device that exists and no other layer uses; a twin that
starts from a physics model has one; a simulated system's ``options`` are
checked against its ``build_spec`` signature (names, integer sizes, ranges)
before it is built, and a declared device spec is parsed. Then the largest
allocations the sizes imply together (a linear layer's weights and optimizer
state, a batch's activations, a twin's calibration samples and hidden layers)
are estimated and a configuration whose estimate exceeds this machine's
memory (:func:`machine_memory`) is refused, naming the key to reduce.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pnn_cluster.config.errors import Problem, near, show
from pnn_cluster.config.schema import MAX_WIDTH, ExperimentConfig
from pnn_cluster.devices import DeviceSpec, LimitError, make_device

__all__ = ["problems", "machine_memory", "MAX_PARAMS"]

#: a declared device's parameters, all elements together (an SLM of 4096 x 4096 pixels)
MAX_PARAMS = 2**24
#: features of the datasets whose width is known without reading them
DATASET_FEATURES = {"mnist5k": 784, "digits": 64, "vowels": 12}


def problems(cfg: ExperimentConfig) -> list[Problem]:
    """Every mistake across ``cfg``'s keys; the memory its sizes need is estimated when there is none."""
    out: list[Problem] = []
    names = list(cfg.devices)
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
            out.append(Problem(f"devices.{name}", "device names are identifiers", "letters, digits, _ and -"))
    used: dict[str, int] = {}
    physical = 0
    for i, layer in enumerate(cfg.stack):
        key = f"stack.{i}"
        if layer.kind == "physical":
            physical += 1
            if layer.device is None:
                out.append(Problem(f"{key}.device", "a physical layer names its device", ", ".join(names)))
            elif layer.device not in cfg.devices:
                out.append(Problem(f"{key}.device", f"unknown device {layer.device!r}{near(layer.device, names)}",
                                   ", ".join(names) or "none: add it under devices"))
            elif layer.device in used:
                out.append(Problem(f"{key}.device", f"device {layer.device!r} already serves "
                                   f"stack.{used[layer.device]}; a device is one instrument, one layer",
                                   ", ".join(n for n in names if n not in used)))
            else:
                used[layer.device] = i
        elif layer.device is not None:
            out.append(Problem(f"{key}.device", f"a {layer.kind} layer has no device", "only kind: physical"))
        if layer.kind in ("linear", "pool") and layer.size is None:
            out.append(Problem(f"{key}.size", f"a {layer.kind} layer needs its output size",
                               "an integer >= 1" + (" (the pooled image's side)" if layer.kind == "pool" else "")))
        if layer.kind not in ("linear", "pool") and layer.size is not None:
            out.append(Problem(f"{key}.size", f"a {layer.kind} layer takes its size from its neighbours",
                               "size only on kind: linear or pool"))
        if layer.kind == "rescale" and not any(l.kind == "physical" for l in cfg.stack[i + 1:]):
            out.append(Problem(f"{key}.kind", "a rescale maps into the input range of a following physical layer; "
                               "none follows", "linear, affine"))
    if physical == 0:
        out.append(Problem("stack", "no physical layer: nothing would be trained on a device",
                           "at least one {kind: physical, device: NAME}"))
    if cfg.schedule.keep == "best" and cfg.dataset.val_fraction == 0:
        out.append(Problem("schedule.keep", "'best' chooses the epoch on the validation split, and "
                           "dataset.val_fraction is 0", "keep: last, or dataset.val_fraction > 0"))
    unknown_refs = any(l.kind == "physical" and l.device not in cfg.devices for l in cfg.stack)
    for name in names:
        if name not in used and not unknown_refs:
            out.append(Problem(f"devices.{name}", "device is not used by any layer of the stack",
                               "remove it, or add {kind: physical, device: " + name + "}"))
    specs: dict[str, DeviceSpec | None] = {}
    for name, dev in cfg.devices.items():
        drv = dev.driver
        found, specs[name] = _driver_spec(f"devices.{name}.driver", drv)
        out += found
        if cfg.method == "oracle" and drv.kind != "simulated":
            out.append(Problem("method", f"'oracle' differentiates through the simulator; device {name!r} is "
                               f"{drv.kind} hardware", "pat, in_silico"))
        # a python device may bring its own model(); that is known only once it is built
        has_model = drv.kind in ("simulated", "python") or drv.model is not None
        if dev.twin.kind in ("physics", "residual", "ideal") and dev.twin.load is None and not has_model:
            out.append(Problem(f"devices.{name}.twin.kind", f"twin {dev.twin.kind!r} starts from a physics model; "
                               f"device {name!r} has none", "mlp, or set driver.model.system"))
        if dev.twin.hidden is not None and dev.twin.kind not in ("mlp", "residual"):
            out.append(Problem(f"devices.{name}.twin.hidden", f"twin {dev.twin.kind!r} has no hidden layers",
                               "hidden only with kind mlp or residual"))
        if dev.replicas > 1 and drv.kind in ("visa", "zmq"):
            out.append(Problem(f"devices.{name}.replicas", "replicas of hardware are separate instruments, each "
                               "with its own driver", "1 for visa/zmq drivers; list the others under pool"))
        for j, member in enumerate(dev.pool):
            if member.driver.kind != drv.kind:
                out.append(Problem(f"devices.{name}.pool.{j}.driver.kind", f"a pool holds devices of one kind; "
                                   f"{name!r} is {drv.kind}", drv.kind))
            else:
                out += _driver_spec(f"devices.{name}.pool.{j}.driver", member.driver)[0]
    if not out:
        out += _memory_problems(cfg, specs)
    return out


# -- memory ----------------------------------------------------------------------------------------------------


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's limit when lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = 16 * 2**30
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(cgroup).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def _memory_problems(cfg: ExperimentConfig, specs: Mapping[str, DeviceSpec | None]) -> list[Problem]:
    """The largest allocations the sizes imply, each compared with this machine's memory."""
    # asked of the package, where the configuration's users find it (and may stand in a smaller machine)
    from pnn_cluster import config

    limit = config.machine_memory()
    out: list[Problem] = []

    def check(key: str, per_unit: int, units: int, what: str, unit_name: str) -> None:
        need = per_unit * units
        if need > limit:
            most = max(0, limit // max(per_unit, 1))
            out.append(Problem(key, f"{what} needs about {_bytes(need)}, more than this machine's memory "
                               f"({_bytes(limit)})", f"at most {most} {unit_name} at these sizes"))

    widths: list[int] = []
    width = DATASET_FEATURES.get(cfg.dataset.name)
    if width is not None:
        widths.append(width)
    for i, layer in enumerate(cfg.stack):
        if layer.kind == "linear":
            if width is not None:
                # weights, their gradient and the optimizer's two moments, in float64 at most
                check(f"stack.{i}.size", 4 * 8 * width, layer.size,
                      f"a linear layer of {width} x {layer.size} weights (with gradients and optimizer state)",
                      "outputs")
            width = layer.size
        elif layer.kind == "pool":
            width = layer.size * layer.size
        elif layer.kind == "physical":
            spec = specs.get(layer.device)
            width = spec.output.size if spec is not None else None
        if width is not None:
            widths.append(width)
    sched = cfg.schedule
    if widths:
        # values, gradients and the twins' vector-Jacobian products of every layer, for a whole batch
        check("schedule.batch_size", 3 * 8 * sum(widths), sched.batch_size,
              f"a batch of {sched.batch_size} samples through layers {'+'.join(map(str, widths))} wide",
              "samples")
        check("schedule.eval_batch", 8 * sum(widths), sched.eval_batch,
              f"an evaluation batch of {sched.eval_batch} samples", "samples")
    for name, dev in cfg.devices.items():
        spec = specs.get(name)
        if spec is None:
            continue
        tw = dev.twin
        n_params = sum(p.numel for p in spec.params)
        per_sample = 8 * (spec.input.size + n_params + tw.repeats * spec.output.size)
        samples = tw.groups * tw.batch
        check(f"devices.{name}.twin.batch", per_sample * tw.groups, tw.batch,
              f"{tw.groups} groups x {tw.batch} calibration samples x {tw.repeats} repeats", "per group")
        if samples * per_sample <= limit and tw.kind in ("mlp", "residual", "best"):
            default = [64, 64] if tw.kind == "residual" else [256, 256, 256]  # the twins' own defaults
            hidden = tw.hidden if tw.hidden is not None else default
            sizes = [spec.input.size + n_params, *hidden, spec.output.size]
            weights = sum(a * b for a, b in zip(sizes, sizes[1:]))
            check(f"devices.{name}.twin.hidden", 4 * 8, weights,
                  f"a twin MLP of {weights} weights ({' x '.join(map(str, sizes))})", "weights")
    return out


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


# -- devices, built to learn their specs -------------------------------------------------------------------------


def _driver_spec(key: str, drv: Any) -> tuple[list[Problem], DeviceSpec | None]:
    """A driver's mistakes, and the spec its device will have when that is known before it connects."""
    if drv.kind == "simulated":
        return _system_spec(key, drv.system, drv.options)
    out: list[Problem] = []
    spec = None
    model = getattr(drv, "model", None)
    if model is not None:
        out, spec = _system_spec(f"{key}.model", model.system, model.options)
    declared = getattr(drv, "spec", None)
    if declared is not None:
        found, declared_spec = _declared_spec(f"{key}.spec", declared)
        out += found
        spec = declared_spec or spec
    return out, spec


def _system_spec(key: str, system: str, options: Mapping[str, Any]) -> tuple[list[Problem], DeviceSpec | None]:
    """A simulated system's mistakes in ``options`` (each under ``KEY.options.NAME``), else the spec it builds."""
    system_class = type(make_device(system))
    # the size options its ``build_spec`` takes: its signature is the source of truth
    allowed = tuple(system_class.option_types())
    bad = [Problem(f"{key}.options.{k}", f"unknown option of system {system!r}{near(k, allowed)}", ", ".join(allowed))
           for k in options if k not in allowed]
    if bad:
        return bad, None
    try:
        # names, types and ranges first: nothing is allocated for a value the system cannot take
        system_class.check_options(options)
    except LimitError as exc:
        what = f"{exc.problem}: {exc.value}" if exc.value is not None else exc.problem
        return [Problem(f"{key}.{exc.field}", what, exc.allowed)], None
    try:
        return [], make_device(system, **options).spec
    except (TypeError, ValueError) as exc:
        return [Problem(f"{key}.options", f"system {system!r} refuses {dict(options)}: {exc}")], None


def _declared_spec(key: str, data: Mapping[str, Any]) -> tuple[list[Problem], DeviceSpec | None]:
    """A device spec written in the configuration (``driver.spec``): its sizes bounded, then parsed."""
    allowed = f"an integer from 1 to {MAX_WIDTH}"
    for port in ("input", "output"):
        size = (data.get(port) or {}).get("size") if isinstance(data.get(port), Mapping) else None
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_WIDTH):
            return [Problem(f"{key}.{port}.size", f"out of range: {show(size)}", allowed)], None
    params = data.get("params") or []
    numel = 0
    for j, p in enumerate(params if isinstance(params, list) else []):
        shape = p.get("shape") if isinstance(p, Mapping) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and
                                                  1 <= n <= MAX_WIDTH for n in shape):
            return [Problem(f"{key}.params.{j}.shape", f"not a shape: {show(shape)}",
                            f"a list of integers from 1 to {MAX_WIDTH}")], None
        n = 1
        for d in shape:
            n *= d
        numel += n
    if numel > MAX_PARAMS:
        return [Problem(f"{key}.params", f"{numel} parameter elements in all", f"at most {MAX_PARAMS}")], None
    try:
        return [], DeviceSpec.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        return [Problem(key, f"not a device spec: {what}",
                        "a mapping with name, input {size, low, high}, output {size}, params [{name, shape, low, "
                        "high}]")], None

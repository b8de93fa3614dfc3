"""Ready-made experiments: the paper's tasks as stacks, and one function that runs a method end to end.

A *task* names a dataset and a stack of physical and digital layers. A
*method* is how it is trained:

- ``pat``: physical forward, twin backward (twins calibrated on the devices first);
- ``in_silico``: trained on the twins alone, then run on the devices;
- ``oracle``: physical forward, exact autograd through the simulator (the upper bound).

Test accuracy is always measured on the physical devices.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pnn_cluster.data import Dataset, load_dataset
from pnn_cluster.devices import Imperfections, make_device
from pnn_cluster.devices.simulated import SimulatedDevice
from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
from pnn_cluster.training.trainer import Callback, Executor, TrainConfig, Trainer
from pnn_cluster.twins import build_twin, calibrate, collect, evaluate_twin

__all__ = ["TaskSpec", "TASKS", "build_devices", "build_stack", "init_rescales_", "calibrate_stack",
           "run_method", "MethodResult", "default_vowels_path"]

METHODS = ("oracle", "pat", "in_silico")


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a task: a physical device (``system`` with options) or a digital layer."""

    kind: str  # "physical", "linear", "affine", "rescale"
    system: str = ""
    options: tuple[tuple[str, Any], ...] = ()
    size: int = 0

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)


def physical(system: str, **options: Any) -> LayerSpec:
    return LayerSpec("physical", system, tuple(sorted(options.items())))


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: str
    layers: tuple[LayerSpec, ...]
    train: TrainConfig
    quick_train: TrainConfig
    calib_groups: int = 24
    quick_calib_groups: int = 12
    #: spread of the data-dependent rescale initialisation (see init_rescales_)
    spread: float = 0.3
    quick_subset: tuple[int, int] | None = None
    doc: str = ""


TASKS: dict[str, TaskSpec] = {
    "hybrid_mnist": TaskSpec(
        name="hybrid_mnist", dataset="mnist5k",
        doc="digital linear 784->24, SHG optics 24->24, digital rescale, analog circuit 24->24, digital linear "
            "readout 24->10",
        layers=(LayerSpec("linear", size=24), LayerSpec("rescale"), physical("shg", n_in=24, n_out=24),
                LayerSpec("rescale"), physical("circuit", n_in=24, n_out=24), LayerSpec("linear", size=10)),
        # 12 epochs: with a poor twin PAT converges more slowly than the oracle, but to the same place
        train=TrainConfig(epochs=12, batch_size=64, lr=0.01),
        quick_train=TrainConfig(epochs=3, batch_size=64, lr=0.01),
        quick_subset=(2000, 500),
    ),
    "shg_vowels": TaskSpec(
        name="shg_vowels", dataset="vowels",
        doc="three SHG layers with digital element-wise rescaling between (the paper's optical PNN)",
        spread=1.5,
        # every pulse-shaper pixel carries data (n_pixels = n_in): pixels that carry only parameters
        # make the spectrum depend less on the data and the network trains far worse
        layers=(LayerSpec("rescale"), physical("shg", n_in=12, n_out=12, n_pixels=12), LayerSpec("rescale"),
                physical("shg", n_in=12, n_out=12, n_pixels=12), LayerSpec("rescale"),
                physical("shg", n_in=12, n_out=7, n_pixels=14), LayerSpec("affine")),
        train=TrainConfig(epochs=120, batch_size=10, lr=0.02),
        quick_train=TrainConfig(epochs=50, batch_size=10, lr=0.02),
    ),
    "plate_mnist": TaskSpec(
        name="plate_mnist", dataset="mnist5k",
        doc="digital linear 784->16, oscillating plate 16->10, digital affine",
        layers=(LayerSpec("linear", size=16), LayerSpec("rescale"), physical("plate", n_in=16, n_out=10),
                LayerSpec("affine")),
        train=TrainConfig(epochs=5, batch_size=64, lr=0.01),
        quick_train=TrainConfig(epochs=2, batch_size=64, lr=0.01),
        quick_subset=(2000, 500),
    ),
    "circuit_mnist": TaskSpec(
        name="circuit_mnist", dataset="mnist5k",
        doc="digital linear 784->16, analog circuit 16->10, digital affine",
        layers=(LayerSpec("linear", size=16), LayerSpec("rescale"), physical("circuit", n_in=16, n_out=10),
                LayerSpec("affine")),
        train=TrainConfig(epochs=5, batch_size=64, lr=0.01),
        quick_train=TrainConfig(epochs=2, batch_size=64, lr=0.01),
        quick_subset=(2000, 500),
    ),
}


def default_vowels_path() -> Path | None:
    """The vowel CSV from ``PNN_VOWELS_CSV`` or the repository's ``../shared/data``, if present."""
    env = os.environ.get("PNN_VOWELS_CSV")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2] / "shared" / "data" / "vowels_hillenbrand_7class.csv"
    return here if here.is_file() else None


def task_dataset(task: TaskSpec, quick: bool = False, data_path: str | os.PathLike | None = None) -> Dataset:
    if task.dataset == "vowels":
        path = data_path or default_vowels_path()
        if path is None:
            raise FileNotFoundError("task shg_vowels needs the vowel CSV: pass --data PATH or set PNN_VOWELS_CSV")
        data = load_dataset("vowels", path)
    else:
        data = load_dataset(task.dataset, data_path)
    if quick and task.quick_subset:
        data = data.subset(*task.quick_subset)
    return data


def build_devices(task: TaskSpec, imperfections: Imperfections | None = None, gap: float | None = None,
                  seed: int = 0) -> list[SimulatedDevice]:
    """One simulated device per physical layer, each a distinct physical copy (its own seed)."""
    devices = []
    for i, ls in enumerate(l for l in task.layers if l.kind == "physical"):
        factory_default = make_device(ls.system, **ls.opts).imperfections
        imp = imperfections or factory_default
        imp = imp.with_(seed=seed * 100 + i)
        if gap is not None:
            imp = imp.with_(gap=gap)
        devices.append(make_device(ls.system, imperfections=imp, **ls.opts))
    return devices


def build_stack(task: TaskSpec, devices: Sequence[SimulatedDevice], n_features: int, seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    it = iter(devices)
    width = n_features
    for i, ls in enumerate(task.layers):
        if ls.kind == "physical":
            dev = next(it)
            if width != dev.spec.input.size:
                raise ValueError(f"task {task.name}: layer {i} gives {width} values, {dev.spec.name} takes "
                                 f"{dev.spec.input.size}")
            layers.append(PhysicalLayer(dev, name=f"{dev.spec.name}{i}"))
            width = dev.spec.output.size
        elif ls.kind == "linear":
            layers.append(nn.Linear(width, ls.size))
            width = ls.size
        elif ls.kind == "affine":
            layers.append(Affine(width))
        elif ls.kind == "rescale":
            nxt = next(l for l in task.layers[i + 1:] if l.kind == "physical")
            port = make_device(nxt.system, **nxt.opts).spec.input
            layers.append(Rescale(width, port.low, port.high, margin=0.02))
        else:
            raise ValueError(f"task {task.name}: unknown layer kind {ls.kind!r}")
    return Stack(*layers)


@torch.no_grad()
def init_rescales_(stack: Stack, x: torch.Tensor, spread: float = 1.5, logit_scale: float = 3.0) -> None:
    """Data-dependent initialisation: each rescale sees standardised inputs, the final affine sane logits.

    Runs ``x`` through the stack once (physical layers measured on their devices).
    """
    h = x
    mods = list(stack)
    for i, m in enumerate(mods):
        if isinstance(m, Rescale):
            mu, sd = h.mean(0), h.std(0).clamp_min(1e-6)
            m.weight.copy_(spread / sd)
            m.bias.copy_(-mu * spread / sd)
        elif isinstance(m, Affine) and i == len(mods) - 1:
            mu, sd = h.mean(0), h.std(0).clamp_min(1e-6)
            m.weight.copy_(logit_scale / sd)
            m.bias.copy_(-mu * logit_scale / sd)
        h = m(h)


def _layer_inputs(stack: Stack, x: torch.Tensor) -> dict[int, np.ndarray]:
    """Inputs each physical layer sees for ``x`` (measured on the devices)."""
    seen, h = {}, x
    with torch.no_grad(), stack.mode_as("pat"):
        for i, m in enumerate(stack):
            if isinstance(m, PhysicalLayer):
                seen[i] = h.numpy().astype(np.float64)
            h = m(h)
    return seen


def calibrate_stack(stack: Stack, kind: str = "physics", groups: int = 40, batch: int = 128, seed: int = 0,
                    progress: bool = False, fit_overrides: dict | None = None) -> dict[str, dict[str, Any]]:
    """Fit a twin for every physical layer and install it; returns each layer's calibration figures."""
    report = {}
    for j, layer in enumerate(stack.physical_layers()):
        cal = calibrate(layer.device, kinds=(kind,), groups=groups, batch=batch, seed=seed + j,
                        progress=progress, fit_overrides=fit_overrides)
        layer.twin = cal.twins[kind]
        layer._sent = None  # calibration wrote other parameters; write ours again before measuring
        r = cal.results[kind]
        report[layer.name] = {"nmse": r.nmse_val, "noise_floor": r.noise_floor, "ideal_nmse": cal.ideal_nmse,
                              "device_samples": cal.device_samples}
    return report


def ideal_twins(stack: Stack, groups: int = 8, batch: int = 64, seed: int = 0) -> dict[str, float]:
    """Install each device's uncalibrated ideal model as its twin; returns the measured twin NMSE per layer."""
    out = {}
    for j, layer in enumerate(stack.physical_layers()):
        twin = build_twin("physics", layer.spec, layer.device.model())
        twin.requires_grad_(False)
        s = collect(layer.device, groups=groups, batch=batch, repeats=1, seed=1000 + seed + j, progress=False)
        out[layer.name] = evaluate_twin(twin, s)
        layer.twin = twin
        layer._sent = None
    return out


@dataclass
class MethodResult:
    task: str
    method: str
    test_acc: float
    device_samples: int
    seconds: float
    twin_nmse: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"test_acc": self.test_acc, "device_samples": self.device_samples, "seconds": self.seconds}


def run_method(task: str | TaskSpec, method: str, quick: bool = False, seed: int = 0, gap: float | None = None,
               twin: str = "physics", data: Dataset | None = None, data_path: str | None = None,
               callbacks: Sequence[Callback] = (), executor: Executor | None = None,
               train_config: TrainConfig | None = None, progress: bool = False,
               devices: Sequence[SimulatedDevice] | None = None,
               on_trainer: Callable[[Trainer], None] | None = None) -> MethodResult:
    """Build the task's devices and stack, prepare twins for ``method``, train, test on the devices.

    ``twin="physics"`` (or "residual", "mlp") calibrates twins on the devices;
    ``twin="ideal"`` uses the uncalibrated ideal model (the sweep's twin that
    does not learn the gap).
    """
    spec = TASKS[task] if isinstance(task, str) else task
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    t0 = time.perf_counter()
    data = data or task_dataset(spec, quick=quick, data_path=data_path)
    devices = list(devices) if devices is not None else build_devices(spec, gap=gap, seed=seed)
    stack = build_stack(spec, devices, data.n_features, seed=seed)
    calib: dict[str, Any] = {}
    twin_nmse = None
    calib_samples = 0
    if method != "oracle":
        if twin == "ideal":
            per = ideal_twins(stack, seed=seed)
            calib = {"ideal_twin_nmse": per}
            twin_nmse = float(np.mean(list(per.values())))
        else:
            groups = spec.quick_calib_groups if quick else spec.calib_groups
            calib = calibrate_stack(stack, kind=twin, groups=groups, seed=seed, progress=progress)
            twin_nmse = float(np.mean([c["nmse"] for c in calib.values()]))
            calib_samples = sum(c["device_samples"] for c in calib.values())
    stack.set_mode("pat" if method == "pat" else method)
    xs = torch.as_tensor(data.x_train[:512], dtype=torch.get_default_dtype())
    before = stack.samples_measured()
    with stack.mode_as("in_silico" if method == "in_silico" else "pat"):
        init_rescales_(stack, xs, spread=spec.spread)
    init_samples = stack.samples_measured() - before
    cfg = train_config or (spec.quick_train if quick else spec.train)
    cfg = TrainConfig(**{**cfg.__dict__, "seed": seed})
    trainer = Trainer(stack, data, cfg, callbacks=callbacks, executor=executor, progress=progress)
    if on_trainer is not None:
        on_trainer(trainer)
    trainer.fit()
    if method == "in_silico" or not trainer.history:
        acc = trainer.evaluate("test")["acc"]
    else:
        acc = trainer.history[-1]["test_acc"]
    used = trainer.device_samples + calib_samples + init_samples
    return MethodResult(spec.name, method, acc, int(used), time.perf_counter() - t0, twin_nmse,
                        trainer.history, calib)

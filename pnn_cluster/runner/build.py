"""From a validated configuration to the engine's objects: device recipes, the dataset, the stack.

A :class:`DeviceRecipe` is everything needed to build one device replica, and
nothing that cannot travel: the driver section of the configuration, the
replica's seed and its placement. Whoever owns the device (a device actor on
the lab PC, or this process) builds it from the recipe and connects it there;
the spec of a device that learns it on connect is read only after that.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pnn_cluster.config import ConfigError, ExperimentConfig, PlacementConfig, Problem
from pnn_cluster.devices import Imperfections, make_device
from pnn_cluster.devices.base import Device
from pnn_cluster.devices.spec import DeviceSpec

__all__ = ["DeviceRecipe", "device_recipes", "build_stack", "load_data", "train_config", "default_vowels_path"]


@dataclass(frozen=True)
class DeviceRecipe:
    """How to build one replica of one device, in the process that will own it.

    name: the device's name in the configuration (its layer's name).
    replica: 0 for the device itself, 1.. for further copies or pool members.
    driver: the configuration's driver section (simulated, visa, zmq or python).
    seed: the simulated copy's seed (each copy has its own imperfections).
    placement: where its actor runs.
    timeout_s: the longest one call may take.
    """

    name: str
    replica: int
    driver: Any
    seed: int = 0
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    timeout_s: float = 60.0

    @property
    def label(self) -> str:
        """How logs, pools and errors call this replica: ``optics``, ``optics/1``..."""
        return self.name if self.replica == 0 else f"{self.name}/{self.replica}"

    @property
    def kind(self) -> str:
        return self.driver.kind

    def build(self) -> Device:
        """Construct the device (no I/O: constructors never open connections)."""
        drv = self.driver
        if drv.kind == "simulated":
            base = make_device(drv.system, **drv.options).imperfections
            imp = Imperfections.ideal() if drv.imperfections.ideal else base
            imp = imp.with_(**drv.imperfections.overrides()).with_(seed=self.seed)
            return make_device(drv.system, imperfections=imp, **drv.options)
        if drv.kind == "python":
            from pnn_cluster.devices import make_user_device

            return make_user_device(drv.class_, drv.options)
        model = make_device(drv.model.system, **drv.model.options).model() if drv.model else None
        spec = DeviceSpec.from_dict(drv.spec) if drv.spec else None
        if drv.kind == "zmq":
            from pnn_cluster.drivers.zmq_client import ClientCurve, ZmqDevice

            curve = ClientCurve(Path(drv.curve.secret_key_file), Path(drv.curve.server_public_key_file)) \
                if drv.curve else None
            return ZmqDevice(drv.address, spec, timeout_s=drv.timeout_s, retries=drv.retries, curve=curve,
                             model=model)
        from pnn_cluster.drivers.visa import VisaDevice

        return VisaDevice.from_config({"source": drv.source.model_dump(), "sink": drv.sink.model_dump(),
                                       "backend": drv.backend, "spec": drv.spec}, model=model)

    def driver_summary(self) -> dict[str, Any]:
        return self.driver.model_dump(mode="json", by_alias=True)


def device_recipes(cfg: ExperimentConfig) -> dict[str, list[DeviceRecipe]]:
    """Every replica of every device, in stack order.

    A simulated copy's seed is its driver's ``seed`` (or ``seed * 100 + its layer's index``) plus
    ``1000 * replica``: each physical copy has imperfections of its own, the same in every run.
    """
    out: dict[str, list[DeviceRecipe]] = {}
    for index, name in enumerate(cfg.physical_devices()):
        dev = cfg.devices[name]
        members = [(dev.driver, dev.placement)] * dev.replicas + [(m.driver, m.placement) for m in dev.pool]
        recipes = []
        for r, (drv, place) in enumerate(members):
            base = drv.seed if getattr(drv, "seed", None) is not None else cfg.seed * 100 + index
            recipes.append(DeviceRecipe(name, r, drv, seed=base + 1000 * r, placement=place, timeout_s=dev.timeout_s))
        out[name] = recipes
    return out


def build_stack(cfg: ExperimentConfig, devices: Mapping[str, Device], n_features: int):
    """The stack of ``cfg`` on ``devices`` (one per physical layer); widths are checked against each spec.

    For the digital methods every physical layer becomes a stand-in of its device's shape, initialised
    alike around it: ``ablation`` a fixed random orthogonal map (:class:`~pnn_cluster.layers.FixedMap`),
    ``digital`` the same map plus a trainable MLP with as many parameters as the device has settings
    (:class:`~pnn_cluster.layers.DigitalStandIn`).
    """
    import numpy as np
    import torch
    from torch import nn

    from pnn_cluster.layers import Affine, PhysicalLayer, Pool, Rescale, Stack
    from pnn_cluster.runner.methods import method_for

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # parameters initialised "uniform" break symmetry the same every run
    method = method_for(cfg.method)
    layers: list[nn.Module] = []
    width = n_features
    for i, l in enumerate(cfg.stack):
        if l.kind == "physical":
            dev = devices[l.device]
            n_in = dev.spec.input.size
            if width != n_in:
                raise ConfigError(cfg.source, [Problem(f"stack.{i}", f"device {l.device!r} takes {n_in} inputs but "
                                                       f"the layers before it give {width}",
                                                       f"a linear layer of size {n_in} before it, or n_in: {width}")])
            n_out = dev.spec.output.size
            if method.digital:
                layers.append(method.stand_in(dev.spec, name=l.device, seed=cfg.seed * 100 + i))
            else:
                layers.append(PhysicalLayer(dev, name=l.device, rng=rng))  # a layer is named after its device
            width = n_out
        elif l.kind == "linear":
            layers.append(nn.Linear(width, int(l.size)))
            width = int(l.size)
        elif l.kind == "pool":
            try:
                layers.append(Pool(width, int(l.size)))
            except ValueError as exc:
                raise ConfigError(cfg.source, [Problem(f"stack.{i}.size", str(exc),
                                                       "a pool layer right after a square image's features")]) from None
            width = int(l.size) ** 2
        elif l.kind == "affine":
            layers.append(Affine(width))
        else:  # rescale into the input range of the next physical layer
            port = devices[next(x for x in cfg.stack[i + 1:] if x.kind == "physical").device].spec.input
            layers.append(Rescale(width, port.low, port.high, margin=0.02))
    return Stack(*layers)


def default_vowels_path() -> Path | None:
    """The vowel CSV from ``PNN_VOWELS_CSV`` or the repository's ``../shared/data``, if present."""
    env = os.environ.get("PNN_VOWELS_CSV")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[3] / "shared" / "data" / "vowels_hillenbrand_7class.csv"
    return here if here.is_file() else None


def load_data(cfg: ExperimentConfig):
    from pnn_cluster.data import load_dataset

    ds = cfg.dataset
    path = ds.path
    if ds.name == "vowels" and path is None:
        found = default_vowels_path()
        if found is None:
            raise ConfigError(cfg.source, [Problem("dataset.path", "the vowel dataset needs its CSV file",
                                                   "a path to vowels_hillenbrand_7class.csv, or PNN_VOWELS_CSV")])
        path = str(found)
    if ds.name == "npz" and path is None:
        raise ConfigError(cfg.source, [Problem("dataset.path", "dataset 'npz' reads a file", "a path to an .npz")])
    if ds.name == "idx" and path is None:
        raise ConfigError(cfg.source, [Problem("dataset.path", "dataset 'idx' reads the four IDX files of a "
                                               "directory", "a path to the directory holding train-images-idx3-ubyte, "
                                               "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                                               "t10k-labels-idx1-ubyte (each optionally .gz)")])
    data = load_dataset(ds.name, path, seed=ds.split_seed) if ds.name in ("vowels", "npz", "idx") else \
        load_dataset(ds.name, seed=ds.split_seed)
    if ds.folds:
        # k-fold cross-validation: train and test pooled, fold ds.fold is the test split; before the subset
        # and the validation split, which are then taken from this fold's train part
        n = len(data.y_train) + len(data.y_test)
        if ds.folds > n:
            raise ConfigError(cfg.source, [Problem("dataset.folds", f"{ds.folds} folds of {n} rows",
                                                   f"0 or an integer from 2 to {n}")])
        data = data.fold(ds.folds, ds.fold, seed=ds.split_seed)
    if ds.train_subset or ds.test_subset:
        data = data.subset(ds.train_subset, ds.test_subset, seed=ds.split_seed)
    # after the subset: a quick run selects on a validation split of its own smaller train split
    return data.with_validation(ds.val_fraction, seed=ds.split_seed)


def train_config(cfg: ExperimentConfig):
    from pnn_cluster.training.trainer import TrainConfig

    s, o = cfg.schedule, cfg.optimizer
    return TrainConfig(epochs=s.epochs, batch_size=s.batch_size, micro_batch=s.micro_batch, lr=o.lr,
                       optimizer=o.name, weight_decay=o.weight_decay, lr_schedule=s.lr_schedule,
                       eval_batch=s.eval_batch, seed=cfg.seed)

"""Typed experiment configurations: one YAML file describes a whole experiment.

A configuration names the dataset, the devices (each with its driver, its
placement on the cluster and how its twin is made), the stack of physical and
digital layers, the optimizer, the schedule and the tracking. It is validated
when it is loaded; every mistake is reported as::

    FILE: KEY: message (allowed: ...)

naming the file and the dotted key (``devices.optics.driver.system``,
``stack.2.size``), the value that was refused and what would be accepted.

Every number has bounds, so a typo cannot ask for more than a machine has:
seeds are integers in 0..2**32-1 (:data:`MAX_SEED`; derived seeds stay far
below the 2**64 torch and NumPy take); widths (linear layer sizes, twin hidden
widths, simulated systems' size options, ports of a declared device spec) are
1..65536 (:data:`MAX_WIDTH`); batch sizes 1..1,000,000 (:data:`MAX_BATCH`,
what a device spec takes in one call); epochs 1..100,000; floats are finite.
A simulated system's ``options`` are checked against its ``build_spec``
signature (names, integer sizes, ranges) before it is built. Then the largest
allocations the sizes imply together (a linear layer's weights and optimizer
state, a batch's activations, a twin's calibration samples and hidden layers)
are estimated and a configuration whose estimate exceeds this machine's
memory (:func:`machine_memory`) is refused, naming the key to reduce.

This module is the schema and its loader only: :mod:`pnn_cluster.runner`
turns a loaded :class:`ExperimentConfig` into devices, twins and a stack and
runs it, in this process or on Ray.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from pnn_cluster.devices import SYSTEMS, DeviceSpec, LimitError, make_device
from pnn_cluster.devices.simulated import MAX_SIZE, MAX_STEP_SAMPLES, MAX_STEP_SIZE
from pnn_cluster.training.recalibration import Recalibration

__all__ = [
    "ConfigError", "Problem", "ExperimentConfig", "DeviceConfig", "LayerConfig", "SimulatedDriver", "VisaDriver",
    "ZmqDriver", "PythonDriver", "TwinConfig", "PlacementConfig", "TwinPlacement", "TrainerPlacement",
    "load_config", "parse_config", "example_configs", "example_config_path", "flatten", "METHODS",
    "MAX_SEED", "MAX_WIDTH", "MAX_BATCH", "MAX_EPOCHS", "machine_memory", "system_option_problems",
]

SYSTEM_NAMES = tuple(sorted(SYSTEMS))
IMPERFECTION_KEYS = ("noise", "shot", "gap", "drift", "steps", "unmodelled", "quant_bits", "latency_call_s",
                     "latency_sample_s")


# -- errors --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    allowed: str = ""

    def format(self, source: str) -> str:
        where = f"{source}: {self.key}" if self.key else source
        return f"{where}: {self.message}" + (f" (allowed: {self.allowed})" if self.allowed else "")


class ConfigError(ValueError):
    """A configuration was refused; ``problems`` lists every mistake found, each with its key."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(p.format(source) for p in self.problems))

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.problems]


def _custom(message: str, allowed: str = "") -> PydanticCustomError:
    # our own validators speak in the same terms as the built-in ones: a message and what is allowed
    return PydanticCustomError("config", "{message}", {"message": message, "allowed": allowed})


def _near(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# -- sections ----------------------------------------------------------------------------------------------


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


#: seeds: what ``np.random.seed`` takes, and ``seed * 100 + layer + 1000 * replica`` stays far below 2**63
MAX_SEED = 2**32 - 1
#: the widest layer, twin hidden layer or device port (a simulated system's size options share the cap)
MAX_WIDTH = MAX_SIZE
#: the largest batch: what a device spec takes in one call by default (``DeviceSpec.max_batch``)
MAX_BATCH = 1_000_000
MAX_EPOCHS = 100_000
#: a declared device's parameters, all elements together (an SLM of 4096 x 4096 pixels)
MAX_PARAMS = 2**24

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]
Resource = Annotated[float, Field(gt=0.0, le=1e12)]


class StepChange(Section):
    """A step change of a simulated device: at ``at_samples`` measured samples every calibration constant jumps
    by ``size`` of its natural spread times a standard normal draw (a bumped fibre, a re-seated cable)."""

    at_samples: Annotated[int, Field(ge=0, le=MAX_STEP_SAMPLES)]
    size: Annotated[float, Field(ge=0.0, le=MAX_STEP_SIZE)]


class ImperfectionsConfig(Section):
    """Overrides of a simulated system's imperfections (defaults are the system's own)."""

    noise: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    shot: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    gap: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    drift: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    steps: Annotated[list[StepChange], Field(max_length=1000)] | None = None
    unmodelled: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    quant_bits: Annotated[int, Field(ge=2, le=24)] | None = None
    latency_call_s: Annotated[float, Field(ge=0.0, le=60.0)] | None = None
    latency_sample_s: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    ideal: bool = False

    def overrides(self) -> dict[str, Any]:
        """The keys given, as :class:`~pnn_cluster.devices.Imperfections` takes them."""
        out = {k: getattr(self, k) for k in IMPERFECTION_KEYS if getattr(self, k) is not None}
        if "steps" in out:
            out["steps"] = tuple((s.at_samples, s.size) for s in out["steps"])
        return out


def _system_class(system: str) -> type:
    return type(make_device(system))


def _system_options(system: str) -> tuple[str, ...]:
    """Size options a simulated system's ``build_spec`` takes (its signature is the source of truth)."""
    return tuple(_system_class(system).option_types())


def _check_system(v: str) -> str:
    if v not in SYSTEMS:
        raise _custom(f"unknown system {v!r}{_near(v, SYSTEM_NAMES)}", ", ".join(SYSTEM_NAMES))
    return v


class SimulatedDriver(Section):
    """A simulated physical system in this process (or in a device actor)."""

    kind: Literal["simulated"]
    system: str
    options: dict[str, int | float | str | bool] = Field(default_factory=dict)
    imperfections: ImperfectionsConfig = Field(default_factory=ImperfectionsConfig)
    seed: Seed | None = None

    @field_validator("system")
    @classmethod
    def _system(cls, v: str) -> str:
        return _check_system(v)


class InstrumentConfig(Section):
    """One SCPI instrument: driver name, VISA resource string, timeout and settings applied on open."""

    driver: str
    resource: Annotated[str, Field(min_length=1)]
    timeout_s: Annotated[float, Field(gt=0.0, le=600.0)] = 5.0
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("driver")
    @classmethod
    def _known_driver(cls, v: str) -> str:
        from pnn_cluster.drivers.visa import DRIVERS

        if v not in DRIVERS:
            raise _custom(f"unknown instrument driver {v!r}{_near(v, sorted(DRIVERS))}", ", ".join(sorted(DRIVERS)))
        return v


class ModelRef(Section):
    """The simulated system whose ideal physics model a real device's twin starts from."""

    system: str
    options: dict[str, int | float | str | bool] = Field(default_factory=dict)

    @field_validator("system")
    @classmethod
    def _system(cls, v: str) -> str:
        return _check_system(v)


class VisaDriver(Section):
    """A device made of a source and a sink instrument reached through pyvisa."""

    kind: Literal["visa"]
    source: InstrumentConfig
    sink: InstrumentConfig
    backend: str = "@py"
    spec: dict[str, Any] | None = None
    model: ModelRef | None = None


_ZMQ_ADDRESS = re.compile(r"^(tcp://[^:/\s]+:\d{1,5}|ipc://\S+|inproc://\S+)$")


class CurveConfig(Section):
    """The client's CURVE key files. They are read where the device's connection is opened (the device
    actor's node, which may not be the machine that loads the configuration): ``~`` stays as written and
    is expanded there, a relative path is taken relative to the configuration file, and a missing file is
    reported when connecting, naming the file."""

    secret_key_file: Annotated[str, Field(min_length=1)]
    server_public_key_file: Annotated[str, Field(min_length=1)]

    @field_validator("secret_key_file", "server_public_key_file")
    @classmethod
    def _path(cls, v: str, info: ValidationInfo) -> str:
        return v if v.startswith("~") or Path(v).is_absolute() else str(_resolve(v, info))


class ZmqDriver(Section):
    """A device served by ``pnn-cluster serve-device`` on another machine."""

    kind: Literal["zmq"]
    address: str
    timeout_s: Annotated[float, Field(gt=0.0, le=600.0)] = 5.0
    retries: Annotated[int, Field(ge=0, le=100)] = 2
    curve: CurveConfig | None = None
    spec: dict[str, Any] | None = None
    model: ModelRef | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not _ZMQ_ADDRESS.match(v):
            raise _custom(f"not a ZeroMQ endpoint: {v!r}", "tcp://HOST:PORT, ipc://PATH")
        return v


_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_CLASS_PATH = re.compile(rf"^{_NAME}(\.{_NAME})*:{_NAME}(\.{_NAME})*$")  # package.module:Class(.Nested)


class PythonDriver(Section):
    """A user's own :class:`~pnn_cluster.devices.Device` class, built in its device actor.

    ``class: "package.module:ClassName"`` is imported where the device actor runs (the lab PC that
    declared the instrument), so the module must be importable there: installed on that PC, or sent
    with the job (``ray job submit --working-dir`` / ``runtime_env.py_modules``). ``options`` are
    the constructor's keyword arguments.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True, allow_inf_nan=False)

    kind: Literal["python"]
    class_: str = Field(alias="class")
    options: dict[str, Any] = Field(default_factory=dict)
    model: ModelRef | None = None

    @field_validator("class_")
    @classmethod
    def _class_path(cls, v: str) -> str:
        if not _CLASS_PATH.match(v):
            raise _custom(f"not a class path: {v!r}", "package.module:ClassName")
        return v


Driver = Annotated[SimulatedDriver | VisaDriver | ZmqDriver | PythonDriver, Field(discriminator="kind")]
DRIVER_KINDS = ("simulated", "visa", "zmq", "python")
TWIN_CHOICES = ("physics", "residual", "mlp", "ideal", "best")


class TwinConfig(Section):
    """How a device's digital twin is made: fitted to fresh measurements, the ideal model, or loaded."""

    kind: Literal["physics", "residual", "mlp", "ideal", "best"] = "physics"
    groups: Annotated[int, Field(ge=3, le=100_000)] = 24
    batch: BatchSize = 128
    repeats: Annotated[int, Field(ge=2, le=100)] = 2
    holdout: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    epochs: Annotated[int, Field(ge=0, le=MAX_EPOCHS)] | None = None
    lr: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    hidden: Annotated[list[Width], Field(max_length=32)] | None = None
    load: str | None = None

    @field_validator("load")
    @classmethod
    def _load_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        # a saved twin is NAME.pt (tensors and metadata; NAME.json beside it is a readable copy, and holds
        # the metadata of a twin saved in format 1, which loading checks)
        stem = v.removesuffix(".pt").removesuffix(".json")
        _existing_file(stem + ".pt", info)
        return str(_resolve(stem, info))


class TwinPlacement(Section):
    """The twin actors of each replica of a device: how many copies share its backward passes, and on what.

    ``actors: 2`` runs two copies of the twin, so two micro-batches' vector-Jacobian products run at
    once; ``num_gpus: 0.25`` puts them on GPU workers (a fraction lets several twins share one GPU).
    """

    actors: Annotated[int, Field(ge=1, le=64)] = 1
    num_cpus: Annotated[float, Field(ge=0.0, le=256.0)] = 0.0
    num_gpus: Annotated[float, Field(ge=0.0, le=64.0)] = 0.0


class PlacementConfig(Section):
    """Where the device's actor runs: on the lab PC that declared its instrument when it joined the cluster.

    ``instrument: shg-bench`` asks for the custom resource ``instrument:shg-bench`` (one unit: one
    connection), which the PC declares with ``ray start --address HEAD:6379 --resources
    '{"instrument:shg-bench": 1}'``. ``labels`` adds node-label constraints (``ray start --labels
    key=value``); ``resources`` any further custom resources. All empty: anywhere (the local default).
    ``twins`` places the device's twin actors.
    """

    instrument: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    resources: dict[str, Resource] = Field(default_factory=dict)
    twins: TwinPlacement = Field(default_factory=TwinPlacement)

    def ray_resources(self) -> dict[str, float]:
        out = dict(self.resources)
        if self.instrument:
            out[f"instrument:{self.instrument}"] = 1.0
        return out


class PoolMember(Section):
    """One more instrument of the same kind serving a device's layer (a replica of hardware)."""

    driver: Driver
    placement: PlacementConfig = Field(default_factory=PlacementConfig)


_RECAL = Recalibration()


class RecalibrationConfig(Section):
    """What the device's twin watch does during training (see :mod:`pnn_cluster.training.recalibration`).

    ``policy``: ``none`` (not watched), ``monitor`` (the twin's error over the noise floor logged each step,
    a drift reported), ``refine`` (refined online from what training measures, swapped in at a step boundary)
    or ``pause`` (the device recalibrated in full, training waiting). The rest tune the detector and the
    refinement; the defaults suit a device measured thousands of times per step.
    """

    policy: Literal["none", "monitor", "refine", "pause"] = _RECAL.policy
    arl0: Annotated[float, Field(ge=10.0, le=1e12)] = _RECAL.arl0
    rise: Annotated[float, Field(ge=1.01, le=100.0)] = _RECAL.rise
    warmup: Annotated[int, Field(ge=5, le=100_000)] = _RECAL.warmup
    buffer_rows: Annotated[int, Field(ge=1, le=10**8)] = _RECAL.buffer_rows
    half_life_steps: Annotated[float, Field(gt=0.0, le=1e9)] = _RECAL.half_life_steps
    explore_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = _RECAL.explore_fraction
    explore_groups: Annotated[int, Field(ge=0, le=10_000)] = _RECAL.explore_groups
    explore_spread: Annotated[float, Field(ge=0.0, le=1.0)] = _RECAL.explore_spread
    epochs: Annotated[int, Field(ge=1, le=100_000)] = _RECAL.epochs

    def settings(self) -> Recalibration:
        return Recalibration(**self.model_dump())


class DeviceConfig(Section):
    """One physical device of the stack.

    replicas: physical copies of a simulated or ``python`` device, each in its own device actor with its
        own twin; micro-batches go to whichever copy is free.
    pool: for hardware, the further instruments of one kind that serve this layer as replicas, each with
        its own driver and placement (the device's own driver is the first replica).
    timeout_s: the longest one call to the device (a measurement of one micro-batch, a parameter write)
        may take; a call that takes longer counts as a device failure (retried, then a clear error).
    recalibration: how its twin is watched for drift during training, and what a drift sets off.
    """

    driver: Driver
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    twin: TwinConfig = Field(default_factory=TwinConfig)
    replicas: Annotated[int, Field(ge=1, le=1024)] = 1
    pool: list[PoolMember] = Field(default_factory=list)
    timeout_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 60.0
    recalibration: RecalibrationConfig = Field(default_factory=RecalibrationConfig)

    @property
    def n_replicas(self) -> int:
        return self.replicas + len(self.pool)


LAYER_KINDS = ("linear", "rescale", "physical", "affine", "pool")


class LayerConfig(Section):
    """One layer: ``{kind: linear, size: 24}``, ``{kind: rescale}``, ``{kind: physical, device: NAME}``,
    ``{kind: affine}``, ``{kind: pool, size: 7}`` (square images averaged down to 7 x 7, fixed)."""

    kind: Literal["linear", "rescale", "physical", "affine", "pool"]
    size: Width | None = None
    device: str | None = None


DATASET_NAMES = ("mnist5k", "digits", "vowels", "npz", "idx")
#: the most cross-validation folds (leave-one-out of a dataset of this many rows)
MAX_FOLDS = 10_000


class DatasetConfig(Section):
    """The data: ``path`` is the vowels CSV, the ``.npz`` file, or the directory of MNIST/Fashion-MNIST IDX
    files (``idx``). ``train_subset``/``test_subset`` make a smaller run; then ``val_fraction`` of the
    (subset's) train split becomes the validation split that per-epoch accuracy is measured on (0: none).
    The test split is measured once, after training.

    ``folds``: 0 keeps the dataset's own train/test split; ``k >= 2`` pools train and test and runs fold
    ``fold`` (0..k-1) of a class-stratified k-fold cross-validation drawn from ``split_seed`` (repeats:
    other ``split_seed`` values). The fold is taken first, then the subset, then the validation split
    (carved from the fold's train part)."""

    name: Literal["mnist5k", "digits", "vowels", "npz", "idx"]
    path: str | None = None
    train_subset: Annotated[int, Field(ge=1, le=100_000_000)] | None = None
    test_subset: Annotated[int, Field(ge=1, le=100_000_000)] | None = None
    val_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    split_seed: Seed = 0
    folds: Annotated[int, Field(ge=0, le=MAX_FOLDS)] = 0
    fold: Annotated[int, Field(ge=0, le=MAX_FOLDS - 1)] = 0

    @field_validator("folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        if v == 1:
            raise _custom("folds 1 is not a cross-validation (one fold leaves nothing to train on)",
                          f"0 (the dataset's own split) or an integer from 2 to {MAX_FOLDS}")
        return v

    @field_validator("fold")
    @classmethod
    def _fold(cls, v: int, info: ValidationInfo) -> int:
        folds = info.data.get("folds")
        if folds is None:  # folds itself was refused, and is reported
            return v
        if folds == 0 and v != 0:
            raise _custom(f"fold {v} without folds (folds 0 keeps the dataset's own split)",
                          "0, or set folds to 2 or more")
        if folds and v >= folds:
            raise _custom(f"fold {v} is not one of the {folds} folds", f"an integer from 0 to {folds - 1}")
        return v

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        if info.data.get("name") == "idx":
            return str(_existing_dir(v, info, "the directory holding the IDX files (train-images-idx3-ubyte, ...)"))
        return str(_existing_file(v, info))


class OptimizerConfig(Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 0.01
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


class InitConfig(Section):
    """Data-dependent initialisation: each rescale sees standardised inputs (``init_rescales_``)."""

    spread: Annotated[float, Field(gt=0.0, le=100.0)] = 0.3
    logit_scale: Annotated[float, Field(gt=0.0, le=100.0)] = 3.0
    samples: Annotated[int, Field(ge=2, le=1_000_000)] = 512


class ScheduleConfig(Section):
    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 5
    batch_size: BatchSize = 64
    micro_batch: BatchSize | None = None
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    eval_batch: BatchSize = 500
    #: which weights the test split measures: the last epoch's, or those of the epoch with the best validation
    #: accuracy (measured on the devices each epoch; needs dataset.val_fraction > 0)
    keep: Literal["last", "best"] = "last"


class TrackingConfig(Section):
    """MLflow: the command line's ``--tracking-uri``/``--no-track`` override ``uri``/``enabled``."""

    enabled: bool = True
    uri: str | None = None
    experiment: Annotated[str, Field(min_length=1)] = "pnn-cluster"
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    flush_every_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 10.0
    checkpoint_every: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 1
    residual_batch: Annotated[int, Field(ge=0, le=100_000)] = 256
    log_models: bool = True
    #: where each run's local record (journal, checkpoint, artifacts) is kept; None: PNN_RUNS_DIR, else ./pnn-runs
    runs_dir: str | None = None
    #: the longest the run waits for the server to create it at the start, and for the last uploads at the end
    start_wait_s: Annotated[float, Field(ge=0.0, le=600.0)] = 10.0
    end_wait_s: Annotated[float, Field(ge=0.0, le=600.0)] = 15.0
    #: while the server is away, how often the outbox tries it again
    retry_every_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 15.0


class TrainerPlacement(Section):
    """Where the trainer actor (the model, the optimizer and the loop) runs: next to the devices, on a GPU node..."""

    num_cpus: Annotated[float, Field(ge=0.0, le=256.0)] = 1.0
    num_gpus: Annotated[float, Field(ge=0.0, le=64.0)] = 0.0
    labels: dict[str, str] = Field(default_factory=dict)
    resources: dict[str, Resource] = Field(default_factory=dict)


class ClusterConfig(Section):
    """Ray: ``address`` None starts a local Ray (or joins ``RAY_ADDRESS``); ``auto`` joins the cluster a job
    was submitted to. ``trainer`` places the trainer actor."""

    address: str | None = None
    namespace: str = "pnn-cluster"
    trainer: TrainerPlacement = Field(default_factory=TrainerPlacement)


#: pat: devices forward, twins backward. in_silico: twins both ways, then tested on the devices.
#: oracle: devices forward, exact autograd through the simulator. ablation: every physical layer replaced by a
#: fixed random orthogonal map of its shape, the digital layers trained alone. digital: every physical layer
#: replaced by the same fixed map plus a trainable MLP with as many parameters as the device has settings (a
#: network matched in parameter count).
METHODS = ("pat", "in_silico", "oracle", "ablation", "digital")
#: the methods that train no device: their stacks hold digital stand-ins where the physical layers stood
DIGITAL_METHODS = ("ablation", "digital")


class ReferenceConfig(Section):
    """A published result of the same task, shown beside this one's (``pnn-cluster demo``, the benchmark)."""

    accuracy: Annotated[float, Field(ge=0.0, le=1.0)]
    source: Annotated[str, Field(min_length=1)]


class ExperimentConfig(Section):
    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    reference: ReferenceConfig | None = None
    seed: Seed = 0
    method: Literal["pat", "in_silico", "oracle", "ablation", "digital"] = "pat"
    dataset: DatasetConfig
    devices: dict[str, DeviceConfig] = Field(default_factory=dict)
    stack: Annotated[list[LayerConfig], Field(min_length=1)]
    init: InitConfig = Field(default_factory=InitConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    #: ``KEY: VALUE`` overrides that ``--quick`` applies (a smaller run of the same experiment)
    quick: dict[str, Any] = Field(default_factory=dict)

    _source: str = PrivateAttr(default="<config>")

    @property
    def source(self) -> str:
        return self._source

    # -- cross-field checks (after the types are right) --------------------------------------------

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        names = list(self.devices)
        for name in names:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
                out.append(Problem(f"devices.{name}", "device names are identifiers", "letters, digits, _ and -"))
        used: dict[str, int] = {}
        physical = 0
        for i, layer in enumerate(self.stack):
            key = f"stack.{i}"
            if layer.kind == "physical":
                physical += 1
                if layer.device is None:
                    out.append(Problem(f"{key}.device", "a physical layer names its device", ", ".join(names)))
                elif layer.device not in self.devices:
                    out.append(Problem(f"{key}.device", f"unknown device {layer.device!r}{_near(layer.device, names)}",
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
            if layer.kind == "rescale" and not any(l.kind == "physical" for l in self.stack[i + 1:]):
                out.append(Problem(f"{key}.kind", "a rescale maps into the input range of a following physical layer; "
                                   "none follows", "linear, affine"))
        if physical == 0:
            out.append(Problem("stack", "no physical layer: nothing would be trained on a device",
                               "at least one {kind: physical, device: NAME}"))
        if self.schedule.keep == "best" and self.dataset.val_fraction == 0:
            out.append(Problem("schedule.keep", "'best' chooses the epoch on the validation split, and "
                               "dataset.val_fraction is 0", "keep: last, or dataset.val_fraction > 0"))
        unknown_refs = any(l.kind == "physical" and l.device not in self.devices for l in self.stack)
        for name in names:
            if name not in used and not unknown_refs:
                out.append(Problem(f"devices.{name}", "device is not used by any layer of the stack",
                                   "remove it, or add {kind: physical, device: " + name + "}"))
        specs: dict[str, DeviceSpec | None] = {}
        for name, dev in self.devices.items():
            drv = dev.driver
            found, specs[name] = _driver_spec(f"devices.{name}.driver", drv)
            out += found
            if self.method == "oracle" and drv.kind != "simulated":
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
            out += self._memory_problems(specs)
        return out

    def _memory_problems(self, specs: Mapping[str, DeviceSpec | None]) -> list[Problem]:
        """The largest allocations the sizes imply, each compared with this machine's memory."""
        limit = machine_memory()
        out: list[Problem] = []

        def check(key: str, per_unit: int, units: int, what: str, unit_name: str) -> None:
            need = per_unit * units
            if need > limit:
                most = max(0, limit // max(per_unit, 1))
                out.append(Problem(key, f"{what} needs about {_bytes(need)}, more than this machine's memory "
                                   f"({_bytes(limit)})", f"at most {most} {unit_name} at these sizes"))

        widths: list[int] = []
        width = DATASET_FEATURES.get(self.dataset.name)
        if width is not None:
            widths.append(width)
        for i, layer in enumerate(self.stack):
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
        sched = self.schedule
        if widths:
            # values, gradients and the twins' vector-Jacobian products of every layer, for a whole batch
            check("schedule.batch_size", 3 * 8 * sum(widths), sched.batch_size,
                  f"a batch of {sched.batch_size} samples through layers {'+'.join(map(str, widths))} wide",
                  "samples")
            check("schedule.eval_batch", 8 * sum(widths), sched.eval_batch,
                  f"an evaluation batch of {sched.eval_batch} samples", "samples")
        for name, dev in self.devices.items():
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

    # -- conversions -------------------------------------------------------------------------------------

    @property
    def digital_only(self) -> bool:
        """The method trains digital stand-ins where the physical layers stood (no device is measured)."""
        return self.method in DIGITAL_METHODS

    def physical_devices(self) -> list[str]:
        """Device names in stack order."""
        return [l.device for l in self.stack if l.kind == "physical"]

    def resolved(self) -> dict[str, Any]:
        """The full configuration with every default filled in (what a run logs as its parameters)."""
        return self.model_dump(mode="json", by_alias=True)

    def with_overrides(self, overrides: Sequence[str]) -> ExperimentConfig:
        """This configuration with ``KEY=VALUE`` overrides, validated again."""
        return parse_config(self.resolved(), source=self.source, overrides=overrides)

    def quick_version(self) -> ExperimentConfig:
        """The smaller run ``--quick`` asks for: this configuration with its ``quick`` overrides."""
        if not self.quick:
            return self
        data = self.resolved()
        data.pop("quick")
        # JSON is YAML: each value is parsed back exactly as written in the file
        return parse_config(data, source=f"{self.source} [quick]",
                            overrides=[f"{k}={json.dumps(v)}" for k, v in self.quick.items()])

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False)


#: features of the datasets whose width is known without reading them
DATASET_FEATURES = {"mnist5k": 784, "digits": 64, "vowels": 12}


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


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


def system_option_problems(key: str, system: str, options: Mapping[str, Any]) -> list[Problem]:
    """Mistakes in a simulated system's ``options``, each under ``KEY.options.NAME``; [] when it builds."""
    return _system_spec(key, system, options)[0]


def _system_spec(key: str, system: str, options: Mapping[str, Any]) -> tuple[list[Problem], DeviceSpec | None]:
    allowed = _system_options(system)
    bad = [Problem(f"{key}.options.{k}", f"unknown option of system {system!r}{_near(k, allowed)}", ", ".join(allowed))
           for k in options if k not in allowed]
    if bad:
        return bad, None
    try:
        # names, types and ranges first: nothing is allocated for a value the system cannot take
        _system_class(system).check_options(options)
    except LimitError as exc:
        what = f"{exc.problem}: {exc.value}" if exc.value is not None else exc.problem
        return [Problem(f"{key}.{exc.field}", what, exc.allowed)], None
    try:
        return [], make_device(system, **options).spec
    except (TypeError, ValueError) as exc:
        return [Problem(f"{key}.options", f"system {system!r} refuses {dict(options)}: {exc}")], None


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


def _declared_spec(key: str, data: Mapping[str, Any]) -> tuple[list[Problem], DeviceSpec | None]:
    """A device spec written in the configuration (``driver.spec``): its sizes bounded, then parsed."""
    allowed = f"an integer from 1 to {MAX_WIDTH}"
    for port in ("input", "output"):
        size = (data.get(port) or {}).get("size") if isinstance(data.get(port), Mapping) else None
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_WIDTH):
            return [Problem(f"{key}.{port}.size", f"out of range: {_show(size)}", allowed)], None
    params = data.get("params") or []
    numel = 0
    for j, p in enumerate(params if isinstance(params, list) else []):
        shape = p.get("shape") if isinstance(p, Mapping) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and
                                                  1 <= n <= MAX_WIDTH for n in shape):
            return [Problem(f"{key}.params.{j}.shape", f"not a shape: {_show(shape)}",
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


# -- paths relative to the file ------------------------------------------------------------------------------


def _resolve(value: str, info: ValidationInfo) -> Path:
    p = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    return p


def _existing_file(value: str, info: ValidationInfo) -> Path:
    p = _resolve(value, info)
    if not p.is_file():
        raise _custom(f"no such file {str(p)!r}", "a path to an existing file, absolute or relative to the config")
    return p


def _existing_dir(value: str, info: ValidationInfo, what: str) -> Path:
    p = _resolve(value, info)
    if not p.is_dir():
        found = "a file, not a directory" if p.exists() else "no such directory"
        raise _custom(f"{found}: {str(p)!r}", f"{what}, absolute or relative to the config")
    return p


# -- loading -------------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a config with one is a mistake we report."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read and validate a YAML experiment configuration; raises :class:`ConfigError`.

    ``overrides`` are ``KEY=VALUE`` strings (``schedule.epochs=2``), values parsed as YAML.
    """
    p = Path(path)
    source = str(path)
    if not p.is_file():
        examples = ", ".join(example_configs())
        raise ConfigError(source, [Problem("", "no such configuration file",
                                           f"a YAML file; shipped examples: {examples}")])
    try:
        data = yaml.load(p.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [Problem(where, f"not valid YAML: {problem}")]) from None
    return parse_config(data, source=source, base_dir=p.resolve().parent, overrides=overrides)


def parse_config(data: Any, source: str = "<config>", base_dir: str | Path | None = None,
                 overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Validate a configuration already read into Python objects."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(source, [Problem("", f"the top level must be a mapping, got {type(data).__name__}",
                                           ", ".join(ExperimentConfig.model_fields))])
    data = apply_overrides(dict(data), overrides, source)
    try:
        cfg = ExperimentConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(source, [_problem(e, data) for e in exc.errors()]) from None
    cfg._source = source
    problems = cfg.problems()
    if not problems and cfg.quick:
        try:
            cfg.quick_version()
        except ConfigError as exc:  # a quick override that does not fit is a mistake in this file
            problems = [Problem(f"quick: {p.key}", p.message, p.allowed) for p in exc.problems]
    if problems:
        raise ConfigError(source, problems)
    return cfg


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """``schedule.epochs=2`` style overrides; the key path must exist in the file or the schema."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(source, [Problem(f"--set {item}", "expected KEY=VALUE", "e.g. schedule.epochs=2")])
        value = yaml.safe_load(raw) if raw else None
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[int(part)] if part.isdigit() and int(part) < len(node) else None
            else:
                node = node.setdefault(part, {}) if isinstance(node, dict) else None
            if node is None:
                raise ConfigError(source, [Problem(key, "no such key to override")])
        last = parts[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(source, [Problem(key, "no such key to override")])
    return data


# -- pydantic errors in the lab's words ------------------------------------------------------------------------

_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string", "str": "a string",
    "dict": "a mapping (key: value)", "list": "a list",
}


def _strip_tags(loc: Sequence[Any], data: Any) -> list[Any]:
    """Drop the discriminated-union tags pydantic puts in ``loc`` (they are values, not keys of the file)."""
    out: list[Any] = []
    node = data
    for part in loc:
        if isinstance(node, Mapping) and part not in node and node.get("kind") == part:
            continue
        out.append(part)
        if isinstance(node, Mapping):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return out


def _keys(model: type[BaseModel]) -> dict[str, Any]:
    """A section's fields by the key a file writes (``class``, not the attribute ``class_``)."""
    return {f.alias or name: f for name, f in model.model_fields.items()}


def _model_at(loc: Sequence[Any], data: Any) -> type[BaseModel] | None:
    """The section class that holds the key at ``loc`` (for the list of allowed keys)."""
    ann: Any = ExperimentConfig
    node = data
    for part in loc:
        ann = _unwrap(ann, node)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            fld = _keys(ann).get(part) if isinstance(part, str) else None
            if fld is None:
                return None
            ann = fld.annotation
        else:
            origin = typing.get_origin(ann)
            args = typing.get_args(ann)
            if origin in (list, tuple) and args:
                ann = args[0]
            elif origin is dict and len(args) == 2:
                ann = args[1]
            else:
                return None
        node = node.get(part) if isinstance(node, Mapping) else (
            node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None)
    ann = _unwrap(ann, node)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _unwrap(ann: Any, node: Any) -> Any:
    while True:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(ann) if a is not type(None)]
            tag = node.get("kind") if isinstance(node, Mapping) else None
            pick = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)
                    and tag in typing.get_args(m.model_fields.get("kind").annotation if "kind" in m.model_fields
                                               else Any)]
            ann = pick[0] if pick else members[0] if len(members) == 1 else None
        else:
            return ann


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem(err: Mapping[str, Any], data: Any) -> Problem:
    loc = _strip_tags(err.get("loc", ()), data)
    key = ".".join(str(p) for p in loc)
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "config":
        return Problem(key, ctx.get("message", err.get("msg", "")), ctx.get("allowed", ""))
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1], data)
        allowed = list(_keys(model)) if model else []
        return Problem(key, f"unknown key{_near(str(loc[-1]), allowed)}", ", ".join(allowed))
    if kind == "missing":
        model = _model_at(loc[:-1], data)
        fld = _keys(model).get(str(loc[-1])) if model else None
        return Problem(key, "missing required key", _describe(fld.annotation) if fld else "")
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace(" or ", ", ").replace("'", "")
        return Problem(key, f"{_show(value)} is not one of the choices", expected)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        what = f"unknown kind {ctx.get('tag')!r}" if kind == "union_tag_invalid" else "missing key 'kind'"
        return Problem(f"{key}.kind" if key else "kind", what, ", ".join(DRIVER_KINDS))
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()), "")
        # both ends of the range, when the key has both
        return Problem(key, f"out of range: {_show(value)}",
                       _range_text(_constraints_at(loc, data)) or f"{bounds[kind]} {_number(limit)}")
    if kind == "finite_number":
        return Problem(key, f"not a finite number: {_show(value)}",
                       _range_text(_constraints_at(loc, data)) or "a finite number")
    if kind in ("too_short", "string_too_short"):
        return Problem(key, f"too short: {_show(value)}", f"at least {ctx.get('min_length', 1)} item(s)")
    if kind == "too_long":
        return Problem(key, f"too long: {ctx.get('actual_length', '?')} items", f"at most {ctx.get('max_length')}")
    for suffix in ("_type", "_parsing", "_from_float"):
        if kind.endswith(suffix):
            word = kind[: -len(suffix)]
            expected = _TYPE_WORDS.get(word, "")
            if not expected:  # a section or a driver: say which keys it takes
                model = _model_at(loc[:-1], data) if loc else None
                fld = _keys(model).get(str(loc[-1])) if model and loc else None
                expected = _describe(fld.annotation) if fld else word
            return Problem(key, f"wrong type: {_show(value)} ({type(value).__name__})", expected)
    return Problem(key, f"{err.get('msg', 'invalid')}: {_show(value)}")


def _number(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _range_text(c: Mapping[str, Any]) -> str:
    low = f">= {_number(c['ge'])}" if "ge" in c else f"> {_number(c['gt'])}" if "gt" in c else ""
    high = f"<= {_number(c['le'])}" if "le" in c else f"< {_number(c['lt'])}" if "lt" in c else ""
    return " and ".join(t for t in (low, high) if t)


def _constraints_at(loc: Sequence[Any], data: Any) -> dict[str, Any]:
    """The bounds (``ge``, ``gt``, ``le``, ``lt``) the schema puts on the key at ``loc``."""
    found: dict[str, Any] = {}

    def take(meta: Any) -> None:
        if isinstance(meta, FieldInfo):
            for m in meta.metadata:
                take(m)
            return
        for attr in ("gt", "ge", "lt", "le"):
            v = getattr(meta, attr, None)
            if v is not None:
                found.setdefault(attr, v)

    def visit(ann: Any) -> None:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            base, *metas = typing.get_args(ann)
            for m in metas:
                take(m)
            visit(base)
        elif origin in (Union, types.UnionType):
            for a in typing.get_args(ann):
                visit(a)

    if not loc:
        return found
    parent, last = loc[:-1], loc[-1]
    model = _model_at(parent, data)
    if model is not None:
        fld = _keys(model).get(last) if isinstance(last, str) else None
        if fld is not None:
            for m in fld.metadata:
                take(m)
            visit(fld.annotation)
        return found
    # an item of a list or a value of a mapping: the bounds of the container's item type
    container = _constraints_container(parent, data)
    if container is not None:
        visit(container)
    return found


def _constraints_container(loc: Sequence[Any], data: Any) -> Any:
    if not loc:
        return None
    model = _model_at(loc[:-1], data)
    fld = _keys(model).get(loc[-1]) if model is not None and isinstance(loc[-1], str) else None
    if fld is None:
        return None
    ann = fld.annotation
    while True:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(members) != 1:
                return None
            ann = members[0]
        elif origin in (list, tuple):
            return typing.get_args(ann)[0]
        elif origin is dict:
            return typing.get_args(ann)[1]
        else:
            return None


def _describe(ann: Any) -> str:
    ann = _unwrap(ann, None) if typing.get_origin(ann) is Annotated else ann
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "a mapping with keys " + ", ".join(_keys(ann))
    origin = typing.get_origin(ann)
    if origin is Literal:
        return ", ".join(map(str, typing.get_args(ann)))
    if ann == Driver or ann == typing.get_args(Driver)[0]:  # pydantic keeps the union, not our Annotated alias
        return "a mapping with kind: " + ", ".join(DRIVER_KINDS)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(ann) if a is not type(None))
    return getattr(ann, "__name__", str(ann))


# -- shipped examples ------------------------------------------------------------------------------------------


def example_configs() -> list[str]:
    """Names of the example configurations shipped in ``pnn_cluster/configs``."""
    root = resources.files("pnn_cluster") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def example_config_path(name: str) -> Path:
    return Path(str(resources.files("pnn_cluster") / "configs" / f"{name}.yaml"))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [x, y]}`` -> ``{"a.b": 1, "c.0": x, "c.1": y}``."""
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        if not tree and prefix:
            out[prefix] = "{}"
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, list | tuple):
        if not tree and prefix:
            out[prefix] = "[]"
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix] = tree
    return out

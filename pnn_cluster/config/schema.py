"""The schema of an experiment configuration: one YAML file describes a whole experiment.

A configuration names the dataset, the devices (each with its driver, its
placement on the cluster and how its twin is made), the stack of physical and
digital layers, the optimizer, the schedule and the tracking. Each section is a
pydantic model; a key's type, choices and bounds are its field's annotation.

Every number has bounds, so a typo cannot ask for more than a machine has:
seeds are integers in 0..2**32-1 (:data:`MAX_SEED`; derived seeds stay far
below the 2**64 torch and NumPy take); widths (linear layer sizes, twin hidden
widths, simulated systems' size options, ports of a declared device spec) are
1..65536 (:data:`MAX_WIDTH`); batch sizes 1..1,000,000 (:data:`MAX_BATCH`,
what a device spec takes in one call); epochs 1..100,000; floats are finite.
The recalibration settings' bounds and the training loop's defaults are stated
in :mod:`pnn_cluster.training` (which cannot import this package) and taken
from there.

What one key cannot say alone (a layer naming a device that exists, a size
the machine's memory can hold) is checked in :mod:`.checks`; reading a file is
:mod:`.loader`'s job.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator

from pnn_cluster.config.errors import custom, near
from pnn_cluster.devices import SYSTEMS
from pnn_cluster.devices.simulated import MAX_SIZE, MAX_STEP_SAMPLES, MAX_STEP_SIZE
from pnn_cluster.training.recalibration import BOUNDS as RECALIBRATION_BOUNDS
from pnn_cluster.training.recalibration import POLICIES, Recalibration
from pnn_cluster.training.trainer import LR_SCHEDULES, MAX_BATCH, MAX_EPOCHS, OPTIMIZERS, TRAIN_BOUNDS, TrainConfig
from pnn_cluster.twins.sequential import SEQUENTIAL_BOUNDS, SequentialPlan

__all__ = [
    "ExperimentConfig", "DeviceConfig", "LayerConfig", "SimulatedDriver", "VisaDriver", "ZmqDriver", "PythonDriver",
    "ImperfectionsConfig", "TwinConfig", "PlacementConfig", "TwinPlacement", "TrainerPlacement", "METHODS",
    "MAX_SEED", "MAX_WIDTH", "MAX_BATCH", "MAX_EPOCHS",
]

SYSTEM_NAMES = tuple(sorted(SYSTEMS))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


#: seeds: what ``np.random.seed`` takes, and ``seed * 100 + layer + 1000 * replica`` stays far below 2**63
MAX_SEED = 2**32 - 1
#: the widest layer, twin hidden layer or device port (a simulated system's size options share the cap)
MAX_WIDTH = MAX_SIZE

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
BatchSize = Annotated[int, Field(ge=TRAIN_BOUNDS["batch_size"][0], le=TRAIN_BOUNDS["batch_size"][1])]
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
    #: the real setup's pace (pnn_cluster/devices/lab.py) times this: 1 the lab's own clock, 0 no wait
    lab_clock: Annotated[float, Field(ge=0.0, le=1e6)] | None = None
    ideal: bool = False

    def overrides(self) -> dict[str, Any]:
        """The keys given, as :class:`~pnn_cluster.devices.Imperfections` takes them."""
        out = {k: v for k, v in self if k != "ideal" and v is not None}
        if "steps" in out:
            out["steps"] = tuple((s.at_samples, s.size) for s in out["steps"])
        return out


def _check_system(v: str) -> str:
    if v not in SYSTEMS:
        raise custom(f"unknown system {v!r}{near(v, SYSTEM_NAMES)}", ", ".join(SYSTEM_NAMES))
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
            raise custom(f"unknown instrument driver {v!r}{near(v, sorted(DRIVERS))}", ", ".join(sorted(DRIVERS)))
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
            raise custom(f"not a ZeroMQ endpoint: {v!r}", "tcp://HOST:PORT, ipc://PATH")
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
            raise custom(f"not a class path: {v!r}", "package.module:ClassName")
        return v


Driver = Annotated[SimulatedDriver | VisaDriver | ZmqDriver | PythonDriver, Field(discriminator="kind")]


_SEQ = SequentialPlan()
#: the settings' bounds, stated in the twins layer (which cannot import this module)
_SB = SEQUENTIAL_BOUNDS


class SequentialTwinConfig(Section):
    """Sequential calibration (:mod:`pnn_cluster.twins.sequential`): settings measured in rounds where an
    ensemble of twins disagrees most, until the held-out NMSE is within ``factor`` of the noise floor
    (0: no such stop) or ``budget`` device samples are spent."""

    budget: Annotated[int, Field(**_SB["budget"])] = _SEQ.budget
    factor: Annotated[float, Field(**_SB["factor"])] = _SEQ.factor
    initial_groups: Annotated[int, Field(**_SB["initial_groups"])] = _SEQ.initial_groups
    holdout_groups: Annotated[int, Field(**_SB["holdout_groups"])] = _SEQ.holdout_groups
    growth: Annotated[float, Field(**_SB["growth"])] = _SEQ.growth
    ensemble: Annotated[int, Field(**_SB["ensemble"])] = _SEQ.ensemble
    candidates: Annotated[int, Field(**_SB["candidates"])] = _SEQ.candidates
    round_epochs: Annotated[int, Field(**_SB["round_epochs"])] = _SEQ.round_epochs
    first_epochs: Annotated[int, Field(**_SB["first_epochs"])] = _SEQ.first_epochs
    repeats: Annotated[int, Field(**_SB["repeats"])] = _SEQ.repeats
    near: Annotated[float, Field(**_SB["near"])] = _SEQ.near
    spread: Annotated[float, Field(**_SB["spread"])] = _SEQ.spread
    stop_share: Annotated[float, Field(**_SB["stop_share"])] = _SEQ.stop_share
    cold: bool = _SEQ.cold

    def plan(self, batch: int) -> SequentialPlan:
        """The plan, measuring ``batch`` inputs per setting (the twin section's ``batch``)."""
        return SequentialPlan(**self.model_dump(), batch=batch)


class TwinConfig(Section):
    """How a device's digital twin is made: fitted to fresh measurements, the ideal model, or loaded."""

    kind: Literal["physics", "residual", "mlp", "structured", "ideal", "best"] = "physics"
    groups: Annotated[int, Field(ge=3, le=100_000)] = 24
    batch: BatchSize = 128
    repeats: Annotated[int, Field(ge=2, le=100)] = 2
    holdout: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    epochs: Annotated[int, Field(ge=0, le=MAX_EPOCHS)] | None = None
    lr: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    hidden: Annotated[list[Width], Field(max_length=32)] | None = None
    load: str | None = None
    #: measure in rounds where the twin is least sure (see :class:`SequentialTwinConfig`); None: all at random
    sequential: SequentialTwinConfig | None = None

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

    @field_validator("sequential")
    @classmethod
    def _sequential_fits(cls, v: SequentialTwinConfig | None, info: ValidationInfo) -> SequentialTwinConfig | None:
        # sequential calibration fits one kind; "ideal" is not fitted and "best" compares kinds on one sample set
        kind = info.data.get("kind")
        if v is not None and kind in ("ideal", "best"):
            raise ValueError(f"sequential calibration fits one twin kind; twin.kind is {kind!r} (allowed with "
                             "sequential: a kind that is fitted, e.g. physics, residual, mlp)")
        return v


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
#: the settings' bounds, stated in the training layer (which cannot import this module)
_RB = RECALIBRATION_BOUNDS


class RecalibrationConfig(Section):
    """What the device's twin watch does during training (see :mod:`pnn_cluster.training.recalibration`).

    ``policy``: ``none`` (not watched), ``monitor`` (the twin's error over the noise floor logged each step,
    a drift reported), ``refine`` (refined online from what training measures, swapped in at a step boundary)
    or ``pause`` (the device recalibrated in full, training waiting). The rest tune the detector and the
    refinement (``check_groups``, ``widen_*``: an accepted refinement checked over the whole range, and widened
    when it is still far off there; ``reference_rows``, ``confirm_share``: a reference measured again at an alarm,
    which tells a device that drifted from a twin that is off where training has moved); the defaults suit a
    device measured thousands of times per step.
    """

    policy: Literal[POLICIES] = _RECAL.policy
    arl0: Annotated[float, Field(**_RB["arl0"])] = _RECAL.arl0
    rise: Annotated[float, Field(**_RB["rise"])] = _RECAL.rise
    warmup: Annotated[int, Field(**_RB["warmup"])] = _RECAL.warmup
    buffer_rows: Annotated[int, Field(**_RB["buffer_rows"])] = _RECAL.buffer_rows
    half_life_steps: Annotated[float, Field(**_RB["half_life_steps"])] = _RECAL.half_life_steps
    explore_fraction: Annotated[float, Field(**_RB["explore_fraction"])] = _RECAL.explore_fraction
    explore_groups: Annotated[int, Field(**_RB["explore_groups"])] = _RECAL.explore_groups
    explore_spread: Annotated[float, Field(**_RB["explore_spread"])] = _RECAL.explore_spread
    epochs: Annotated[int, Field(**_RB["epochs"])] = _RECAL.epochs
    check_groups: Annotated[int, Field(**_RB["check_groups"])] = _RECAL.check_groups
    widen_factor: Annotated[float, Field(**_RB["widen_factor"])] = _RECAL.widen_factor
    widen_groups: Annotated[int, Field(**_RB["widen_groups"])] = _RECAL.widen_groups
    widen_fraction: Annotated[float, Field(**_RB["widen_fraction"])] = _RECAL.widen_fraction
    reference_rows: Annotated[int, Field(**_RB["reference_rows"])] = _RECAL.reference_rows
    confirm_share: Annotated[float, Field(**_RB["confirm_share"])] = _RECAL.confirm_share

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

class LayerConfig(Section):
    """One layer: ``{kind: linear, size: 24}``, ``{kind: rescale}``, ``{kind: physical, device: NAME}``,
    ``{kind: affine}``, ``{kind: pool, size: 7}`` (square images averaged down to 7 x 7, fixed)."""

    kind: Literal["linear", "rescale", "physical", "affine", "pool"]
    size: Width | None = None
    device: str | None = None


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
            raise custom("folds 1 is not a cross-validation (one fold leaves nothing to train on)",
                          f"0 (the dataset's own split) or an integer from 2 to {MAX_FOLDS}")
        return v

    @field_validator("fold")
    @classmethod
    def _fold(cls, v: int, info: ValidationInfo) -> int:
        folds = info.data.get("folds")
        if folds is None:  # folds itself was refused, and is reported
            return v
        if folds == 0 and v != 0:
            raise custom(f"fold {v} without folds (folds 0 keeps the dataset's own split)",
                          "0, or set folds to 2 or more")
        if folds and v >= folds:
            raise custom(f"fold {v} is not one of the {folds} folds", f"an integer from 0 to {folds - 1}")
        return v

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        if info.data.get("name") == "idx":
            return str(_existing_dir(v, info, "the directory holding the IDX files (train-images-idx3-ubyte, ...)"))
        return str(_existing_file(v, info))


#: the training loop's defaults (:class:`~pnn_cluster.training.trainer.TrainConfig`): the optimizer's and the
#: schedule's keys default to them
_TRAIN = TrainConfig()


class OptimizerConfig(Section):
    name: Literal[OPTIMIZERS] = _TRAIN.optimizer
    lr: Annotated[float, Field(gt=TRAIN_BOUNDS["lr"][0], le=TRAIN_BOUNDS["lr"][1])] = _TRAIN.lr
    weight_decay: Annotated[float, Field(ge=TRAIN_BOUNDS["weight_decay"][0], le=TRAIN_BOUNDS["weight_decay"][1])] \
        = _TRAIN.weight_decay


class InitConfig(Section):
    """Data-dependent initialisation: each rescale sees standardised inputs (``init_rescales_``)."""

    spread: Annotated[float, Field(gt=0.0, le=100.0)] = 0.3
    logit_scale: Annotated[float, Field(gt=0.0, le=100.0)] = 3.0
    samples: Annotated[int, Field(ge=2, le=1_000_000)] = 512


class ScheduleConfig(Section):
    epochs: Annotated[int, Field(ge=TRAIN_BOUNDS["epochs"][0], le=TRAIN_BOUNDS["epochs"][1])] = _TRAIN.epochs
    batch_size: BatchSize = _TRAIN.batch_size
    micro_batch: BatchSize | None = _TRAIN.micro_batch
    lr_schedule: Literal[LR_SCHEDULES] = _TRAIN.lr_schedule
    eval_batch: BatchSize = _TRAIN.eval_batch
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
Method = Literal["pat", "in_silico", "oracle", "ablation", "digital"]
METHODS: tuple[str, ...] = typing.get_args(Method)
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
    method: Method = "pat"
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
        from pnn_cluster.config.loader import with_overrides

        return with_overrides(self, overrides)

    def quick_version(self) -> ExperimentConfig:
        """The smaller run ``--quick`` asks for: this configuration with its ``quick`` overrides."""
        from pnn_cluster.config.loader import quick_version

        return quick_version(self)


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
        raise custom(f"no such file {str(p)!r}", "a path to an existing file, absolute or relative to the config")
    return p


def _existing_dir(value: str, info: ValidationInfo, what: str) -> Path:
    p = _resolve(value, info)
    if not p.is_dir():
        found = "a file, not a directory" if p.exists() else "no such directory"
        raise custom(f"{found}: {str(p)!r}", f"{what}, absolute or relative to the config")
    return p

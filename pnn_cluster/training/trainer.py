"""The training loop: explicit states, an injected executor, callback hooks.

The :class:`Trainer` owns the model, the optimizer and the loop. How a batch's
forward and backward passes run is the executor's business: the default
:class:`SequentialExecutor` runs micro-batches one after the other in this
process; the distributed executor (``actors``) pipelines them over device
actors. Either way the gradients of all micro-batches add up to one
optimizer step, and the parameters reach each device once per step.

Model selection is honest: each epoch ends with the validation split
measured on the physical devices (``val_acc``, ``val_loss``); the test split
is never touched by :meth:`Trainer.fit`. Whoever owns the run measures it
once, after training, with :meth:`Trainer.test`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pnn_cluster.data import Dataset
from pnn_cluster.fsio import NotATorchFile, atomic_torch_save, torch_load_tensors
from pnn_cluster.layers import Stack

__all__ = ["TrainConfig", "Callback", "CheckpointError", "Executor", "SequentialExecutor", "Stateful", "Trainer",
           "TrainerState", "StepResult", "read_checkpoint"]

#: what every checkpoint :meth:`Trainer.state_dict` writes holds
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "global_step", "device_samples")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: not a torch file, missing keys, or from another configuration.

    ``path`` is the file when known (a checkpoint handed over in memory has none); the message says what was
    found and what was expected, on one line.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load`` of a checkpoint file, tensors only; a file that is not one raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        state = torch_load_tensors(path)
    except NotATorchFile as exc:
        raise CheckpointError(f"not a torch checkpoint ({exc}); give a file written by "
                              "`pnn-cluster train --checkpoint` or a run's checkpoints/last.pt", path) from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"holds a {type(state).__name__}, not a checkpoint (a mapping with keys "
                              f"{', '.join(CHECKPOINT_KEYS)})", path)
    return dict(state)


def _few(items: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _shape(v: Any) -> str:
    return "x".join(map(str, v.shape)) if hasattr(v, "shape") else type(v).__name__


#: the largest batch: what a device spec takes in one call by default (``DeviceSpec.max_batch``)
MAX_BATCH = 1_000_000
MAX_EPOCHS = 100_000
#: what each training setting may be, stated once: :class:`TrainConfig` checks them, and the configuration
#: schema's fields take them (``(low, high)``, both inclusive, except ``lr``'s low: it must be above it)
TRAIN_BOUNDS: dict[str, tuple[float, float]] = {
    "epochs": (1, MAX_EPOCHS), "batch_size": (1, MAX_BATCH), "micro_batch": (1, MAX_BATCH),
    "eval_batch": (1, MAX_BATCH), "lr": (0.0, 10.0), "weight_decay": (0.0, 1.0),
}
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    micro_batch: int | None = None
    lr: float = 0.01
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    eval_batch: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        for k, (low, high) in TRAIN_BOUNDS.items():
            v = getattr(self, k)
            if v is None and k == "micro_batch":
                continue
            if not (low < v <= high if k == "lr" else low <= v <= high):
                raise ValueError(f"TrainConfig.{k}: invalid value {v!r}; allowed: "
                                 f"{'above ' if k == 'lr' else ''}{low:g} to {high:g}")
        for k, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, k) not in allowed:
                raise ValueError(f"TrainConfig.{k}: invalid value {getattr(self, k)!r}; allowed: {', '.join(allowed)}")


class TrainerState:
    CREATED, RUNNING, FINISHED, FAILED, STOPPED = "created", "running", "finished", "failed", "stopped"


@dataclass
class StepResult:
    loss: float
    correct: int
    n: int
    device_samples: int = 0


class Executor(Protocol):
    def forward_backward(self, model: Stack, x: torch.Tensor, y: torch.Tensor, loss_fn, micro_batch: int | None
                         ) -> StepResult: ...

    def evaluate(self, model: Stack, x: torch.Tensor, micro_batch: int | None = None) -> torch.Tensor: ...


def split_micro(n: int, micro: int | None) -> list[slice]:
    m = n if not micro else min(micro, n)
    return [slice(i, min(i + m, n)) for i in range(0, n, m)]


class SequentialExecutor:
    """Micro-batches one after the other, in this process; the reference schedule."""

    def forward_backward(self, model: Stack, x: torch.Tensor, y: torch.Tensor, loss_fn,
                         micro_batch: int | None) -> StepResult:
        n = x.shape[0]
        total, correct = 0.0, 0
        for sl in split_micro(n, micro_batch):
            out = model(x[sl])
            loss = loss_fn(out, y[sl]) * ((sl.stop - sl.start) / n)
            loss.backward()
            total += float(loss.detach())
            correct += int((out.argmax(-1) == y[sl]).sum())
        return StepResult(total, correct, n)

    @torch.no_grad()
    def evaluate(self, model: Stack, x: torch.Tensor, micro_batch: int | None = None) -> torch.Tensor:
        return model(x)


@runtime_checkable
class Stateful(Protocol):
    """A component whose state a checkpoint carries: a callback, or anything given to :meth:`Trainer.add_stateful`.

    It saves and loads its own state, under its own :attr:`state_key` of the checkpoint's ``extra`` section;
    nobody else writes there. :meth:`state_dict` is called when a checkpoint is taken (state that changes every
    step is not copied every step); :meth:`load_state_dict` gets what the checkpoint holds under the key, or None
    when it holds nothing there (a fresh run, or a checkpoint from before the component existed).
    """

    state_key: str

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class Callback:
    """Hooks the trainer calls; override what you need. MLflow tracking is one of these.

    A callback with a ``state_key`` and ``state_dict`` / ``load_state_dict`` is :class:`Stateful`: the trainer
    saves and restores its state with every checkpoint.
    """

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_test_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        """After :meth:`Trainer.test`: ``acc``, ``loss``, ``pred`` and ``target`` of the test split."""


class Trainer:
    """Trains a :class:`Stack` on a :class:`Dataset`; accuracy is measured on the physical devices, each epoch
    on the validation split, and on the test split only when :meth:`test` is called."""

    def __init__(self, model: Stack, data: Dataset, config: TrainConfig | None = None,
                 callbacks: Sequence[Callback] = (), executor: Executor | None = None,
                 progress: bool = True, loss_fn=None) -> None:
        self.model = model
        self.data = data
        self.config = config or TrainConfig()
        self.callbacks = list(callbacks)
        self.executor = executor or SequentialExecutor()
        self.progress = progress
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.state = TrainerState.CREATED
        self.epoch = 0
        self.global_step = 0
        self.device_samples = 0
        self.history: list[dict[str, float]] = []
        self.params_projected = 0
        #: steps of the current epoch already done (a run stopped mid-epoch resumes at the next one)
        self.step_in_epoch = 0
        #: the components whose state checkpoints carry, by key (stateful callbacks, and what
        #: :meth:`add_stateful` was given)
        self._stateful: dict[str, Stateful] = {}
        #: a loaded checkpoint's ``extra`` section: what no component claimed yet is handed to one added later,
        #: and written back unchanged (nothing a checkpoint holds is dropped by a run that does not use it)
        self._extra_loaded: dict[str, Any] = {}
        for cb in self.callbacks:
            if isinstance(cb, Stateful):
                self.add_stateful(cb)
        #: top-level keys every checkpoint carries as they are (the experiment configuration it came from)
        self.checkpoint_meta: dict[str, Any] = {}
        self._stop = False
        params = [p for p in model.parameters() if p.requires_grad]
        cfg = self.config
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(len(data.y_train) / cfg.batch_size)
        total = cfg.epochs * self.steps_per_epoch
        if cfg.lr_schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)

    # -- one step --------------------------------------------------------------------------

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One optimizer step on a batch: forward/backward of all micro-batches, then constrain."""
        self.model.train()
        before = self.model.samples_measured()
        self.optimizer.zero_grad(set_to_none=True)
        res = self.executor.forward_backward(self.model, x, y, self.loss_fn, self.config.micro_batch)
        penalty = self.model.limit_penalty()
        if penalty.requires_grad:
            penalty.backward()
        self.optimizer.step()
        self.scheduler.step()
        moved = self.model.constrain_()
        self.params_projected += moved
        self.global_step += 1
        measured = (self.model.samples_measured() - before) or res.device_samples
        self.device_samples += measured
        metrics = {"train_loss": res.loss, "train_acc": res.correct / max(res.n, 1),
                   "penalty": float(penalty.detach()), "params_projected": float(moved),
                   "device_samples": float(self.device_samples), "lr": self.scheduler.get_last_lr()[0]}
        for cb in self.callbacks:
            cb.on_step_end(self, metrics)
        return metrics

    # -- evaluation --------------------------------------------------------------------------

    def predict(self, x: np.ndarray, physical: bool = True) -> torch.Tensor:
        """Logits for ``x``; ``physical`` runs every physical layer on its device (the honest test)."""
        self.model.eval()
        outs = []
        xt = torch.as_tensor(x, dtype=torch.get_default_dtype())
        mode = "pat" if physical else "in_silico"
        with torch.no_grad(), self.model.mode_as(mode):
            for sl in split_micro(len(xt), self.config.eval_batch):
                # measured in the micro-batches training uses: the same calls, however it is scheduled
                outs.append(self.executor.evaluate(self.model, xt[sl], micro_batch=self.config.micro_batch))
        return torch.cat(outs)

    def evaluate(self, split: str = "test", physical: bool = True) -> dict[str, Any]:
        """Accuracy and loss of one split (``train``, ``val`` or ``test``)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"Trainer.evaluate: unknown split {split!r} (train, val, test)")
        x = getattr(self.data, f"x_{split}")
        y = torch.as_tensor(getattr(self.data, f"y_{split}"))
        if len(y) == 0:
            raise ValueError(f"Trainer.evaluate: the {split} split of dataset {self.data.name} is empty")
        # evaluation measurements are not a cost of the method; device_samples counts training only
        logits = self.predict(x, physical=physical)
        pred = logits.argmax(-1)
        return {"acc": float((pred == y).float().mean()), "loss": float(self.loss_fn(logits, y)),
                "pred": pred.numpy(), "target": y.numpy()}

    # -- the loop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop after the current step (from a callback or another thread)."""
        self._stop = True

    def fit(self) -> list[dict[str, float]]:
        cfg = self.config
        self.state = TrainerState.RUNNING
        self._stop = False
        for cb in self.callbacks:
            cb.on_train_start(self)
        rng = np.random.default_rng(cfg.seed)
        # replay the shuffles of epochs already done, so a resumed run sees the same batches
        for _ in range(self.epoch):
            rng.permutation(len(self.data.y_train))
        xs = torch.as_tensor(self.data.x_train, dtype=torch.get_default_dtype())
        ys = torch.as_tensor(self.data.y_train)
        try:
            while self.epoch < cfg.epochs and not self._stop:
                t0 = time.perf_counter()
                order = torch.as_tensor(rng.permutation(len(ys)))
                first = self.step_in_epoch  # > 0 when resuming a run stopped mid-epoch
                bar = tqdm(range(first, self.steps_per_epoch), desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                           unit="step", disable=not self.progress, leave=False)
                losses, correct, seen = 0.0, 0.0, 0
                for i in bar:
                    if self._stop:
                        break
                    idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                    m = self.step(xs[idx], ys[idx])
                    self.step_in_epoch = i + 1
                    losses += m["train_loss"] * len(idx)
                    correct += m["train_acc"] * len(idx)
                    seen += len(idx)
                    bar.set_postfix(loss=f"{m['train_loss']:.3f}")
                if self.step_in_epoch < self.steps_per_epoch:
                    break  # stopped mid-epoch: the checkpoint records the step reached
                self.epoch += 1
                self.step_in_epoch = 0
                metrics = {"epoch": float(self.epoch), "train_loss": losses / max(seen, 1),
                           "train_acc": correct / max(seen, 1)}
                if len(self.data.y_val):
                    ev = self.evaluate("val")
                    metrics.update(val_acc=ev["acc"], val_loss=ev["loss"])
                metrics.update(epoch_seconds=time.perf_counter() - t0, device_samples=float(self.device_samples))
                self.history.append(metrics)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, metrics)
        except BaseException:
            self.state = TrainerState.FAILED
            raise
        self.state = TrainerState.STOPPED if self.epoch < cfg.epochs else TrainerState.FINISHED
        final = self.history[-1] if self.history else {}
        for cb in self.callbacks:
            cb.on_train_end(self, final)
        return self.history

    def test(self) -> dict[str, Any]:
        """The test split, measured on the physical devices: once per run, after :meth:`fit` finished."""
        result = self.evaluate("test")
        for cb in self.callbacks:
            cb.on_test_end(self, result)
        return result

    # -- checkpoints ---------------------------------------------------------------------------

    def add_stateful(self, component: Stateful) -> None:
        """Carry ``component``'s state in every checkpoint, under its ``state_key``. Added after a checkpoint was
        loaded, it gets its part of that checkpoint at once."""
        if not isinstance(component, Stateful):
            raise TypeError(f"{type(component).__name__} is not Stateful: it needs state_key, state_dict() and "
                            "load_state_dict(state)")
        key = component.state_key
        held = self._stateful.get(key)
        if held is not None and held is not component:
            raise ValueError(f"two components save their state under {key!r}: {type(held).__name__} and "
                             f"{type(component).__name__}")
        self._stateful[key] = component
        if key in self._extra_loaded:
            component.load_state_dict(self._extra_loaded[key])

    def stateful(self, key: str) -> Stateful | None:
        """The component saving its state under ``key``, if any."""
        return self._stateful.get(key)

    def state_dict(self) -> dict[str, Any]:
        return {**self.checkpoint_meta, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "global_step": self.global_step,
                "device_samples": self.device_samples, "config": asdict(self.config),
                "history": self.history, "step_in_epoch": self.step_in_epoch,
                "extra": {**self._extra_loaded, **{k: c.state_dict() for k, c in self._stateful.items()}}}

    def check_state_dict(self, state: Any, path: str | os.PathLike | None = None) -> None:
        """Raise :class:`CheckpointError` unless ``state`` is a checkpoint of this very stack.

        Names the keys a checkpoint lacks, and for a model of another shape the missing, unexpected and
        mis-shaped tensors (a few of each): such a checkpoint comes from another configuration.
        """
        if not isinstance(state, Mapping):
            raise CheckpointError(f"a checkpoint is a mapping with keys {', '.join(CHECKPOINT_KEYS)}; got a "
                                  f"{type(state).__name__}", path)
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        if missing:
            found = _few(sorted(map(str, state)), 8) or "none"
            raise CheckpointError(f"no {_few([repr(k) for k in missing], 6)} key{'s' if len(missing) > 1 else ''} "
                                  f"(found: {found}); expected a checkpoint written by `pnn-cluster train` "
                                  f"(keys {', '.join(CHECKPOINT_KEYS)})", path)
        saved = state["model"]
        if not isinstance(saved, Mapping):
            raise CheckpointError(f"'model' holds a {type(saved).__name__}, not a state_dict of tensors", path)
        own = self.model.state_dict()
        absent = [k for k in own if k not in saved]
        unexpected = [k for k in saved if k not in own]
        shapes = [f"{k} ({_shape(saved[k])} in the checkpoint, {_shape(own[k])} here)" for k in own
                  if k in saved and _shape(saved[k]) != _shape(own[k])]
        if absent or unexpected or shapes:
            parts = ([f"missing {_few(absent)}"] if absent else []) + \
                ([f"unexpected {_few(unexpected)}"] if unexpected else []) + \
                ([f"shape of {_few(shapes)}"] if shapes else [])
            raise CheckpointError(f"the checkpoint's model does not match this stack: {'; '.join(parts)}; it comes "
                                  "from another configuration (evaluate or resume it with the configuration it was "
                                  "trained with)", path)

    def load_state_dict(self, state: dict[str, Any], path: str | os.PathLike | None = None) -> None:
        """Restore a checkpoint of :meth:`state_dict`; one of another stack raises :class:`CheckpointError`."""
        self.check_state_dict(state, path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            epoch, step, samples = int(state["epoch"]), int(state["global_step"]), int(state["device_samples"])
            step_in_epoch = int(state.get("step_in_epoch", 0))
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise CheckpointError(f"cannot restore the training state ({type(exc).__name__}: {detail}); it comes "
                                  "from another configuration or version", path) from None
        self.epoch, self.global_step, self.device_samples = epoch, step, samples
        self.history = list(state.get("history", []))
        self.step_in_epoch = step_in_epoch
        self._extra_loaded = dict(state.get("extra") or {})
        for key, component in self._stateful.items():
            component.load_state_dict(self._extra_loaded.get(key))
        for layer in self.model.physical_layers():
            layer.sync_params(force=True)

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write :meth:`state_dict` to ``path``: atomic and fsynced, the old checkpoint or the new one, whole."""
        return atomic_torch_save(self.state_dict(), path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        self.load_state_dict(read_checkpoint(path), path)

"""Model selection on the validation split: the epoch whose weights the test split measures.

Early stopping in its honest form: every epoch ends with the validation split
measured on the devices; :class:`BestOnValidation` keeps a copy of the weights
(digital and physical settings) of the epoch with the best validation
accuracy, and puts them back when training ends, before the one test
measurement. The test split never takes part in the choice.
"""

from __future__ import annotations

import copy
from typing import Any

from pnn_cluster.training.trainer import Callback, Trainer

__all__ = ["BestOnValidation"]


class BestOnValidation(Callback):
    """Keeps the weights of the best validation epoch and restores them at the end of training.

    It is :class:`~pnn_cluster.training.trainer.Stateful`: its state (the best epoch, its accuracy and weights)
    is saved with the checkpoint under :attr:`state_key`, so a resumed run still ends on the best epoch of the
    whole run.
    """

    state_key = "best_on_validation"

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.val_acc: float | None = None
        self._weights: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "val_acc": self.val_acc, "model": self._weights}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.epoch, self.val_acc, self._weights = state.get("epoch"), state.get("val_acc"), state.get("model")

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        acc = metrics.get("val_acc")
        if acc is None:
            return
        if self.val_acc is None or acc > self.val_acc:  # ties keep the earlier epoch
            self.epoch, self.val_acc = int(metrics["epoch"]), float(acc)
            self._weights = copy.deepcopy(trainer.model.state_dict())

    def on_train_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self._weights is None or trainer.epoch < trainer.config.epochs:
            return  # no validation split, or a stopped run that will resume
        trainer.model.load_state_dict(self._weights)
        for layer in trainer.model.physical_layers():
            layer.sync_params(force=True)  # the device holds the chosen epoch's settings again

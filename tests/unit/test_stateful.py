"""The trainer's stateful components: each saves and loads its own state under its own key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pnn_cluster.data import Dataset
from pnn_cluster.layers import Stack
from pnn_cluster.training.trainer import Callback, Stateful, TrainConfig, Trainer


class Counter(Callback):
    """Counts steps; its count is its state."""

    def __init__(self, key: str = "counter") -> None:
        self.state_key = key
        self.steps = 0
        self.loaded: list = []

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state) -> None:
        self.loaded.append(state)
        self.steps = (state or {}).get("steps", 0)

    def on_step_end(self, trainer, metrics) -> None:
        self.steps += 1


def _trainer(callbacks=()) -> Trainer:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    data = Dataset("toy", x[:24], y[:24], x[32:], y[32:], x_val=x[24:32], y_val=y[24:32])
    torch.manual_seed(0)
    return Trainer(Stack(nn.Linear(4, 2)), data, TrainConfig(epochs=1, batch_size=8), callbacks=callbacks,
                   progress=False)


def test_a_stateful_callback_is_saved_under_its_key_and_restored_by_a_resumed_trainer():
    counter = Counter()
    trainer = _trainer([counter])
    trainer.fit()
    state = trainer.state_dict()
    assert state["extra"]["counter"] == {"steps": trainer.global_step} and trainer.global_step == 3
    again = Counter()
    resumed = _trainer([again])
    resumed.load_state_dict(state)
    assert again.steps == 3 and again.loaded == [{"steps": 3}]


def test_a_component_added_after_loading_gets_its_part_and_unclaimed_state_is_kept():
    trainer = _trainer([Counter()])
    trainer.fit()
    state = trainer.state_dict()
    state["extra"]["someone_else"] = {"kept": True}
    fresh = _trainer()
    fresh.load_state_dict(state)
    late = Counter()
    fresh.add_stateful(late)
    assert late.steps == 3
    assert fresh.state_dict()["extra"]["someone_else"] == {"kept": True}  # never dropped by a run not using it
    assert fresh.stateful("counter") is late


def test_a_fresh_component_gets_none_and_two_owners_of_one_key_are_refused():
    counter = Counter()
    trainer = _trainer([counter])
    trainer.load_state_dict({**trainer.state_dict(), "extra": {}})
    assert counter.loaded == [None]
    with pytest.raises(ValueError, match="two components save their state under 'counter'"):
        trainer.add_stateful(Counter())
    with pytest.raises(TypeError, match="not Stateful"):
        trainer.add_stateful(object())
    assert isinstance(counter, Stateful)

import numpy as np
import torch
from torch import nn

from pnn_cluster.data import Dataset
from pnn_cluster.devices import Imperfections, make_device
from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
from pnn_cluster.training import Callback, TrainConfig, Trainer, TrainerState


def toy_data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    return Dataset("toy", x[: n // 2], y[: n // 2], x[n // 2:], y[n // 2:])


class SealedTest(Dataset):
    """A dataset whose test split cannot be read while it is sealed: training must never look at it."""

    sealed = False

    def __getattribute__(self, name):
        if name in ("x_test", "y_test") and object.__getattribute__(self, "sealed"):
            raise AssertionError(f"the test split ({name}) was read during training")
        return object.__getattribute__(self, name)


def sealed(d: Dataset) -> SealedTest:
    out = SealedTest(d.name, d.x_train, d.y_train, d.x_test, d.y_test, d.x_val, d.y_val)
    out.sealed = True
    return out


def small_stack(mode="pat"):
    dev = make_device("shg", n_in=6, n_out=8, imperfections=Imperfections.ideal())
    layer = PhysicalLayer(dev, twin=dev.model(), mode=mode)
    return Stack(nn.Linear(6, 6), Rescale(6, 0.0, 1.0), layer, Affine(8), nn.Linear(8, 2)), dev


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_start(self, trainer):
        self.events.append("start")

    def on_step_end(self, trainer, metrics):
        self.events.append(("step", trainer.global_step))

    def on_epoch_end(self, trainer, metrics):
        self.events.append(("epoch", trainer.epoch, metrics["val_acc"]))

    def on_train_end(self, trainer, metrics):
        self.events.append("end")

    def on_test_end(self, trainer, result):
        self.events.append(("test", result["acc"]))


def test_one_step_writes_params_once_and_moves_them():
    stack, dev = small_stack()
    data = toy_data()
    tr = Trainer(stack, data, TrainConfig(epochs=1, batch_size=16, micro_batch=4), progress=False)
    before = stack[2].params_numpy()["phase"].copy()
    writes = dev.stats["param_writes"]
    m = tr.step(torch.as_tensor(data.x_train[:16]), torch.as_tensor(data.y_train[:16]))
    # four micro-batches measured, one parameter write (the parameters had not been sent yet)
    assert dev.stats["calls"] == 4 and dev.stats["param_writes"] == writes + 1
    assert m["device_samples"] == 16 and tr.global_step == 1
    assert not np.allclose(stack[2].params_numpy()["phase"], before)


def test_micro_batches_give_the_same_gradient_as_one_batch():
    torch.manual_seed(0)
    data = toy_data()
    x, y = torch.as_tensor(data.x_train[:16]), torch.as_tensor(data.y_train[:16])
    grads = []
    for micro in (None, 4):
        torch.manual_seed(0)
        stack, _ = small_stack()
        tr = Trainer(stack, data, TrainConfig(epochs=1, micro_batch=micro), progress=False)
        tr.optimizer.zero_grad()
        tr.executor.forward_backward(stack, x, y, tr.loss_fn, micro)
        grads.append([p.grad.clone() for p in stack.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fit_runs_callbacks_and_checkpoint_resume_continues(tmp_path):
    data = toy_data().with_validation(0.25, seed=0)
    rec = Recorder()
    stack, _ = small_stack()
    tr = Trainer(stack, data, TrainConfig(epochs=2, batch_size=16, lr=0.05), callbacks=[rec], progress=False)
    tr.fit()
    assert tr.state == TrainerState.FINISHED and tr.global_step == 3 * 2  # 36 train samples, batches of 16
    assert rec.events[0] == "start" and rec.events[-1] == "end"
    assert [e[1] for e in rec.events if e[0] == "epoch"] == [1, 2]
    ckpt = tr.save_checkpoint(tmp_path / "ckpt.pt")

    stack2, dev2 = small_stack()
    tr2 = Trainer(stack2, data, TrainConfig(epochs=3, batch_size=16, lr=0.05), progress=False)
    tr2.load_checkpoint(ckpt)
    assert tr2.epoch == 2 and tr2.global_step == 6
    np.testing.assert_array_equal(dev2.params["phase"], stack[2].params_numpy()["phase"])
    tr2.fit()
    assert tr2.global_step == 9 and len(tr2.history) == 3


def test_fit_measures_validation_each_epoch_and_never_reads_the_test_split():
    data = sealed(toy_data().with_validation(0.25, seed=0))
    rec = Recorder()
    stack, _ = small_stack()
    tr = Trainer(stack, data, TrainConfig(epochs=2, batch_size=16, lr=0.05), callbacks=[rec], progress=False)
    evaluated = []
    evaluate = tr.evaluate
    tr.evaluate = lambda split="test", physical=True: evaluated.append(split) or evaluate(split, physical)
    tr.fit()  # would raise AssertionError on any read of x_test or y_test
    assert evaluated == ["val", "val"]
    assert all(0 <= h["val_acc"] <= 1 and h["val_loss"] > 0 for h in tr.history)
    assert all("test_acc" not in h and "test_loss" not in h for h in tr.history)
    assert [e[0] for e in rec.events if isinstance(e, tuple)].count("test") == 0

    # the test split: once, when asked, after training; callbacks see it
    data.sealed = False
    result = tr.test()
    assert evaluated == ["val", "val", "test"] and rec.events[-1] == ("test", result["acc"])
    assert len(result["target"]) == len(data.y_test)


def test_without_a_validation_split_epochs_have_no_validation_metrics():
    data = sealed(toy_data())
    stack, _ = small_stack()
    tr = Trainer(stack, data, TrainConfig(epochs=1, batch_size=16), progress=False)
    tr.fit()
    assert len(tr.history) == 1 and "val_acc" not in tr.history[0] and "val_loss" not in tr.history[0]


def test_trainer_learns_a_separable_problem():
    torch.manual_seed(0)
    data = toy_data(400).with_validation(0.2, seed=0)
    stack, _ = small_stack()
    tr = Trainer(stack, data, TrainConfig(epochs=6, batch_size=20, lr=0.03), progress=False)
    tr.fit()
    assert tr.history[-1]["val_acc"] > 0.85
    assert tr.test()["acc"] > 0.85

import numpy as np
import pytest
import torch
from torch import nn

from pnn_cluster.data import Dataset
from pnn_cluster.devices import Imperfections, make_device
from pnn_cluster.layers import Affine, PhysicalLayer, Rescale, Stack
from pnn_cluster.training import Callback, TrainConfig, Trainer, TrainerState
from pnn_cluster.training.trainer import CheckpointError


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


# -- checkpoints that cannot be loaded say why, on one line -------------------------------------------------


def _trainer(width=6):
    dev = make_device("shg", n_in=6, n_out=8, imperfections=Imperfections.ideal())
    layer = PhysicalLayer(dev, twin=dev.model(), mode="pat")
    stack = Stack(nn.Linear(6, 6), Rescale(6, 0.0, 1.0), layer, Affine(8), nn.Linear(8, width))
    return Trainer(stack, toy_data(), TrainConfig(epochs=1, batch_size=16), progress=False)


def test_a_file_that_is_not_a_checkpoint_is_refused_naming_it(tmp_path):
    junk = tmp_path / "notes.pt"
    junk.write_text("not a torch file")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a torch checkpoint") as info:
        _trainer().load_checkpoint(junk)
    assert info.value.path == str(junk) and "\n" not in str(info.value)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: holds a list, not a checkpoint"):
        _trainer().load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        _trainer().load_checkpoint(tmp_path / "absent.pt")


def test_a_checkpoint_without_its_model_names_the_keys_found_and_expected(tmp_path):
    tr = _trainer()
    state = tr.state_dict()
    del state["model"]
    with pytest.raises(CheckpointError) as info:
        tr.load_state_dict(state)
    msg = str(info.value)
    assert "no 'model' key" in msg and "found: config, device_samples, epoch" in msg
    assert "keys model, optimizer, scheduler" in msg and "\n" not in msg


def test_a_checkpoint_of_another_stack_names_the_mismatched_tensors_and_changes_nothing(tmp_path):
    other = _trainer(width=3)
    path = other.save_checkpoint(tmp_path / "other.pt")
    tr = _trainer(width=2)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        tr.load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: the checkpoint's model does not match this stack")
    assert "shape of 4.weight (3x8 in the checkpoint, 2x8 here), 4.bias (3 in the checkpoint, 2 here)" in msg
    assert "comes from another configuration" in msg and "\n" not in msg
    for k, v in tr.model.state_dict().items():  # refused before anything was loaded
        torch.testing.assert_close(v, before[k])
    state = other.state_dict()
    state["model"]["9.extra"] = torch.zeros(1)
    state["model"].pop("0.weight")
    with pytest.raises(CheckpointError, match=r"missing 0\.weight; unexpected 9\.extra"):
        other.load_state_dict(state)


def test_save_checkpoint_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    tr = _trainer()
    path = tr.save_checkpoint(tmp_path / "ckpt.pt")
    tr.global_step = 7

    def crash(obj, f, *a, **kw):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # the temporary file is gone
    assert torch.load(path, weights_only=True)["global_step"] == 0  # the old checkpoint, whole

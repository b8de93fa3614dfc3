"""Chaos: the device server dies or hangs in the middle of an epoch of a real ``pnn-cluster train``.

The device is ``pnn-cluster serve-device`` in its own process, the training
``pnn-cluster train --in-process`` in another, reaching it through the ZeroMQ
driver; or (marked slow) ``train`` joins the session's Ray test cluster, where
the driver that sees the failure is in the device actor. The middle of an
epoch is read from the server itself (its ``health`` counts the device calls
served), never guessed from a clock.

- Killed (SIGKILL) and restarted on the same port within the driver's retry
  window: the run finishes with exactly the steps and training samples of an
  undisturbed run, and the restarted server measured no more than what was
  left plus what was in flight when its predecessor died.
- Hung (SIGSTOP) then resumed (SIGCONT) after the driver has given up on at
  least one socket and reconnected: the same exact figures.
- Hung for good: the run stops within a bound with one line on stderr naming
  the device and the timeout, exit code 1, and a checkpoint of its last step.
"""

from __future__ import annotations

import re
import time

import pytest
from helpers import wait_until, write_config

from .conftest import (
    TRAIN_SAMPLES,
    assert_no_traceback,
    chaos_config,
    connections_to,
    steps_per_epoch,
    train_result,
)

EPOCHS, BATCH = 2, 8
STEPS = EPOCHS * steps_per_epoch(BATCH)  # 2 x 14
#: device samples measured for evaluation (not counted as the run's): the validation split each epoch, the test split
EVALUATED = EPOCHS * 10 + 60
#: device samples the run measures after its twin is made: training, validation each epoch, the test split
AFTER_TWIN = EPOCHS * TRAIN_SAMPLES + EVALUATED
#: samples in flight when the server dies: in process, a step is one micro-batch (the whole batch)
IN_FLIGHT = BATCH
START_S = 90  # a train or serve-device process starting on a busy machine


@pytest.fixture(params=["in-process", pytest.param("ray", marks=pytest.mark.slow)])
def placement(request) -> list[str]:
    """Where ``train`` runs: in its own process, or as a driver of the session's Ray test cluster (a trainer
    actor, and the device actor whose ZeroMQ driver sees the failure)."""
    if request.param == "in-process":
        return ["--in-process"]
    return ["--address", request.getfixturevalue("ray_cluster").address]


@pytest.fixture
def in_process() -> list[str]:
    """The hang scenarios run in process only: on Ray the same fault policy runs behind the same driver, and the
    kill scenario already covers the Ray wiring (a device actor seeing its server fail); the suite's time
    budget goes to scenarios that differ."""
    return ["--in-process"]


def _start_training(run_cli, served, tmp_path, placement, **driver):
    """Start ``train`` (while the server may still be starting: the driver's tries wait for it); return it
    once it prints that training begins, with the server ready."""
    cfg = write_config(tmp_path / "chaos.yaml", chaos_config(served.endpoint, epochs=EPOCHS, batch_size=BATCH,
                                                             **driver))
    proc = run_cli("train", cfg, *placement, "--no-progress", "--json", "--checkpoint", tmp_path / "last.pt")
    if not served.instances:
        served.ready()
    m = proc.wait_for_line(r"^-- training (\d+) epochs of (\d+) steps", START_S)
    assert (int(m[1]), int(m[2])) == (EPOCHS, STEPS // EPOCHS)
    return proc


def _mid_epoch(served, calls: int = 6) -> tuple[int, int]:
    """Wait until the server has measured ``calls`` training micro-batches; (samples when training began, now)."""
    base = served.health()
    h = wait_until(lambda: (lambda h: h if h["calls"] >= base["calls"] + calls else None)(served.health()),
                   START_S, f"{calls} training forwards on {served.endpoint}", interval=0.005)
    return base["samples"], h["samples"]


def _finished_exactly(proc, result, rc) -> None:
    assert rc == 0, f"exit {rc}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert_no_traceback(proc)
    assert result is not None and result["state"] == "finished"
    assert result["steps"] == STEPS and result["epochs"] == EPOCHS
    # every micro-batch counted once, when its measurement came back: none lost, none twice
    assert result["device_samples"] == EPOCHS * TRAIN_SAMPLES


def test_server_killed_and_restarted_mid_epoch_the_run_finishes_with_exact_counts(serve_device, run_cli, tmp_path,
                                                                                  placement):
    t0 = time.monotonic()
    served = serve_device(wait=False)
    # each try waits 2 s, then a fresh socket sends again: 32 s for the server to come back
    proc = _start_training(run_cli, served, tmp_path, placement, timeout_s=2.0, retries=15)
    base, before_kill = _mid_epoch(served)
    served.kill()
    killed = time.monotonic()
    served.restart()
    back = time.monotonic()
    # the run's retried forward reaches the new server
    wait_until(lambda: served.forwards() > 0, 30, "the training to reach the restarted server", interval=0.01)
    reached = time.monotonic()
    rc, result = train_result(proc, 120)
    _finished_exactly(proc, result, rc)
    after = served.health()
    measured_before = before_kill - base
    # what was left, plus at most what was in flight when the first server died (measured, never answered)
    assert AFTER_TWIN - measured_before - after["samples"] >= -IN_FLIGHT, (after["samples"], measured_before)
    assert after["server"]["instance"] != served.instances[0]
    assert after["samples"] > EVALUATED  # training micro-batches were measured on the new server: it died mid-run
    print(f"\nkill/restart: {result['steps']}/{STEPS} steps, {result['device_samples']} training samples; "
          f"restart took {back - killed:.1f} s, first forward on the new server {reached - killed:.1f} s after the "
          f"kill; new server measured {after['samples']} of the {AFTER_TWIN - measured_before} left; "
          f"test {time.monotonic() - t0:.1f} s")


def test_server_hung_then_resumed_mid_epoch_the_run_finishes_with_exact_counts(serve_device, run_cli, tmp_path,
                                                                               in_process):
    placement = in_process
    t0 = time.monotonic()
    served = serve_device(wait=False)
    proc = _start_training(run_cli, served, tmp_path, placement, timeout_s=2.0, retries=15)
    _mid_epoch(served)
    before = connections_to(served.port)
    assert before, "the training holds no connection to the server"
    served.pause()
    paused = time.monotonic()
    # the hang is seen: the driver gives up on its socket twice and reconnects with a fresh one each time
    seen = set(before)

    def reconnected_twice() -> bool:
        seen.update(connections_to(served.port))
        return len(seen - before) >= 2

    wait_until(reconnected_twice, 30, "the training's driver to reconnect twice to the hung server")
    detected = time.monotonic()
    served.resume()
    rc, result = train_result(proc, 120)
    _finished_exactly(proc, result, rc)
    h = served.health()
    assert h["server"]["instance"] == served.instances[0]  # the same process, resumed
    # the one server measured everything the run counted (twin, initialisation, training) and its
    # evaluations, plus at most the micro-batch it was measuring when it hung (measured again by the retry)
    extra = h["samples"] - (result["device_samples_total"] + EVALUATED)
    assert 0 <= extra <= IN_FLIGHT, (h["samples"], result["device_samples_total"])
    print(f"\nhang/resume: {result['steps']}/{STEPS} steps, {result['device_samples']} training samples; "
          f"second reconnect {detected - paused:.1f} s after SIGSTOP; measured again after SIGCONT: {extra} samples; "
          f"test {time.monotonic() - t0:.1f} s")


def test_server_hung_for_good_mid_epoch_the_run_stops_cleanly_with_a_checkpoint(serve_device, run_cli, tmp_path,
                                                                                in_process):
    placement = in_process
    import torch

    t0 = time.monotonic()
    served = serve_device()
    # each device call gives up after 2 tries of 1.5 s; three such failures in a row retire the device
    proc = _start_training(run_cli, served, tmp_path, placement, timeout_s=1.5, retries=1)
    _mid_epoch(served)
    served.pause()
    paused = time.monotonic()
    rc = proc.wait(60)
    stopped = time.monotonic() - paused
    assert rc == 1, f"exit {rc}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert_no_traceback(proc)
    *before, line = proc.lines("stderr")
    # the error is one line, the last
    assert not any(w.startswith("pnn-cluster train:") for w in before), proc.stderr
    if "--in-process" in placement:
        # before it, at most the warning that the device left its pool, in a line of its own (on Ray, the
        # actors' log lines come too)
        assert all(re.search(r"ReplicaRetired: stage circuit: replica circuit failed 3 times in a row", w)
                   for w in before), proc.stderr
    assert line.startswith("pnn-cluster train: ") and "circuit" in line and served.endpoint in line, line
    assert "2 tries of 1.5 s" in line, line  # the timeout it gave up after
    ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert 0 < ckpt["global_step"] < STEPS
    assert f"checkpoint of step {ckpt['global_step']} saved to" in line, line
    # the last complete step's state: every micro-batch of those steps counted once
    done_epochs, in_epoch = divmod(ckpt["global_step"], STEPS // EPOCHS)
    assert ckpt["device_samples"] == done_epochs * TRAIN_SAMPLES + in_epoch * BATCH
    # three failures of 2 x 1.5 s, plus the calls queued behind them, plus the checkpoint: well under 60 s
    assert stopped < 30, stopped
    print(f"\nhung for good: stopped {stopped:.1f} s after SIGSTOP at step {ckpt['global_step']}/{STEPS}, "
          f"exit {rc}: {line}; test {time.monotonic() - t0:.1f} s")

"""What the training engine does when a device fails.

A physical device fails in ways a GPU does not: a USB link drops, an
instrument needs a power cycle, a process holding the connection dies. The
policy here is deliberately plain:

- A measurement is repeatable and a parameter write is idempotent, so a
  forward pass that was in flight when its device failed is simply run again
  (on the restarted device, or on another replica of the same stage). Its
  micro-batch is counted once, when a measurement finally comes back.
- A replica that fails ``max_consecutive_failures`` times in a row leaves its
  pool with a warning naming it and the last error; the run goes on with the
  others.
- With no replica left in a stage the run cannot go on: :class:`NoReplicaLeft`
  (a :class:`~pnn_cluster.devices.base.DeviceError`, never retried itself)
  is raised; the runner keeps the checkpoint of the last complete step (in the
  MLflow run, and at ``train --checkpoint PATH``) and stops with
  :class:`TrainingAborted`, so a repaired lab resumes from there.
- A value the device refused (:class:`~pnn_cluster.devices.spec.LimitError`)
  is not a device failure: repeating it would be refused again, so it
  propagates at once. So does any other error: that is a bug, not a fault.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from pnn_cluster.devices.base import DeviceError
from pnn_cluster.devices.spec import LimitError

__all__ = ["FaultPolicy", "ReplicaRetired", "NoReplicaLeft", "TrainingAborted", "is_device_failure", "describe"]

log = logging.getLogger(__name__)

#: exceptions a device (or its connection) raises when it fails, as opposed to refusing a value
TRANSIENT = (DeviceError, ConnectionError, TimeoutError, EOFError, BrokenPipeError)


def is_device_failure(exc: BaseException) -> bool:
    """True for failures worth retrying on a (restarted or other) device."""
    if isinstance(exc, (LimitError, NoReplicaLeft)):
        return False
    return isinstance(exc, TRANSIENT)


class ReplicaRetired(RuntimeWarning):
    """A replica failed too often and left its pool; the run goes on with the others."""


class NoReplicaLeft(DeviceError):
    """Every replica of a stage has left its pool: the run cannot go on.

    A :class:`~pnn_cluster.devices.base.DeviceError`, so whoever reports device
    failures reports this one too (in one line) wherever it is raised: in a
    training step, a validation pass, or the measurement of the test split.
    """

    def __init__(self, stage: str, failures: dict[str, str]):
        self.stage = stage
        self.failures = dict(failures)
        detail = "; ".join(f"{name}: {err}" for name, err in self.failures.items()) or "no replicas configured"
        super().__init__(f"stage {stage}: no replica left to measure on ({detail})")

    def __reduce__(self):
        # errors cross process boundaries (a trainer actor raises them to the driver)
        return (type(self), (self.stage, self.failures))


class TrainingAborted(RuntimeError):
    """The run stopped on a fault it cannot work around; a checkpoint was saved (``checkpoint``)."""

    def __init__(self, message: str, checkpoint: Path | None):
        self.checkpoint = checkpoint
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.args[0], self.checkpoint))


@dataclass
class FaultPolicy:
    """How many failures the engine absorbs before it gives up on a replica or a micro-batch.

    max_consecutive_failures: failures in a row after which a replica leaves its pool.
    max_attempts: tries of one micro-batch on one stage, over all replicas; a micro-batch
        that fails everywhere (say its input crashes the instrument) stops the run
        rather than take every replica out with it.
    """

    max_consecutive_failures: int = 3
    max_attempts: int = 8

    def __post_init__(self) -> None:
        for name in ("max_consecutive_failures", "max_attempts"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"FaultPolicy.{name}: must be an integer >= 1, got {v!r}")

    def should_retire(self, stage: str, replica_name: str, failures_in_a_row: int, exc: BaseException,
                      remaining: int) -> bool:
        """True when a replica with this many failures in a row must leave its pool (after a warning)."""
        n = failures_in_a_row
        if n < self.max_consecutive_failures:
            log.info("stage %s: replica %s failed (%d in a row), retrying: %s", stage, replica_name, n, exc)
            return False
        # one line on stderr: the schedule's source line under it would only look like part of a traceback
        warnings.warn_explicit(
            f"stage {stage}: replica {replica_name} failed {n} times in a row and leaves the pool "
            f"({remaining - 1} replica(s) left); last error: {describe(exc)}",
            ReplicaRetired, filename="pnn-cluster", lineno=0, module=__name__,
        )
        return True

    def check_attempts(self, stage: str, micro_batch: int, attempts: int, exc: BaseException) -> None:
        if attempts >= self.max_attempts:
            raise DeviceError(
                f"stage {stage}: micro-batch {micro_batch} failed {attempts} times (FaultPolicy.max_attempts="
                f"{self.max_attempts}); last error: {describe(exc)}"
            ) from exc


def describe(exc: BaseException) -> str:
    """One line for logs and warnings: the error's type and the last line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1].strip() if text else ''}"[:300]

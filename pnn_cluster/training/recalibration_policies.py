"""What a device's twin watch does about drift: one small class per ``recalibration.policy``.

As with :class:`~pnn_cluster.training.faults.FaultPolicy`, the policy decides
and the engine acts: at each alarm of a replica's drift detector,
:meth:`RecalibrationPolicy.on_alarm` returns a :class:`Decision` (what to do,
and why), and :class:`~pnn_cluster.training.recalibration.RecalibrationWatch`
carries it out. A policy keeps no state of its own (what it looks at, such as
a refinement in flight or the last warning, is the watched replica's, and goes
into checkpoints with it). :data:`POLICY_CLASSES` maps the names a
configuration gives to the classes; see
:mod:`~pnn_cluster.training.recalibration` for what each one means.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from pnn_cluster.training.recalibration import WatchedReplica

__all__ = ["Action", "Decision", "RecalibrationPolicy", "NonePolicy", "MonitorPolicy", "RefinePolicy",
           "PausePolicy", "POLICY_CLASSES", "POLICIES", "policy_for"]


class Action(enum.Enum):
    """What the watch does about an alarm."""

    #: nothing beyond counting the alarm (it is in the step's metrics anyway)
    NOTHING = "nothing"
    #: a warning line; nothing changes
    WARN = "warn"
    #: refine the twin online, from the measurements since the change began (``Decision.since``)
    REFINE = "refine"
    #: take the device out of training and recalibrate it in full
    PAUSE = "pause"
    #: refine the twin again from settings spread over each parameter's whole range (an accepted refit that
    #: fits training's region still misses the rest of the range)
    WIDEN = "widen"


@dataclass(frozen=True)
class Decision:
    """A policy's answer to an alarm: ``action``, ``reason`` (one line, for the log) and, to refine, the step
    the change began (``since``: the measurements after it describe the device as it is now)."""

    action: Action
    reason: str
    since: int | None = None


class RecalibrationPolicy:
    """What an alarm on one replica's twin leads to.

    watches: whether the twin is watched at all (with no watch, no twin outputs are even asked for).
    keeps_inputs: whether the watch keeps the inputs each step measured (a refinement fits to them).
    checks_range: whether an accepted refinement is checked on settings spread over the whole range (and
        :meth:`on_range_check` asked what the figure leads to).
    """

    name: ClassVar[str] = ""
    watches: ClassVar[bool] = True
    keeps_inputs: ClassVar[bool] = False
    checks_range: ClassVar[bool] = False

    def on_alarm(self, w: WatchedReplica, step: int) -> Decision:
        """The decision about an alarm at ``step`` on ``w``'s detector."""
        return Decision(Action.NOTHING, f"policy {self.name}: alarms change nothing")

    def on_region_alarm(self, w: WatchedReplica, step: int) -> Decision:
        """The decision about an alarm that its reference did not confirm: the device measures as it did when
        the baseline was set, so the twin's error rose because training moved to settings it predicts less
        well. Unless the decision is to refine, the watch then sets a new baseline (and reference)."""
        return Decision(Action.NOTHING, f"policy {self.name}: a new baseline is set")

    def on_range_check(self, w: WatchedReplica, step: int, ratio: float, since: int) -> Decision:
        """The decision about an accepted refinement whose NMSE over the whole range is ``ratio`` x the first
        calibration's (``since``: the step the change it answers began)."""
        return Decision(Action.NOTHING, f"policy {self.name}: range checks change nothing")


class NonePolicy(RecalibrationPolicy):
    """``none``: nothing is watched."""

    name = "none"
    watches = False


class MonitorPolicy(RecalibrationPolicy):
    """``monitor``: a warning, at most one per ``max(quiet_steps, warmup)`` steps for one replica."""

    name = "monitor"
    quiet_steps: ClassVar[int] = 100

    def on_alarm(self, w: WatchedReplica, step: int) -> Decision:
        if w.last_warned is not None and step - w.last_warned < max(self.quiet_steps, w.settings.warmup):
            return Decision(Action.NOTHING, f"warned at step {w.last_warned} already")
        return Decision(Action.WARN, "policy monitor: nothing changed")

    def on_region_alarm(self, w: WatchedReplica, step: int) -> Decision:
        return Decision(Action.WARN, "policy monitor: a new baseline is set")


class RefinePolicy(RecalibrationPolicy):
    """``refine``: refine the twin online from the measurements since the change began (the last step at
    which the detector's statistic was zero), unless a refinement is already due or running. An accepted
    refinement that still leaves the twin more than ``widen_factor`` x its first calibration's NMSE over the
    whole range is followed by a widened one (settings spread over the range, beside training's region)."""

    name = "refine"
    keeps_inputs = True
    checks_range = True

    def on_range_check(self, w: WatchedReplica, step: int, ratio: float, since: int) -> Decision:
        factor = w.settings.widen_factor
        if ratio > factor:
            return Decision(Action.WIDEN, f"{ratio:.2f} x its first calibration's NMSE over the whole range, "
                                          f"over {factor:g} x: widening the refinement", since=since)
        return Decision(Action.NOTHING, f"{ratio:.2f} x its first calibration's NMSE over the whole range, "
                                        f"within {factor:g} x")

    def on_alarm(self, w: WatchedReplica, step: int) -> Decision:
        if w.pending is not None:
            return Decision(Action.NOTHING, "a refinement is running")
        if w.refine_due is not None:
            return Decision(Action.NOTHING, f"a refinement from step {w.refine_due} is due")
        return Decision(Action.REFINE, "the twin drifted: policy refine", since=w.zero_step)

    def on_region_alarm(self, w: WatchedReplica, step: int) -> Decision:
        # the twin is off where training works: a refinement there is what helps (a recalibration over the
        # whole range would not), from when its error began to rise
        decision = self.on_alarm(w, step)
        if decision.action is Action.REFINE:
            return Decision(Action.REFINE, "policy refine: refining it where training works", since=decision.since)
        return decision


class PausePolicy(RecalibrationPolicy):
    """``pause``: recalibrate the device in full, unless its recalibration is already running."""

    name = "pause"

    def on_alarm(self, w: WatchedReplica, step: int) -> Decision:
        if w.pending is not None:
            return Decision(Action.NOTHING, "its recalibration is running")
        return Decision(Action.PAUSE, "the twin drifted: policy pause")

    def on_region_alarm(self, w: WatchedReplica, step: int) -> Decision:
        return Decision(Action.WARN, "policy pause: no recalibration (the device has not changed); a new "
                                     "baseline is set")


#: the policies a configuration may name (``devices.NAME.recalibration.policy``), in the order they are listed
POLICY_CLASSES: dict[str, type[RecalibrationPolicy]] = {
    cls.name: cls for cls in (NonePolicy, MonitorPolicy, RefinePolicy, PausePolicy)}
POLICIES = tuple(POLICY_CLASSES)


def policy_for(name: str) -> RecalibrationPolicy:
    """The policy a configuration names."""
    cls = POLICY_CLASSES.get(name)
    if cls is None:
        raise ValueError(f"recalibration.policy: {name!r} is not allowed; allowed: {', '.join(POLICIES)}")
    return cls()

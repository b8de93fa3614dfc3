"""MLflow tracking as a trainer callback: one run per ``train``, ``calibrate`` or ``demo``.

A run records what a lab needs to trust and reproduce a result:

- the full resolved configuration, as parameters and as ``config/config.yaml``;
- a snapshot of every device (spec and limits, driver, identity, calibration)
  as ``devices.json`` and as ``device.*`` tags;
- every twin fit as a nested run: NMSE against the noise floor, the fit's loss
  curve and a parity plot of twin prediction against measurement;
- per-step training metrics, buffered in memory and journaled as one
  ``log_batch`` every ``flush_every_s`` seconds, so a step pays for a few
  list appends and nothing else;
- per epoch: physical validation accuracy and loss (``val_acc``, ``val_loss``),
  and the twin-versus-device residual of each physical layer (NMSE of the
  twin's prediction against the device's measured output, on a validation
  batch): the number that says when a twin has drifted away from its device;
- a checkpoint each epoch (``checkpoints/last.pt``), from which
  ``pnn-cluster train --resume RUN_ID`` continues the same run at the same step;
- at the end of training, a training curve (PNG) and the trained parameters
  and twins as state_dict files in logged models;
- once, after training, the test split measured on the devices (``test_acc``,
  ``test_loss`` at the last step) and its confusion matrix (PNG).

Everything is recorded first in the run's local directory (``pnn-runs/...``:
a journal of every operation, the artifacts as files, the checkpoint written
atomically and fsynced) and sent to the server by one background thread
(:mod:`pnn_cluster.tracking.outbox`), through one :class:`mlflow.MlflowClient`
bound to the tracking URI given to the constructor, every call bounded. An
unreachable server is reported once and never stops or slows the training;
what it missed is uploaded when it is back, or by ``pnn-cluster sync``. No
global active run is used, so several trackers (a demo's methods, a test's
runs) never interfere.

One job per module: :mod:`~pnn_cluster.tracking.callback` (the callback), :mod:`~pnn_cluster.tracking.runs`
(finding a run here or on the server, what it keeps where), :mod:`~pnn_cluster.tracking.snapshots` (devices
and twins as JSON), :mod:`~pnn_cluster.tracking.figures` (the figures), :mod:`~pnn_cluster.tracking.outbox`
(the run directory and the upload thread). Twin versions are numbered and hashed in
:mod:`pnn_cluster.twins.versions`; tracking records what it is given.
"""

from pnn_cluster.tracking.callback import MlflowCallback
from pnn_cluster.tracking.figures import twin_history_figure
from pnn_cluster.tracking.runs import (
    CHECKPOINT_ARTIFACT,
    CONFIG_ARTIFACT,
    TWIN_VERSIONS_ARTIFACT,
    load_run_checkpoint,
    resolve_tracking_uri,
    tracking_client,
)
from pnn_cluster.tracking.snapshots import device_snapshot, twin_residuals
from pnn_cluster.twins.record import TwinFit
from pnn_cluster.twins.versions import active_twin_versions
from pnn_cluster.twins.versions import twin_digest as twin_state_hash  # the name of before there was one digest

__all__ = ["MlflowCallback", "TwinFit", "resolve_tracking_uri", "twin_residuals", "device_snapshot",
           "CHECKPOINT_ARTIFACT", "CONFIG_ARTIFACT", "TWIN_VERSIONS_ARTIFACT", "load_run_checkpoint",
           "active_twin_versions", "twin_history_figure", "tracking_client", "twin_state_hash"]

"""Tracking as the commands ask for it: ``--tracking-uri``/``--no-track``, a demo's runs, a calibration's run.

Only the command line knows its arguments; the library's tracker (:class:`~pnn_cluster.tracking.MlflowCallback`)
is made here from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pnn_cluster.runner.credentials import check_tracking_credentials
from pnn_cluster.tracking import MlflowCallback, TwinFit, resolve_tracking_uri
from pnn_cluster.tracking.snapshots import jsonable

__all__ = ["DemoTracking", "add_tracking_args", "demo_tracking", "log_calibration", "tracker_from_args"]


def tracker_from_args(args: Any, command: str, config_uri: str | None = None, **kw: Any) -> MlflowCallback | None:
    """The tracker a command's ``--tracking-uri``/``--no-track`` ask for (None with ``--no-track``)."""
    if getattr(args, "no_track", False):
        return None
    uri = resolve_tracking_uri(getattr(args, "tracking_uri", None), config_uri)
    check_tracking_credentials(uri)
    return MlflowCallback(uri, command=command, **kw)


def add_tracking_args(p: Any) -> None:
    """``--tracking-uri`` and ``--no-track``, the same on every command that tracks."""
    p.add_argument("--tracking-uri", metavar="URI", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--no-track", action="store_true", help="do not record an MLflow run")


# -- the demo and calibrate commands ------------------------------------------------------------------------------


class DemoTracking:
    """A demo's parent run; each method is a run of its own, a child of it (nothing with ``--no-track``)."""

    def __init__(self, parent: MlflowCallback | None, params: Mapping[str, Any]) -> None:
        self.parent = parent
        self.params = dict(params)

    def __enter__(self) -> DemoTracking:
        if self.parent is not None:
            self.parent.__enter__()
            self.parent.log_params(self.params)
            print(f"MLflow run {self.parent.run_id} at {self.parent.tracking_uri}", flush=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.parent is not None:
            self.parent.__exit__(exc_type, exc, tb)

    def child(self, method: str) -> dict[str, Any] | None:
        """Tracking settings of one method's run: a child of the demo's run, in the same store."""
        if self.parent is None:
            return None
        return {"tracking_uri": self.parent.tracking_uri, "experiment": self.parent.experiment,
                "run_name": f"{self.params.get('task', 'demo')} {method}", "parent_run_id": self.parent.run_id,
                "tags": {"pnn.demo": self.parent.run_id}}

    def record(self, result: Any) -> None:
        """A method's headline figures on the demo's run."""
        if self.parent is None or result.test_acc is None:
            return
        summary = {"test_acc": float(result.test_acc), "device_samples": float(result.device_samples_total),
                   "seconds": float(result.seconds)}
        if result.twin_nmse is not None:
            summary["twin_nmse"] = float(result.twin_nmse)
        self.parent.log_metrics({f"{k}/{result.method}": v for k, v in summary.items()}, step=0, now=True)


def demo_tracking(args: Any, params: Mapping[str, Any]) -> DemoTracking:
    """The demo's parent run (named after its task), as ``--tracking-uri``/``--no-track`` ask."""
    return DemoTracking(tracker_from_args(args, "demo", run_name=f"demo {params.get('task', '')}".strip()), params)


def log_calibration(args: Any, system: str, device: Any, cal: Any, params: Mapping[str, Any],
                    started: float | None = None, operating: Mapping[str, Any] | None = None) -> str | None:
    """One run for ``pnn-cluster calibrate``: the device, a nested run per twin kind, the best twin as a model.

    ``operating`` (each kind's NMSE on an operating region's samples, by kind, and the region's
    ``noise_floor``): logged beside the uniform held-out figures as ``operating/...``."""
    tracker = tracker_from_args(args, "calibrate", run_name=f"calibrate {system}", start_time=started)
    if tracker is None:
        return None
    from pnn_cluster.twins import save_twin

    with tracker:
        tracker.log_params(params)
        fits = {}
        for kind, res in cal.results.items():
            fits[kind] = TwinFit(system, cal.twins[kind], kind, res.nmse_val, res.noise_floor, res.nmse_train,
                                 cal.ideal_nmse, cal.device_samples, res.seconds, list(res.history), cal.val)
            tracker.log_twin_fit(fits[kind], params={"groups": params.get("groups"), "batch": params.get("batch")})
        best = cal.best_kind
        tracker.twin_fits[system] = fits[best]  # the device snapshot records the twin that was kept
        tracker.log_devices({system: device}, twins={system: cal.best})
        metrics = {"noise_floor": cal.noise_floor, "device_samples": cal.device_samples,
                   **{f"nmse_val/{k}": r.nmse_val for k, r in cal.results.items()}}
        if cal.ideal_nmse is not None:
            metrics["ideal_nmse"] = cal.ideal_nmse
        if operating:
            floor = operating["noise_floor"]
            metrics["operating/noise_floor"] = floor
            metrics["operating/device_samples"] = operating["device_samples"]
            for k in cal.results:
                metrics[f"operating/nmse/{k}"] = operating[k]
                metrics[f"operating/ratio_to_floor/{k}"] = operating[k] / floor if floor > 0 else float("inf")
        tracker.log_metrics(metrics, step=0, now=True)
        tracker.set_tags({"pnn.best_twin": best})
        d = tracker.dir.file("best_twin")
        save_twin(cal.best, d / f"{system}_{best}", system=system, fit=cal.results[best].as_dict(),
                  device=jsonable(device.identity()))
        tracker.log_model_dir(f"twin-{system}", d, {"pnn.kind": "twin", "pnn.device": system, "pnn.twin": best})
        print(f"MLflow run {tracker.run_id} at {tracker.tracking_uri}", flush=True)
        return tracker.run_id

"""Digital twins: collect samples, fit, validate against the noise floor, save, check against the device."""

from pnn_cluster.twins.collect import Samples, collect, nmse
from pnn_cluster.twins.fit import Calibration, FitResult, calibrate, evaluate_twin, fit_twin
from pnn_cluster.twins.lifecycle import DriftReport, check_drift
from pnn_cluster.twins.models import TWIN_KINDS, MLPTwin, PhysicsTwin, ResidualTwin, Twin, build_twin
from pnn_cluster.twins.record import TwinFit
from pnn_cluster.twins.store import load_twin, read_twin_meta, save_twin

__all__ = [
    "Samples", "collect", "nmse", "Calibration", "FitResult", "calibrate", "evaluate_twin", "fit_twin",
    "DriftReport", "check_drift", "TWIN_KINDS", "MLPTwin", "PhysicsTwin", "ResidualTwin", "Twin",
    "build_twin", "load_twin", "read_twin_meta", "save_twin", "TwinFit",
]

"""The one runner: a validated experiment configuration and an injected placement in, a result out.

- :mod:`~pnn_cluster.runner.build`: device recipes, the dataset, the stack;
- :mod:`~pnn_cluster.runner.placement`: where devices and twins live (:class:`InProcessPlacement` here,
  ``actors.RayPlacement`` on a cluster);
- :mod:`~pnn_cluster.runner.twins`: each replica's twin, fitted next to its device;
- :mod:`~pnn_cluster.runner.run`: :class:`ExperimentRun`, the run itself.
"""

from pnn_cluster.runner.build import DeviceRecipe, build_stack, default_vowels_path, device_recipes, load_data
from pnn_cluster.runner.placement import DeviceRef, InProcessPlacement, Placement
from pnn_cluster.runner.run import ExperimentRun, ProgressReport, RunResult, run_experiment

__all__ = ["DeviceRecipe", "build_stack", "default_vowels_path", "device_recipes", "load_data", "DeviceRef",
           "InProcessPlacement", "Placement", "ExperimentRun", "ProgressReport", "RunResult", "run_experiment"]

"""Typed experiment configurations: one YAML file describes a whole experiment, validated when it is loaded.

- :mod:`.schema`: the sections of a configuration (pydantic models), each key with its type, choices and bounds;
- :mod:`.checks`: what one key cannot say alone (references between keys, the memory the sizes need);
- :mod:`.loader`: reading a YAML file, ``KEY=VALUE`` overrides, ``--quick`` versions, the shipped examples;
- :mod:`.errors`: a refused configuration, one ``FILE: KEY: message (allowed: ...)`` line a mistake.

This package is the schema and its loader only: :mod:`pnn_cluster.runner` turns a loaded
:class:`ExperimentConfig` into devices, twins and a stack and runs it, in this process or on Ray.
"""

from pnn_cluster.config.checks import machine_memory
from pnn_cluster.config.errors import ConfigError, Problem
from pnn_cluster.config.loader import example_config_path, example_configs, flatten, load_config, parse_config
from pnn_cluster.config.schema import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_SEED,
    MAX_WIDTH,
    METHODS,
    DeviceConfig,
    ExperimentConfig,
    ImperfectionsConfig,
    LayerConfig,
    PlacementConfig,
    PythonDriver,
    SimulatedDriver,
    TrainerPlacement,
    TwinConfig,
    TwinPlacement,
    VisaDriver,
    ZmqDriver,
)

__all__ = [
    "ConfigError", "Problem", "ExperimentConfig", "DeviceConfig", "LayerConfig", "SimulatedDriver", "VisaDriver",
    "ZmqDriver", "PythonDriver", "ImperfectionsConfig", "TwinConfig", "PlacementConfig", "TwinPlacement",
    "TrainerPlacement", "load_config", "parse_config", "example_configs", "example_config_path", "flatten",
    "METHODS", "MAX_SEED", "MAX_WIDTH", "MAX_BATCH", "MAX_EPOCHS", "machine_memory",
]

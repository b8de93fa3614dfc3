"""Reading an experiment configuration: a YAML file, ``KEY=VALUE`` overrides, the shipped examples.

:func:`load_config` reads a file and :func:`parse_config` validates what was
read: the schema (:mod:`.schema`), then the checks across keys
(:mod:`.checks`), then the file's ``quick`` overrides, so that ``--quick``
cannot fail later. Every mistake is reported as::

    FILE: KEY: message (allowed: ...)

naming the file and the dotted key (``devices.optics.driver.system``,
``stack.2.size``), the value that was refused and what would be accepted.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pnn_cluster.config import checks
from pnn_cluster.config.errors import ConfigError, Problem, validation_problems
from pnn_cluster.config.schema import ExperimentConfig

__all__ = ["load_config", "parse_config", "apply_overrides", "with_overrides", "quick_version", "example_configs",
           "example_config_path", "flatten"]


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a config with one is a mistake we report."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read and validate a YAML experiment configuration; raises :class:`ConfigError`.

    ``overrides`` are ``KEY=VALUE`` strings (``schedule.epochs=2``), values parsed as YAML.
    """
    p = Path(path)
    source = str(path)
    if not p.is_file():
        examples = ", ".join(example_configs())
        raise ConfigError(source, [Problem("", "no such configuration file",
                                           f"a YAML file; shipped examples: {examples}")])
    try:
        data = yaml.load(p.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [Problem(where, f"not valid YAML: {problem}")]) from None
    return parse_config(data, source=source, base_dir=p.resolve().parent, overrides=overrides)


def parse_config(data: Any, source: str = "<config>", base_dir: str | Path | None = None,
                 overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Validate a configuration already read into Python objects."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(source, [Problem("", f"the top level must be a mapping, got {type(data).__name__}",
                                           ", ".join(ExperimentConfig.model_fields))])
    data = apply_overrides(dict(data), overrides, source)
    try:
        cfg = ExperimentConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(source, validation_problems(exc.errors(), data, ExperimentConfig)) from None
    cfg._source = source
    problems = checks.problems(cfg)
    if not problems and cfg.quick:
        try:
            quick_version(cfg)
        except ConfigError as exc:  # a quick override that does not fit is a mistake in this file
            problems = [Problem(f"quick: {p.key}", p.message, p.allowed) for p in exc.problems]
    if problems:
        raise ConfigError(source, problems)
    return cfg


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """``schedule.epochs=2`` style overrides; the key path must exist in the file or the schema."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(source, [Problem(f"--set {item}", "expected KEY=VALUE", "e.g. schedule.epochs=2")])
        value = yaml.safe_load(raw) if raw else None
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[int(part)] if part.isdigit() and int(part) < len(node) else None
            else:
                node = node.setdefault(part, {}) if isinstance(node, dict) else None
            if node is None:
                raise ConfigError(source, [Problem(key, "no such key to override")])
        last = parts[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(source, [Problem(key, "no such key to override")])
    return data


def with_overrides(cfg: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """``cfg`` with ``KEY=VALUE`` overrides, validated again."""
    return parse_config(cfg.resolved(), source=cfg.source, overrides=overrides)


def quick_version(cfg: ExperimentConfig) -> ExperimentConfig:
    """The smaller run ``--quick`` asks for: ``cfg`` with its ``quick`` overrides."""
    if not cfg.quick:
        return cfg
    data = cfg.resolved()
    data.pop("quick")
    # JSON is YAML: each value is parsed back exactly as written in the file
    return parse_config(data, source=f"{cfg.source} [quick]",
                        overrides=[f"{k}={json.dumps(v)}" for k, v in cfg.quick.items()])


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [x, y]}`` -> ``{"a.b": 1, "c.0": x, "c.1": y}`` (the keys overrides name)."""
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        if not tree and prefix:
            out[prefix] = "{}"
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, list | tuple):
        if not tree and prefix:
            out[prefix] = "[]"
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix] = tree
    return out


# -- shipped examples ------------------------------------------------------------------------------------------


def example_configs() -> list[str]:
    """Names of the example configurations shipped in ``pnn_cluster/configs``."""
    root = resources.files("pnn_cluster") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def example_config_path(name: str) -> Path:
    return Path(str(resources.files("pnn_cluster") / "configs" / f"{name}.yaml"))

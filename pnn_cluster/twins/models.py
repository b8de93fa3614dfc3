"""Digital twin models: every twin maps ``(x, params) -> y`` like the device it stands for.

- :class:`MLPTwin`: a neural network on inputs and parameters, knowing no physics.
- :class:`PhysicsTwin`: the ideal (or user-supplied) physics model with
  learnable calibration constants.
- :class:`ResidualTwin`: physics plus a small MLP correction for what the
  physics model leaves out.

Twins are rebuilt from ``(kind, config)`` plus a state_dict, never unpickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from pnn_cluster.devices.physics import PhysicsModel
from pnn_cluster.devices.spec import DeviceSpec

__all__ = ["Twin", "MLPTwin", "PhysicsTwin", "ResidualTwin", "TWIN_KINDS", "build_twin"]


class Twin(nn.Module):
    kind: str = ""

    def __init__(self, spec: DeviceSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("y_mean", torch.zeros(spec.output.size))
        self.register_buffer("y_std", torch.ones(spec.output.size))

    def config(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def set_output_stats(self, y: torch.Tensor) -> None:
        y = y.reshape(-1, self.spec.output.size)
        self.y_mean.copy_(y.mean(0))
        self.y_std.copy_(y.std(0).clamp_min(1e-6 * float(y.std().clamp_min(1e-12))))


def _range_scale(low: float, high: float) -> tuple[float, float]:
    """Centre and half-width that map [low, high] to [-1, 1] (identity for unbounded ports)."""
    if np.isfinite(low) and np.isfinite(high):
        return (low + high) / 2, (high - low) / 2
    return 0.0, 1.0


class _MLP(nn.Module):
    """MLP on normalised inputs and parameters; outputs in units of the twin's y_std."""

    def __init__(self, spec: DeviceSpec, hidden: tuple[int, ...], zero_last: bool = False) -> None:
        super().__init__()
        c, s = _range_scale(spec.input.low, spec.input.high)
        self.register_buffer("x_c", torch.tensor(c))
        self.register_buffer("x_s", torch.tensor(s))
        pc, ps = [], []
        for p in spec.params:
            a, b = _range_scale(p.low, p.high)
            pc.append(torch.full((p.numel,), a))
            ps.append(torch.full((p.numel,), b))
        self.names = [p.name for p in spec.params]
        self.register_buffer("p_c", torch.cat(pc) if pc else torch.zeros(0))
        self.register_buffer("p_s", torch.cat(ps) if ps else torch.ones(0))
        sizes = [spec.input.size + sum(p.numel for p in spec.params), *hidden, spec.output.size]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*layers[:-1])
        if zero_last:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        xn = (x - self.x_c) / self.x_s
        if self.names:
            p = torch.cat([params[n].reshape(-1) for n in self.names]).to(x.dtype)
            pn = ((p - self.p_c) / self.p_s).expand(x.shape[0], -1)
            xn = torch.cat([xn, pn], dim=-1)
        return self.net(xn)


class MLPTwin(Twin):
    kind = "mlp"

    def __init__(self, spec: DeviceSpec, hidden: tuple[int, ...] = (256, 256, 256)) -> None:
        super().__init__(spec)
        self.hidden = tuple(int(h) for h in hidden)
        self.mlp = _MLP(spec, self.hidden)

    def config(self) -> dict[str, Any]:
        return {"hidden": list(self.hidden)}

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.y_mean + self.y_std * self.mlp(x, params)


class PhysicsTwin(Twin):
    """The physics model with its calibration constants fitted to measurements."""

    kind = "physics"

    def __init__(self, spec: DeviceSpec, model: PhysicsModel, learn: bool = True) -> None:
        super().__init__(spec)
        self.model = model.clone()
        self.model.learn_calibration(learn)

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model(x, params)


class ResidualTwin(Twin):
    """Physics (calibrated) plus an MLP correction that starts at zero."""

    kind = "residual"

    def __init__(self, spec: DeviceSpec, model: PhysicsModel, hidden: tuple[int, ...] = (128, 128),
                 learn: bool = True) -> None:
        super().__init__(spec)
        self.hidden = tuple(int(h) for h in hidden)
        self.model = model.clone()
        self.model.learn_calibration(learn)
        self.mlp = _MLP(spec, self.hidden, zero_last=True)

    def config(self) -> dict[str, Any]:
        return {"hidden": list(self.hidden)}

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model(x, params) + self.y_std * self.mlp(x, params)


TWIN_KINDS = {"mlp": MLPTwin, "physics": PhysicsTwin, "residual": ResidualTwin}


def build_twin(kind: str, spec: DeviceSpec, model: PhysicsModel | None = None, **config: Any) -> Twin:
    """Construct an (unfitted) twin of ``kind``; physics kinds need the device's physics model."""
    if kind not in TWIN_KINDS:
        raise ValueError(f"unknown twin kind {kind!r}; choose one of {sorted(TWIN_KINDS)}")
    if kind == "mlp":
        return MLPTwin(spec, **config)
    if model is None:
        raise ValueError(
            f"twin kind {kind!r} needs a physics model; this device's model() returned None. Use kind 'mlp'."
        )
    return TWIN_KINDS[kind](spec, model, **config)

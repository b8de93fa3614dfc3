"""Digital twin models: every twin maps ``(x, params) -> y`` like the device it stands for.

- :class:`MLPTwin`: a neural network on inputs and parameters, knowing no physics.
- :class:`PhysicsTwin`: the ideal (or user-supplied) physics model with
  learnable calibration constants.
- :class:`ResidualTwin`: physics plus what the physics model leaves out:
  learned couplings between the device's channels on its way in and out
  (crosstalk between actuator pixels or segments, leakage between detector
  bins or samples, the commonest gap of any multi-channel instrument) and,
  optionally, a small MLP correction for the rest.

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
    #: forward takes params with a leading batch dimension too (one setting per sample): fits then mix settings
    batched_params: bool = False

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


class _Normalised(nn.Module):
    """Maps a device's inputs and parameters to one vector of O(1) numbers (each range to [-1, 1])."""

    def __init__(self, spec: DeviceSpec) -> None:
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
        self.shapes = [tuple(p.shape) for p in spec.params]
        self.register_buffer("p_c", torch.cat(pc) if pc else torch.zeros(0))
        self.register_buffer("p_s", torch.cat(ps) if ps else torch.ones(0))

    def params_vector(self, params: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Normalised parameters: (P,) for one setting, (batch, P) for one setting per sample."""
        if not self.names:
            return torch.zeros(0, dtype=dtype)
        first = params[self.names[0]]
        batched = first.dim() > len(self.shapes[0])
        lead = (first.shape[0],) if batched else ()
        p = torch.cat([params[n].reshape(*lead, -1) for n in self.names], dim=-1).to(dtype)
        return (p - self.p_c) / self.p_s

    def params_dict(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`params_vector` (keeps a leading batch dimension)."""
        flat = self.p_c + self.p_s * vector
        lead = flat.shape[:-1]
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape)) if shape else 1
            out[name] = flat[..., start:start + size].reshape(*lead, *shape)
            start += size
        return out


class ChannelCoupling(nn.Module):
    """Learned linear couplings between a device's channels, zero at the start (the physics unchanged).

    On the way in, every input and parameter channel may take a share of every other (an actuator's
    pixels or drive segments leak into their neighbours). What the inputs leak into parameter
    channels varies per sample, so that block is used only when the physics model takes one
    parameter setting per sample (``batched``). On the way out every output takes a share of the
    others (detector bins, scope samples). All in normalised units; ``mix_in``/``mix_out`` are the
    couplings themselves.
    """

    def __init__(self, spec: DeviceSpec, batched: bool = False) -> None:
        super().__init__()
        self.norm = _Normalised(spec)
        self.batched = batched
        n_x, n_p, n_y = spec.input.size, int(self.norm.p_c.numel()), spec.output.size
        self.n_x = n_x
        self.mix_in = nn.Parameter(torch.zeros(n_x + n_p, n_x + n_p))
        self.bias_in = nn.Parameter(torch.zeros(n_x + n_p))
        self.mix_out = nn.Parameter(torch.zeros(n_y, n_y))

    def inputs(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """``(x, params)`` as the device's physics really receives them."""
        nm = self.norm
        xn = (x - nm.x_c) / nm.x_s
        pn = nm.params_vector(params, x.dtype)
        n_x = self.n_x
        w, b = self.mix_in, self.bias_in
        # rows: which channel receives, columns: which one leaks into it
        x_new = xn + xn @ w[:n_x, :n_x].T + (pn @ w[:n_x, n_x:].T + b[:n_x])
        if not nm.names:
            return nm.x_c + nm.x_s * x_new, dict(params)
        p_new = pn + pn @ w[n_x:, n_x:].T + b[n_x:]
        if self.batched:
            p_new = p_new + xn @ w[n_x:, :n_x].T  # one setting per sample from here on
        return nm.x_c + nm.x_s * x_new, {**params, **nm.params_dict(p_new)}

    def outputs(self, y: torch.Tensor, y_mean: torch.Tensor, y_std: torch.Tensor) -> torch.Tensor:
        yn = (y - y_mean) / y_std
        return y + y_std * (yn @ self.mix_out.T)

    def penalty(self) -> torch.Tensor:
        """Squared size of the couplings: a fit adds it, so that only couplings the data ask for grow."""
        return (self.mix_in**2).sum() + (self.bias_in**2).sum() + (self.mix_out**2).sum()


class _MLP(nn.Module):
    """MLP on normalised inputs and parameters; outputs in units of the twin's y_std."""

    def __init__(self, spec: DeviceSpec, hidden: tuple[int, ...], zero_last: bool = False) -> None:
        super().__init__()
        self.norm = _Normalised(spec)
        sizes = [spec.input.size + sum(p.numel for p in spec.params), *hidden, spec.output.size]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*layers[:-1])
        if zero_last:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        nm = self.norm
        xn = (x - nm.x_c) / nm.x_s
        if nm.names:
            pn = nm.params_vector(params, x.dtype)
            xn = torch.cat([xn, pn.expand(x.shape[0], -1) if pn.dim() == 1 else pn], dim=-1)
        return self.net(xn)


class MLPTwin(Twin):
    kind = "mlp"
    batched_params = True

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
        self.batched_params = bool(getattr(model, "batched_params", False))

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model(x, params)


class ResidualTwin(Twin):
    """Physics (calibrated) inside learned channel couplings, plus an optional MLP correction.

    Every learned part starts at zero, so an unfitted residual twin is its physics model.
    ``hidden=()`` leaves the MLP out (couplings only).
    """

    kind = "residual"

    def __init__(self, spec: DeviceSpec, model: PhysicsModel, hidden: tuple[int, ...] = (64, 64),
                 learn: bool = True) -> None:
        super().__init__(spec)
        self.hidden = tuple(int(h) for h in hidden)
        self.model = model.clone()
        self.model.learn_calibration(learn)
        self.batched_params = bool(getattr(model, "batched_params", False))
        self.coupling = ChannelCoupling(spec, batched=self.batched_params)
        self.mlp = _MLP(spec, self.hidden, zero_last=True) if self.hidden else None

    def config(self) -> dict[str, Any]:
        return {"hidden": list(self.hidden)}

    def penalty(self) -> torch.Tensor:
        return self.coupling.penalty()

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        xin, pin = self.coupling.inputs(x, params)
        y = self.coupling.outputs(self.model(xin, pin), self.y_mean, self.y_std)
        return y if self.mlp is None else y + self.y_std * self.mlp(x, params)


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

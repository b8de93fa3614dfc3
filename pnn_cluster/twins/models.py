"""Digital twin models: every twin maps ``(x, params) -> y`` like the device it stands for.

- :class:`MLPTwin`: a neural network (or an ensemble of them) on inputs and parameters, knowing no physics.
- :class:`PhysicsTwin`: the ideal (or user-supplied) physics model with
  learnable calibration constants.
- :class:`ResidualTwin`: physics plus what the physics model leaves out:
  learned couplings between the device's channels on its way in and out
  (crosstalk between actuator pixels or segments, leakage between detector
  bins or samples, the commonest gap of any multi-channel instrument) and,
  optionally, a small MLP correction for the rest.
- :class:`StructuredTwin`: physics with named effects learned inside its dynamics (a structure of
  :mod:`pnn_cluster.twins.structured`; today the plate's: actuator lag, cross-mode stiffness,
  microphone filter).

Which effects each kind can represent (``kind: best`` fits every kind a device allows,
:func:`kinds_for`, and keeps the one best on the early-stopping settings):

============  ==========================================  ==========================================
kind          represents                                  cannot represent
============  ==========================================  ==========================================
physics       what the model's equations say, with its    anything outside the equations: crosstalk,
              calibration constants fitted: gains,        leakage, lags, couplings the model lacks
              offsets, frequencies, lengths, damping      (they bend the constants instead)
              (miscalibration, slow drift)
residual      physics, plus linear (affine) couplings of  an effect inside the dynamics that is not a
              the normalised input and parameter          linear map of the channels (an amplitude-
              channels on the way in (pixel crosstalk,    dependent coupling of modes, friction),
              segment leakage, offsets, an actuator lag   except what its small MLP correction learns
              felt as leakage of each drive segment into  from the samples (as an MLP twin does, but
              the next) and of the output channels on    only of the remainder)
              the way out (detector leakage, a
              microphone's or probe's response), plus an
              MLP correction of the remainder
mlp           any smooth map, given enough settings: no   what few settings cannot pin down: with
              physics assumed, so any device, a user's    settings far apart in many parameters it
              too                                         falls back towards the mean; periodic or
                                                          oscillatory responses need many samples
structured    physics, plus named effects inside its      effects other than its structure's: for the
              dynamics, learned as physical constants:    plate, missing modes, other nonlinearities
              for the plate, a first-order actuator lag,  of the plate or the speaker, detector
              cross-mode cubic stiffness c_mn x_m x_n^2,  crosstalk; only devices whose model has a
              a first-order microphone filter             structure (the plate) have this kind
============  ==========================================  ==========================================

Every learned part of a residual or structured twin starts at zero (the physics model unchanged) and
an MLP twin starts at the mean output; :func:`~pnn_cluster.twins.fit.fit_twin` fits the physics
constants first and keeps a learned part only where it beats the state it started from on held-out
settings, so a residual or structured twin is never worse there than its fitted physics, and an MLP
twin never worse than the mean.

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
from pnn_cluster.twins.structured import STRUCTURES, structure_for

__all__ = ["Twin", "MLPTwin", "PhysicsTwin", "ResidualTwin", "StructuredTwin", "TWIN_KINDS", "build_twin",
           "kinds_for"]


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


#: the prefix of a twin's physics calibration constants among its parameters
CALIBRATION = "model.calibration."


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

    def features(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Normalised inputs and parameters side by side, (batch, n_in + n_params)."""
        nm = self.norm
        xn = (x - nm.x_c) / nm.x_s
        if nm.names:
            pn = nm.params_vector(params, x.dtype)
            xn = torch.cat([xn, pn.expand(x.shape[0], -1) if pn.dim() == 1 else pn], dim=-1)
        return xn

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.net(self.features(x, params))


class MLPTwin(Twin):
    """Networks on normalised inputs and parameters beside a linear map of them; outputs in units of the
    measured spread.

    The linear map (``linear``) carries what is linear in the inputs and settings (most of a driven
    system's response at small drive: a resonator, a filter, a chain of springs), which generalises
    from few settings; the networks learn the rest. ``members`` networks are fitted side by side on
    the same batches from different initial weights and averaged (an ensemble: what one network
    makes up between the settings it saw, the others mostly do not). The linear map and every
    network's last layer start at zero, so an unfitted MLP twin predicts the mean output, and a fit
    keeps that state unless learning beats it on held-out settings.
    """

    kind = "mlp"
    batched_params = True

    def __init__(self, spec: DeviceSpec, hidden: tuple[int, ...] = (256, 256, 256), members: int = 4,
                 linear: bool = True) -> None:
        super().__init__(spec)
        self.hidden = tuple(int(h) for h in hidden)
        if int(members) < 1:
            raise ValueError(f"mlp twin: members must be >= 1, got {members!r}")
        self.members = int(members)
        # the first member keeps the attribute name of twins saved before ensembles existed
        self.mlp = _MLP(spec, self.hidden, zero_last=True)
        self.others = nn.ModuleList(_MLP(spec, self.hidden, zero_last=True) for _ in range(self.members - 1))
        self.has_linear = bool(linear)
        if self.has_linear:
            self.linear = nn.Linear(spec.input.size + sum(p.numel for p in spec.params), spec.output.size)
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def config(self) -> dict[str, Any]:
        return {"hidden": list(self.hidden), "members": self.members, "linear": self.has_linear}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a twin saved before ensembles and the linear map existed (its config names neither, so it is
        # rebuilt with the defaults) had one network and no linear map: it loads as such
        if prefix + "mlp.net.0.weight" in state_dict:
            if self.members > 1 and not any(k.startswith(prefix + "others.") for k in state_dict):
                self.others = nn.ModuleList()
                self.members = 1
            if self.has_linear and prefix + "linear.weight" not in state_dict:
                state_dict[prefix + "linear.weight"] = torch.zeros_like(self.linear.weight)
                state_dict[prefix + "linear.bias"] = torch.zeros_like(self.linear.bias)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _nets(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        z = self.mlp.features(x, params)
        lin = self.linear(z) if self.has_linear else 0.0
        return [lin + m.net(z) for m in (self.mlp, *self.others)]

    def member_outputs(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Each member's prediction, (members, batch, n_out): a fit trains them on their own errors."""
        return torch.stack(self._nets(x, params)) * self.y_std + self.y_mean

    @torch.no_grad()
    def shrink(self, factor: float) -> None:
        """Scale what the twin adds to the mean by ``factor`` (its last layers are linear in it)."""
        last = [m.net[-1] for m in (self.mlp, *self.others)] + ([self.linear] if self.has_linear else [])
        for layer in last:
            layer.weight.mul_(factor)
            layer.bias.mul_(factor)

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.y_mean + self.y_std * (sum(self._nets(x, params)) / self.members)


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

    def fit_stages(self) -> list[tuple[str, tuple[str, ...] | None]]:
        """The physics model's constants first (a physics twin's fit), then the couplings and the MLP
        around them with the constants held (moved at the correction's rate from the start, constants of
        small natural scale would leave their fitted values faster than the correction learns), then
        everything together from there (the constants settle where the correction leaves them: on the
        pendula 2.09x -> 1.89x the floor, on SHG 1.16x -> 1.10x; seed 1, 20,000 samples). Each stage is
        kept only where it helps on the stopping settings."""
        return [("physics", (CALIBRATION,)), ("residual", ("coupling.", "mlp.")), ("joint", None)]

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        xin, pin = self.coupling.inputs(x, params)
        y = self.coupling.outputs(self.model(xin, pin), self.y_mean, self.y_std)
        return y if self.mlp is None else y + self.y_std * self.mlp(x, params)


class StructuredTwin(Twin):
    """The physics (calibrated) with a structure of learned effects inside its dynamics (:mod:`.structured`).

    Only for devices whose physics model has a structure (:data:`~pnn_cluster.twins.structured.STRUCTURES`:
    the plate's modal integrator). Every learned effect starts at zero, so an unfitted structured twin
    is its physics model; a fit moves the calibration constants first, as a physics twin's does.
    """

    kind = "structured"

    def __init__(self, spec: DeviceSpec, model: PhysicsModel, learn: bool = True) -> None:
        super().__init__(spec)
        structure = structure_for(model)
        if structure is None:
            raise ValueError(f"twin kind 'structured' needs a physics model with a learned structure "
                             f"({', '.join(c.__name__ for c in STRUCTURES)}); this device's model is "
                             f"{type(model).__name__}. Allowed for it: {', '.join(kinds_for(model))}")
        self.model = model.clone()
        self.model.learn_calibration(learn)
        self.batched_params = bool(getattr(model, "batched_params", False))
        self.structure = structure(self.model)

    def fit_stages(self) -> list[tuple[str, tuple[str, ...] | None]]:
        return [("physics", (CALIBRATION,)), ("structured", None)]

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.structure(self.model, x, params)


TWIN_KINDS = {"mlp": MLPTwin, "physics": PhysicsTwin, "residual": ResidualTwin, "structured": StructuredTwin}


def kinds_for(model: PhysicsModel | None) -> list[str]:
    """The twin kinds a device with this physics model (None: none) can have, in :data:`TWIN_KINDS` order."""
    if model is None:
        return ["mlp"]
    return [k for k in TWIN_KINDS if k != "structured" or structure_for(model) is not None]


def build_twin(kind: str, spec: DeviceSpec, model: PhysicsModel | None = None, **config: Any) -> Twin:
    """Construct an (unfitted) twin of ``kind``; physics kinds need the device's physics model, and
    ``structured`` one with a structure (:func:`kinds_for` says which kinds a model allows)."""
    if kind not in TWIN_KINDS:
        raise ValueError(f"unknown twin kind {kind!r}; choose one of {sorted(TWIN_KINDS)}")
    if kind == "mlp":
        return MLPTwin(spec, **config)
    if model is None:
        raise ValueError(
            f"twin kind {kind!r} needs a physics model; this device's model() returned None. Use kind 'mlp'."
        )
    return TWIN_KINDS[kind](spec, model, **config)

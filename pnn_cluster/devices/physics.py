"""Differentiable physics models: the user's physics in torch.

A :class:`PhysicsModel` maps ``(x, params)`` to the noise-free output of a
device, differentiably. Its calibration constants (gains, resonance
frequencies, crystal lengths...) are registered with
:meth:`PhysicsModel.add_calibration`; a physics twin makes them learnable and
fits them to measurements, which is how the part of the sim-reality gap that
the model knows about is closed.

Real devices also do things their model leaves out. A system declares such
physics in :attr:`PhysicsModel.UNMODELLED` (name: the physical reason and a
realistic magnitude) and reads its strength from ``self.unmodelled[name]``.
The lab's model (``device.model()``, and every twin built from it) has all of
them at zero and nothing a physics twin can fit reaches them; a simulated
device's true copy sets them (``Imperfections.unmodelled`` scales them).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["PhysicsModel"]


class PhysicsModel(nn.Module):
    """Base class: subclasses implement ``forward(x, params) -> y``.

    ``x`` is (batch, input.size), ``params`` a mapping of name to tensor with
    the shapes of the device spec. Calibration constants live in
    ``self.calibration`` (an ``nn.ParameterDict``), frozen unless
    :meth:`learn_calibration` turns them on.
    """

    #: physics the model's equations leave out: name -> why it exists and how large it is on a real setup
    UNMODELLED: dict[str, str] = {}
    #: forward also takes ``params`` with a leading batch dimension (one setting per sample); twin fits
    #: then draw every step from many settings at once
    batched_params: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.calibration = nn.ParameterDict()
        #: strength of each effect of :attr:`UNMODELLED` (plain numbers, never fitted): zero in the lab's model
        self.unmodelled: dict[str, float] = {}

    def effect(self, name: str) -> float:
        """Strength of one unmodelled effect (0.0 unless a simulator turned it on)."""
        return float(self.unmodelled.get(name, 0.0))

    def with_unmodelled(self, effects: Mapping[str, float]) -> PhysicsModel:
        """A copy with these unmodelled effects on (what the simulated device really does)."""
        unknown = set(effects) - set(self.UNMODELLED)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown unmodelled effect(s) {sorted(unknown)}; "
                             f"this model has {sorted(self.UNMODELLED) or 'none'}")
        out = self.clone()
        out.unmodelled = {k: float(v) for k, v in effects.items()}
        return out

    def add_calibration(self, name: str, value, learnable: bool = False) -> None:
        t = torch.as_tensor(value, dtype=torch.get_default_dtype()).clone()
        self.calibration[name] = nn.Parameter(t, requires_grad=learnable)

    def cal(self, name: str) -> torch.Tensor:
        return self.calibration[name]

    def learn_calibration(self, on: bool = True) -> PhysicsModel:
        for p in self.calibration.values():
            p.requires_grad_(on)
        return self

    def calibration_values(self) -> dict[str, list]:
        return {k: v.detach().cpu().tolist() for k, v in self.calibration.items()}

    def clone(self) -> PhysicsModel:
        return copy.deepcopy(self)

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

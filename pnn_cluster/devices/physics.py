"""Differentiable physics models: the user's physics in torch.

A :class:`PhysicsModel` maps ``(x, params)`` to the noise-free output of a
device, differentiably. Its calibration constants (gains, resonance
frequencies, crystal lengths...) are registered with
:meth:`PhysicsModel.add_calibration`; a physics twin makes them learnable and
fits them to measurements, which is how the sim-reality gap is closed.
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

    def __init__(self) -> None:
        super().__init__()
        self.calibration = nn.ParameterDict()

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

    def set_calibration(self, values: Mapping[str, object]) -> None:
        with torch.no_grad():
            for k, v in values.items():
                self.calibration[k].copy_(torch.as_tensor(v, dtype=self.calibration[k].dtype))

    def clone(self) -> PhysicsModel:
        return copy.deepcopy(self)

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

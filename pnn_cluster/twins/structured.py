"""Learned physics beside a device's own model: what a structured twin adds to a time-domain integrator.

A structure is the device's physics model run with the effects its equations leave out added as
a few learned, physically named constants, every one zero at the start (the model unchanged). It
is the middle ground between a residual twin's generic channel couplings, which no lag or
amplitude-dependent coupling inside the dynamics is, and an MLP, which must learn the whole
device from samples.

:class:`PlateStructure`, for :class:`~pnn_cluster.devices.plate.PlateModel` (the oscillating
plate's modal integrator), learns:

- the actuator's lag: the speaker's force follows its drive through a first-order lag (a voice
  coil's current lags its voltage by ``L_e / R_e``), as the share of the lagged force kept per step;
- cross-mode stiffness: mode ``m`` stiffens with every other mode's squared amplitude,
  ``c_mn x_m x_n^2`` (mid-plane stretching of a plate couples its modes, as the self-Duffing term
  stiffens each with its own);
- the microphone's own response: a first-order low-pass of the summed modal signal, as the share
  of the previous reading kept per step.

Structures are found by the physics model's class (:data:`STRUCTURES`); a device without one has
no structured twin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from pnn_cluster.devices.physics import PhysicsModel
from pnn_cluster.devices.plate import PlateModel

__all__ = ["PlateStructure", "STRUCTURES", "structure_for"]

#: the largest share of the last step a learned lag keeps (1 would freeze the signal)
_MAX_KEEP = 0.999


class PlateStructure(nn.Module):
    """The plate's modal integrator with a learned actuator lag, cross-mode stiffness and microphone filter.

    The integration is the device model's own scheme (semi-implicit Euler at its step, drive held
    per segment, the microphone read after the model's sample steps), taking the model's calibration
    constants as they are; with every learned constant at zero it computes exactly what the model
    does.
    """

    def __init__(self, model: PlateModel) -> None:
        super().__init__()
        m = model.n_modes
        #: share of the lagged actuator force kept per step (0: no lag); exp(-dt / tau) for a lag tau
        self.actuator_keep = nn.Parameter(torch.zeros(()))
        #: cross-mode cubic stiffness c_mn, relative to mode m's linear stiffness (diagonal unused)
        self.cross_stiffness = nn.Parameter(torch.zeros(m, m))
        #: share of the previous microphone reading kept per step (0: an ideal microphone)
        self.mic_keep = nn.Parameter(torch.zeros(()))
        self.register_buffer("off_diagonal", 1.0 - torch.eye(m), persistent=False)

    def time_constants_ms(self, model: PlateModel) -> dict[str, float]:
        """The learned lags as time constants (ms): what a lab compares with the coil's L/R."""
        def tau(keep: torch.Tensor) -> float:
            k = float(keep.detach().clamp(0.0, _MAX_KEEP))
            return model.dt / -math.log(k) if k > 0 else 0.0
        return {"actuator": tau(self.actuator_keep), "microphone": tau(self.mic_keep)}

    def forward(self, model: PlateModel, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dt = model.dt
        w = 2 * math.pi * model.cal("freq")
        w2 = w * w
        keep = 1.0 - 2.0 * dt * model.cal("damping") * w
        kick = -dt * w2
        duff = model.cal("duffing")
        force = (dt * w2 * model.cal("coupling")) * model.drive(x, params).unsqueeze(-1)
        lag = self.actuator_keep.clamp(0.0, _MAX_KEEP)
        mic_keep = self.mic_keep.clamp(0.0, _MAX_KEEP)
        cross = (self.cross_stiffness * self.off_diagonal).T
        gain = model.cal("mic_gain")
        pos = x.new_zeros(x.shape[0], model.n_modes)
        vel = x.new_zeros(x.shape[0], model.n_modes)
        coil = torch.zeros_like(force[:, 0])
        mic = x.new_zeros(x.shape[0])
        want = set(model.samples)
        taken = []
        for k in range(model.n_steps):
            sq = pos * pos
            stiff = torch.addcmul(pos, duff, sq * pos) + pos * (sq @ cross)
            push = force[:, k // model.sps]
            coil = torch.lerp(push, coil, lag)  # exact step of a first-order lag with the drive held
            vel = torch.addcmul(coil, keep, vel)
            vel = torch.addcmul(vel, kick, stiff)
            pos = torch.add(pos, vel, alpha=dt)
            mic = torch.lerp(pos @ gain, mic, mic_keep)
            if k in want:
                taken.append(mic)
        return torch.stack(taken, dim=1)


#: the structure of each physics model class that has one
STRUCTURES: dict[type, type[nn.Module]] = {PlateModel: PlateStructure}


def structure_for(model: PhysicsModel | None) -> type[nn.Module] | None:
    """The structure class for this physics model (None: it has none)."""
    if model is None:
        return None
    for cls, structure in STRUCTURES.items():
        if isinstance(model, cls):
            return structure
    return None

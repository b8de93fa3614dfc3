"""A chain of coupled pendula, the PAT reference code's example system.

Each pendulum is released from rest at an initial angle: the input
``x_i`` in [0, 1] sets ``encoding_i (2 x_i - 1)`` rad on the input pendula
and the trainable ``angle`` (rad) is added on every pendulum. Neighbours are
coupled by springs whose stiffness is trainable (``coupling``, a fraction of
each spring's calibrated full-scale stiffness)::

    theta_i'' = -w0_i^2 sin(theta_i) + k_{i-1} (theta_{i-1} - theta_i)
                + k_i (theta_{i+1} - theta_i) - gamma_i theta_i'

with ``k_i = spring_i * coupling_i`` (open chain, no spring past the ends).
A camera reads the angles of the output pendula after ``T`` = 2 s, about
two periods: long enough for neighbours to exchange energy, short
enough that the angles stay a smooth function of the frequencies a twin fits.
Input and output pendula are spread evenly along the chain.

The integrator is fixed-step semi-implicit (symplectic) Euler over (batch,
pendula); the model *is* that discretisation.

Calibration constants: natural frequencies, full-scale spring stiffnesses,
damping rates and the input encoding gains (the actuators' angle per unit).

Physics the model leaves out (:attr:`OscillatorsModel.UNMODELLED`): the
pendula's shared support, which couples every pendulum to all the others,
and dry friction in the pivots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from pnn_cluster.devices.lab import LABS
from pnn_cluster.devices.physics import PhysicsModel
from pnn_cluster.devices.plate import serial_map
from pnn_cluster.devices.simulated import SimulatedDevice
from pnn_cluster.devices.spec import DeviceSpec, ParamSpec, Port

__all__ = ["OscillatorsModel", "OscillatorsDevice"]


def _spread_evenly(n: int, n_osc: int) -> torch.Tensor:
    """Indices of ``n`` pendula spread evenly along a chain of ``n_osc``."""
    return torch.tensor([math.floor((j + 0.5) * n_osc / n) for j in range(n)], dtype=torch.long)


class OscillatorsModel(PhysicsModel):
    batched_params = True
    UNMODELLED = {
        "support_coupling": "the pendula hang from one beam that gives a little as they swing (Huygens' "
                            "coupling): every pendulum is pulled towards the chain's mean angle, in rad/s^2 per rad "
                            "(0.8: a beam 50 times stiffer than gravity's restoring stiffness)",
        "pivot_friction": "dry (Coulomb) friction of the pivot bearings, as an angular deceleration in rad/s^2, "
                          "smoothed over 0.05 rad/s (0.3: comparable to the viscous damping at a swing's peak)",
    }

    def __init__(self, n_in: int, n_out: int, n_osc: int, duration_s: float = 2.0, n_steps: int = 120) -> None:
        super().__init__()
        if n_osc < max(n_in, n_out, 2):
            raise ValueError(f"oscillators: n_osc ({n_osc}) must be >= max(n_in, n_out, 2) = {max(n_in, n_out, 2)}")
        self.n_in, self.n_out, self.n_osc, self.n_steps = n_in, n_out, n_osc, n_steps
        self.dt = duration_s / n_steps
        dtype = torch.get_default_dtype()
        # slightly detuned pendula (lengths differ by a few percent along the chain), about 1 Hz
        detune = torch.linspace(-0.04, 0.04, n_osc, dtype=dtype)
        self.add_calibration("omega0", 2 * math.pi * (1.0 + detune))  # rad/s
        self.add_calibration("spring", torch.full((n_osc - 1,), 40.0, dtype=dtype))  # rad/s^2 per rad at full scale
        self.add_calibration("damping", torch.full((n_osc,), 0.3, dtype=dtype))  # 1/s
        self.add_calibration("encoding", torch.full((n_in,), 1.3, dtype=dtype))  # rad per unit of (2x - 1)
        self.register_buffer("inputs_at", _spread_evenly(n_in, n_osc), persistent=False)
        self.register_buffer("outputs_at", _spread_evenly(n_out, n_osc), persistent=False)

    def initial_angles(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        theta = params["angle"].to(x.dtype).expand(x.shape[0], -1)
        data = x.new_zeros(x.shape[0], self.n_osc).index_copy(1, self.inputs_at, self.cal("encoding") * (2 * x - 1))
        return theta + data

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dt = self.dt
        # per-step velocity kick of each spring; elementwise ops only (a tiny matmul would spin up BLAS threads)
        k = dt * self.cal("spring") * params["coupling"].to(self.cal("spring").dtype)
        w2 = -dt * self.cal("omega0") ** 2
        keep = 1.0 - dt * self.cal("damping")
        support, friction = self.effect("support_coupling"), self.effect("pivot_friction")
        theta = self.initial_angles(x, params)
        vel = torch.zeros_like(theta)
        for _ in range(self.n_steps):
            # spring force on each link (none past the ends), then its net pull on each pendulum
            sin = serial_map(torch.sin, theta)
            link = torch.nn.functional.pad(k * theta.diff(dim=1), (1, 1))
            pull = link.diff(dim=1)
            if support:
                pull = pull + (dt * support) * (theta.mean(dim=1, keepdim=True) - theta)
            if friction:
                pull = pull - (dt * friction) * torch.tanh(vel / 0.05)
            vel = torch.addcmul(pull, keep, vel)
            vel = torch.addcmul(vel, w2, sin)
            theta = torch.add(theta, vel, alpha=dt)
        return theta[:, self.outputs_at]


class OscillatorsDevice(SimulatedDevice):
    """Simulated chain of coupled pendula: initial angles in, angles after T out."""

    lab_drift = LABS["oscillators"]
    default_imperfections = lab_drift.imperfections(noise=0.02, shot=0.02, latency_call_s=3e-3, latency_sample_s=5e-6)
    unmodelled_effects = {"support_coupling": 0.8, "pivot_friction": 0.3}
    output_scale = 0.5
    output_range = (-math.pi, math.pi)

    def build_spec(self, n_in: int = 12, n_out: int = 12, n_osc: int | None = None, **_: Any) -> DeviceSpec:
        n_osc = n_osc or max(n_in, n_out, 2)
        return DeviceSpec(
            name="oscillators",
            input=Port(n_in, 0.0, 1.0, unit="", doc="initial angle of the input pendula, 0..1 -> -1.3..+1.3 rad"),
            output=Port(n_out, unit="rad", doc="angles of the output pendula after T"),
            params=(
                ParamSpec("angle", (n_osc,), -1.0, 1.0, unit="rad", init=0.0,
                          doc="initial angle added on every pendulum"),
                ParamSpec("coupling", (n_osc - 1,), 0.0, 1.0, unit="", init=0.5,
                          doc="stiffness of each spring between neighbours, as a fraction of full scale"),
            ),
        )

    def build_model(self, n_in: int = 12, n_out: int = 12, n_osc: int | None = None, **_: Any) -> OscillatorsModel:
        return OscillatorsModel(n_in, n_out, n_osc or max(n_in, n_out, 2))

    def calibration_spread(self) -> dict[str, Any]:
        m = self._ideal
        return {
            "omega0": 0.01 * m.cal("omega0").detach().clone(),
            "spring": 0.03 * m.cal("spring").detach().clone(),
            "damping": 0.08 * torch.ones(m.n_osc),
            "encoding": 0.05 * torch.ones(m.n_in),
        }

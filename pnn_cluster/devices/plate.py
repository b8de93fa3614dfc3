"""Oscillating plate driven by a speaker, as in the paper's mechanical PNN.

A speaker drives a thin metal plate with a voltage waveform made of equal
time segments: input segments (``x`` in [0, 1] mapped to [-1, 1] V) and
trainable parameter segments (volts), interleaved evenly so that every part
of the response depends on both. A few flexural modes respond, each a damped
Duffing oscillator::

    x_m'' + 2 zeta_m w_m x_m' + w_m^2 (x_m + duffing_m x_m^3) = w_m^2 coupling_m u(t)

(``duffing_m`` is the Duffing beta relative to the linear stiffness, so that
it stays meaningful when the twin refits the frequency.) A microphone hears
``sum_m mic_gain_m x_m``, sampled at ``n_out`` evenly spaced times.

The integrator is a fixed-step semi-implicit (symplectic) Euler written with
torch ops over (batch, modes): the model *is* that discretisation, so device
and twin agree exactly when their constants do. The window is a few periods
of the modes, which keeps the output a smooth function of the frequencies a
twin fits.

Calibration constants: mode frequencies, damping ratios, Duffing
coefficients, speaker-to-mode coupling and microphone gain of each mode.

Physics the model leaves out (:attr:`PlateModel.UNMODELLED`): the speaker's
voice-coil inductance, and the coupling of the modes through the plate's
stretching.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from pnn_cluster.devices.lab import LABS
from pnn_cluster.devices.physics import PhysicsModel
from pnn_cluster.devices.simulated import SimulatedDevice
from pnn_cluster.devices.spec import DeviceSpec, ParamSpec, Port

__all__ = ["PlateModel", "PlateDevice", "interleave", "sample_steps", "serial_map"]

#: nominal modes of the plate: frequency (kHz), damping ratio, Duffing coefficient,
#: static displacement per volt at the speaker, microphone gain (V per unit displacement).
#: Signs are the mode shapes' signs at the speaker and at the microphone.
_MODES = (
    (0.35, 0.05, 0.30, 1.00, 0.45),
    (0.52, 0.04, 0.25, -0.70, 0.40),
    (0.71, 0.04, 0.35, 0.55, -0.35),
    (0.93, 0.03, 0.30, -0.45, 0.30),
    (1.17, 0.03, 0.25, 0.35, 0.25),
)


def interleave(n_in: int, n_params: int) -> torch.Tensor:
    """Permutation that spreads ``n_params`` parameter segments evenly among ``n_in`` input segments.

    Applied to ``cat([input_segments, param_segments], -1)`` it gives the drive
    waveform's segments in time order.
    """
    slots = sorted([((i + 0.5) / n_in, 0, i) for i in range(n_in)]
                   + [((j + 0.5) / n_params, 1, n_in + j) for j in range(n_params)])
    return torch.tensor([s[2] for s in slots], dtype=torch.long)


def sample_steps(n_steps: int, n_out: int) -> list[int]:
    """Integration steps after which the ``n_out`` evenly spaced samples are taken (the last is the end)."""
    return [round((j + 1) * n_steps / n_out) - 1 for j in range(n_out)]


#: torch runs transcendental kernels (sin, exp, ...) on several threads above 2048 elements
_SERIAL_NUMEL = 2048


def serial_map(fn, t: torch.Tensor) -> torch.Tensor:
    """``fn(t)`` for an elementwise ``fn``, applied to row blocks that torch runs on one thread.

    An integrator calls such a function at every step. On a machine whose
    cores are busy (a lab PC, a shared node), each multi-threaded call can wait
    a whole scheduler tick for its second thread: milliseconds for
    microseconds of work, a second per forward pass. Its backward (``cos``,
    ``exp``...) is split the same way.
    """
    if t.numel() <= _SERIAL_NUMEL:
        return fn(t)
    rows = max(1, _SERIAL_NUMEL // max(1, t[0].numel()))
    return torch.cat([fn(block) for block in t.split(rows)], dim=0)


class PlateModel(PhysicsModel):
    batched_params = True
    UNMODELLED = {
        "coil_time_constant_ms": "the speaker's force follows its coil current, which lags the voltage by "
                                 "L_e/R_e: 0.5 mH over 8 Ohm is 0.0625 ms",
        "mode_coupling": "the plate's mid-plane stretching (von Karman) stiffens every mode with the others' "
                         "amplitudes, not only its own: a cross-Duffing coefficient about half the self terms (0.15)",
    }

    def __init__(self, n_in: int, n_out: int, n_params: int, n_modes: int, window_ms: float = 8.0,
                 steps_per_segment: int | None = None) -> None:
        super().__init__()
        if not 1 <= n_modes <= len(_MODES):
            raise ValueError(f"plate: n_modes must be in 1..{len(_MODES)}, got {n_modes}")
        n_seg = n_in + n_params
        # about 240 steps in all: enough for the fastest (stiffened) mode, few enough to be fast
        sps = steps_per_segment or max(2, math.ceil(240 / n_seg))
        self.n_in, self.n_out, self.n_params, self.n_modes = n_in, n_out, n_params, n_modes
        self.n_steps = n_seg * sps
        if self.n_steps < n_out:
            raise ValueError(f"plate: {self.n_steps} integration steps cannot give {n_out} samples")
        self.sps = sps
        self.dt = window_ms / self.n_steps  # ms
        modes = torch.tensor(_MODES[:n_modes], dtype=torch.get_default_dtype())
        self.add_calibration("freq", modes[:, 0])
        self.add_calibration("damping", modes[:, 1])
        self.add_calibration("duffing", modes[:, 2])
        self.add_calibration("coupling", modes[:, 3])
        self.add_calibration("mic_gain", modes[:, 4])
        self.register_buffer("order", interleave(n_in, n_params), persistent=False)
        self.samples = sample_steps(self.n_steps, n_out)

    def drive(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Speaker voltage per segment, (batch, n_in + n_params), in time order."""
        p = params["drive"].to(x.dtype).expand(x.shape[0], -1)
        return torch.cat([2.0 * x - 1.0, p], dim=-1)[:, self.order]

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dt = self.dt
        w = 2 * math.pi * self.cal("freq")  # rad/ms
        w2 = w * w
        # semi-implicit Euler, constants folded so that each step is five fused torch ops
        keep = 1.0 - 2.0 * dt * self.cal("damping") * w  # velocity kept per step
        kick = -dt * w2
        duff = self.cal("duffing")
        force = (dt * w2 * self.cal("coupling")) * self.drive(x, params).unsqueeze(-1)  # (batch, seg, modes)
        tau, cross = self.effect("coil_time_constant_ms"), self.effect("mode_coupling")
        lag = math.exp(-dt / tau) if tau > 0 else 0.0  # the coil current's share kept per step
        pos = x.new_zeros(x.shape[0], self.n_modes)
        vel = x.new_zeros(x.shape[0], self.n_modes)
        coil = torch.zeros_like(force[:, 0])  # the drive as the coil's current passes it on (a linear lag)
        taken = []
        want = set(self.samples)
        for k in range(self.n_steps):
            stiff = torch.addcmul(pos, duff, pos * pos * pos)
            if cross:
                sq = pos * pos
                stiff = stiff + cross * pos * (sq.sum(-1, keepdim=True) - sq)
            push = force[:, k // self.sps]
            if tau > 0:
                coil = torch.add(push, coil - push, alpha=lag)  # exact step of a first-order lag, held input
                push = coil
            vel = torch.addcmul(push, keep, vel)
            vel = torch.addcmul(vel, kick, stiff)
            pos = torch.add(pos, vel, alpha=dt)
            if k in want:
                taken.append(pos)
        return torch.stack(taken, dim=1) @ self.cal("mic_gain")


class PlateDevice(SimulatedDevice):
    """Simulated oscillating plate: speaker drive waveform -> Duffing plate modes -> microphone."""

    lab_drift = LABS["plate"]
    default_imperfections = lab_drift.imperfections(noise=0.02, shot=0.02, latency_call_s=5e-3, latency_sample_s=10e-6)
    unmodelled_effects = {"coil_time_constant_ms": 0.0625, "mode_coupling": 0.15}
    output_scale = 0.5
    output_range = (-2.5, 2.5)

    def build_spec(self, n_in: int = 12, n_out: int = 12, n_params: int | None = None, n_modes: int = 4,
                   **_: Any) -> DeviceSpec:
        return DeviceSpec(
            name="plate",
            input=Port(n_in, 0.0, 1.0, unit="", doc="drive segment amplitude, 0..1 -> -1..+1 V at the speaker"),
            output=Port(n_out, unit="V", doc="microphone voltage at evenly spaced times"),
            params=(ParamSpec("drive", (n_params or n_in,), -1.0, 1.0, unit="V", init=0.0,
                              doc="trainable speaker-voltage segments, interleaved with the input segments"),),
        )

    def build_model(self, n_in: int = 12, n_out: int = 12, n_params: int | None = None, n_modes: int = 4,
                    **_: Any) -> PlateModel:
        return PlateModel(n_in, n_out, n_params or n_in, n_modes)

    def calibration_spread(self) -> dict[str, Any]:
        m = self._ideal.n_modes
        return {
            "freq": 0.01 * self._ideal.cal("freq").detach().clone(),
            "damping": 0.004 * torch.ones(m),
            "duffing": 0.025 * torch.ones(m),
            "coupling": 0.035 * self._ideal.cal("coupling").detach().abs(),
            "mic_gain": 0.035 * self._ideal.cal("mic_gain").detach().abs(),
        }

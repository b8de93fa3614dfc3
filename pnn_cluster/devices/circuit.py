"""Nonlinear analog circuit: a driven RLC resonator with a diode, as in the paper's electronic PNN.

An arbitrary waveform generator drives a series R-L into a node that has a
capacitor C and a diode D to ground. The drive is made of equal time
segments: input segments (``x`` in [0, 1] mapped to [-1, 1] V) interleaved
with trainable parameter segments (volts). An oscilloscope samples the node
voltage ``v`` at ``n_out`` evenly spaced times (8-bit by default)::

    L di/dt = V_drive(t) - R i - v
    C dv/dt = i - I_s (exp(v / (n V_T)) - 1)

The (Schottky) diode clips positive swings near 0.2 V while negative swings
ring freely, so the response is a strongly asymmetric, history-dependent
function of drive and parameters.

Units keep every number O(1): time in us, current in mA, R in kOhm, L in mH,
C in nF (then R i, L di/dt and i dt / C are all in volts). The diode is stiff
when it conducts (C / g_D is far below the time step), so its current is
linearised about the present voltage and taken implicitly (a
Rosenbrock-Euler step): stable at any conductance, smooth and
differentiable. Its exponent is capped far beyond any voltage the circuit
reaches, so that no value can overflow.

Calibration constants: R, L, C, the diode's log saturation current and
ideality factor, and the scope's gain and offset.

Physics the model leaves out (:attr:`CircuitModel.UNMODELLED`): the diode's
voltage-dependent junction capacitance, and a 10x probe whose compensation is
slightly off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from pnn_cluster.devices.lab import LABS
from pnn_cluster.devices.physics import PhysicsModel
from pnn_cluster.devices.plate import interleave, sample_steps, serial_map
from pnn_cluster.devices.simulated import SimulatedDevice
from pnn_cluster.devices.spec import DeviceSpec, ParamSpec, Port

__all__ = ["CircuitModel", "CircuitDevice"]

#: thermal voltage at room temperature, V
V_T = 0.02585
#: cap on the diode law's exponent: a current of ~1e17 I_s, far past any voltage the circuit reaches,
#: there only so that no value can overflow
_EXP_CAP = 40.0
#: junction potential (V), grading coefficient and SPICE's forward-bias linearisation point of a Schottky junction
_PHI_J, _M_J, _FC = 0.35, 0.5, 0.5
#: a 10x probe's compensation time constant (us): its 9 MOhm tip resistor against cable and scope capacitance
_PROBE_TAU_US = 100.0


def junction_capacitance(v: torch.Tensor, cj0: float) -> torch.Tensor:
    """Depletion capacitance (nF) of the diode at ``v`` (V): ``cj0 / (1 - v/phi)^m``, linear past ``FC phi``."""
    u = v / _PHI_J
    below = cj0 * (1.0 - u.clamp(max=_FC)) ** (-_M_J)
    above = cj0 * (1.0 - _FC) ** (-1.0 - _M_J) * (1.0 - _FC * (1.0 + _M_J) + _M_J * u)
    return torch.where(u < _FC, below, above)


class CircuitModel(PhysicsModel):
    batched_params = True
    UNMODELLED = {
        "junction_capacitance": "the diode's depletion capacitance at zero bias (nF), in parallel with C and "
                                "rising as the junction is forward biased: 0.15 nF for a 1 A Schottky rectifier "
                                "of the 1N5819 class",
        "probe_compensation": "a 10x probe compensated by eye on the scope's calibrator is a few percent off: "
                              "frequencies above 1/(2 pi 100 us) read this much too high (3%)",
    }

    def __init__(self, n_in: int, n_out: int, n_params: int, window_us: float = 36.0,
                 steps_per_segment: int | None = None) -> None:
        super().__init__()
        n_seg = n_in + n_params
        sps = steps_per_segment or max(2, math.ceil(160 / n_seg))
        self.n_in, self.n_out, self.n_params = n_in, n_out, n_params
        self.n_steps = n_seg * sps
        if self.n_steps < n_out:
            raise ValueError(f"circuit: {self.n_steps} integration steps cannot give {n_out} samples")
        self.sps = sps
        self.dt = window_us / self.n_steps  # us
        self.add_calibration("R", 0.25)  # kOhm: Q = sqrt(L/C)/R = 4
        self.add_calibration("L", 1.0)  # mH
        self.add_calibration("C", 1.0)  # nF: f0 = 159 kHz, about 6 periods in the window
        self.add_calibration("log_is", math.log(1e-2))  # ln(I_s / mA): a 10 uA Schottky junction
        self.add_calibration("ideality", 1.2)
        self.add_calibration("scope_gain", 1.0)
        self.add_calibration("scope_offset", 0.0)  # V
        self.register_buffer("order", interleave(n_in, n_params), persistent=False)
        self.samples = sample_steps(self.n_steps, n_out)

    def drive(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Generator voltage per segment, (batch, n_in + n_params), in time order."""
        p = params["drive"].to(x.dtype).expand(x.shape[0], -1)
        return torch.cat([2.0 * x - 1.0, p], dim=-1)[:, self.order]

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dt = self.dt
        R, L, C = self.cal("R"), self.cal("L"), self.cal("C")
        inv_nvt = 1.0 / (self.cal("ideality") * V_T)
        i_s = torch.exp(self.cal("log_is"))
        keep_i = 1.0 - dt * R / L
        kick = -dt / L
        h = dt / C
        g_s = h * i_s * inv_nvt  # h * g_D = g_s * exp(v / n V_T)
        one = x.new_ones(())
        vd = (dt / L) * self.drive(x, params)  # (batch, seg): the drive's share of each current step
        i = x.new_zeros(x.shape[0])
        v = x.new_zeros(x.shape[0])
        cj0, probe = self.effect("junction_capacitance"), self.effect("probe_compensation")
        v_slow = x.new_zeros(x.shape[0])  # the probe's view of v through its compensation time constant
        taken = []
        want = set(self.samples)
        for k in range(self.n_steps):
            # inductor current first (explicit), then the node voltage with the diode current
            # linearised about v and taken implicitly: v += h (i - I_D) / (1 + h g_D)
            i = torch.addcmul(vd[:, k // self.sps], keep_i, i)
            i = torch.addcmul(i, kick, v)
            e = serial_map(torch.exp, (v * inv_nvt).clamp(max=_EXP_CAP))
            if cj0:
                hv = dt / (C + junction_capacitance(v, cj0))
                step = torch.addcmul(i + i_s, -i_s, e) / torch.addcmul(one, hv * i_s * inv_nvt, e)
                v = torch.addcmul(v, hv, step)
            else:
                step = torch.addcmul(i + i_s, -i_s, e) / torch.addcmul(one, g_s, e)
                v = torch.addcmul(v, h, step)
            if probe:
                v_slow = v_slow + (dt / _PROBE_TAU_US) * (v - v_slow)
            if k in want:
                taken.append(v + probe * (v - v_slow) if probe else v)
        return self.cal("scope_gain") * torch.stack(taken, dim=1) + self.cal("scope_offset")


class CircuitDevice(SimulatedDevice):
    """Simulated analog circuit: waveform generator -> RLC with diode -> 8-bit oscilloscope."""

    lab_drift = LABS["circuit"]
    default_imperfections = lab_drift.imperfections(noise=0.02, shot=0.02, quant_bits=8,
                                                    latency_call_s=2e-3, latency_sample_s=2e-6)
    unmodelled_effects = {"junction_capacitance": 0.15, "probe_compensation": 0.03}
    output_scale = 0.4
    #: the scope's vertical range: the diode holds the top below about +0.4 V, ringing reaches about -1.7 V
    #: (only a constant full-negative drive touches the bottom rail)
    output_range = (-1.8, 0.5)

    def build_spec(self, n_in: int = 12, n_out: int = 12, n_params: int | None = None, **_: Any) -> DeviceSpec:
        return DeviceSpec(
            name="circuit",
            input=Port(n_in, 0.0, 1.0, unit="", doc="drive segment amplitude, 0..1 -> -1..+1 V from the generator"),
            output=Port(n_out, unit="V", doc="oscilloscope samples of the diode node voltage"),
            params=(ParamSpec("drive", (n_params or n_in,), -1.0, 1.0, unit="V", init=0.0,
                              doc="trainable generator-voltage segments, interleaved with the input segments"),),
        )

    def build_model(self, n_in: int = 12, n_out: int = 12, n_params: int | None = None, **_: Any) -> CircuitModel:
        return CircuitModel(n_in, n_out, n_params or n_in)

    def calibration_spread(self) -> dict[str, Any]:
        return {
            "R": 0.02,
            "L": 0.07,
            "C": 0.06,
            "log_is": 0.7,
            "ideality": 0.06,
            "scope_gain": 0.03,
            "scope_offset": 0.02,
        }

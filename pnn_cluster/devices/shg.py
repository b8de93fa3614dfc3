"""Broadband second-harmonic generation (SHG) optics, as in the paper's optical PNN.

A femtosecond pulse's spectrum is split over the pixels of a pulse shaper.
Inputs and trainable parameters are written as spectral phases: data pixels
carry ``pi * x + theta``, the other pixels ``theta`` alone. The shaped pulse
passes a thin chi(2) crystal; its second-harmonic field is the
self-convolution of the fundamental spectrum, filtered by the crystal's
phase matching, and a spectrometer integrates ``|E_SH|^2`` into output bins.

Calibration constants (what a real setup gets slightly wrong): the spectral
envelope's centre and width, each pixel's voltage-to-phase gain and phase
offset, the crystal's phase-matching length, and each spectrometer bin's gain.

Physics the model leaves out (:attr:`SHGModel.UNMODELLED`): pixel crosstalk
in the pulse shaper and the spectrometer's finite resolution.
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

__all__ = ["SHGModel", "SHGDevice"]


def _blend_neighbours(t: torch.Tensor, share: float) -> torch.Tensor:
    """Each entry keeps ``1 - 2 share`` of itself and takes ``share`` of each neighbour (ends reflect)."""
    if share == 0.0:
        return t
    padded = torch.cat([t[..., :1], t, t[..., -1:]], dim=-1)
    return (1.0 - 2.0 * share) * t + share * (padded[..., :-2] + padded[..., 2:])


class SHGModel(PhysicsModel):
    batched_params = True
    UNMODELLED = {
        "pixel_crosstalk": "fringing fields between liquid-crystal pixels: each pixel's phase takes this share of "
                           "each neighbour's (4% on a 128-pixel LC shaper whose pixels are a few LC thicknesses "
                           "wide)",
        "spectrometer_leakage": "finite spectrometer resolution (slit image and grating): this share of the "
                                "power at each resolved SH frequency lands on each neighbouring one (3%)",
    }

    def __init__(self, n_in: int, n_out: int, n_pixels: int) -> None:
        super().__init__()
        if n_pixels < n_in:
            raise ValueError(f"SHG: n_pixels ({n_pixels}) must be >= n_in ({n_in})")
        if n_pixels % n_out:
            raise ValueError(f"SHG: n_pixels ({n_pixels}) must be a multiple of n_out ({n_out})")
        self.n_in, self.n_out, self.n_pixels = n_in, n_out, n_pixels
        self.add_calibration("env_center", (n_pixels - 1) / 2)
        self.add_calibration("env_width", n_pixels / 2.5)
        self.add_calibration("phase_gain", torch.ones(n_pixels))
        self.add_calibration("phase_offset", torch.zeros(n_pixels))
        self.add_calibration("crystal_length", 1.0)
        self.add_calibration("bin_gain", torch.ones(n_out))
        k = torch.arange(n_pixels, dtype=torch.get_default_dtype())
        self.register_buffer("pixel", k, persistent=False)
        # second-harmonic frequencies, centred; the spectrometer sees the central n_pixels of them
        s = torch.arange(2 * n_pixels - 1, dtype=torch.get_default_dtype())
        self.register_buffer("sh_freq", (s - (n_pixels - 1)) / n_pixels, persistent=False)
        lo = n_pixels // 2
        self.window = (lo, lo + n_pixels)
        # counts are normalised to the peak bin of a transform-limited pulse, so outputs are O(0.1-1)
        with torch.no_grad():
            flat = self._spectrum(torch.zeros(1, n_pixels))
            self.register_buffer("norm", flat.max().clamp_min(1e-12).reshape(()), persistent=False)

    def _spectrum(self, phase: torch.Tensor) -> torch.Tensor:
        phase = _blend_neighbours(phase, self.effect("pixel_crosstalk"))
        amp = torch.exp(-((self.pixel - self.cal("env_center")) / self.cal("env_width")) ** 2)
        field = amp * torch.exp(1j * (self.cal("phase_gain") * phase + self.cal("phase_offset")))
        n = 2 * self.n_pixels
        fw = torch.fft.fft(field, n=n, dim=-1)
        sh = torch.fft.ifft(fw * fw, n=n, dim=-1)[..., : 2 * self.n_pixels - 1]
        pm = torch.sinc(self.cal("crystal_length") * self.sh_freq)
        power = _blend_neighbours((sh.abs() ** 2) * pm**2, self.effect("spectrometer_leakage"))
        lo, hi = self.window
        bins = power[..., lo:hi].reshape(*power.shape[:-1], self.n_out, -1).sum(-1)
        return bins

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        theta = params["phase"]
        data = torch.nn.functional.pad(math.pi * x, (0, self.n_pixels - self.n_in))
        phase = data + theta
        return self.cal("bin_gain") * self._spectrum(phase) / self.norm


class SHGDevice(SimulatedDevice):
    """Simulated broadband SHG: pulse shaper (phase) -> chi(2) crystal -> spectrometer."""

    lab_drift = LABS["shg"]
    default_imperfections = lab_drift.imperfections(noise=0.01, shot=0.01, latency_call_s=2e-3, latency_sample_s=5e-6)
    unmodelled_effects = {"pixel_crosstalk": 0.04, "spectrometer_leakage": 0.03}
    output_scale = 0.3
    output_range = (0.0, 1.5)

    def build_spec(self, n_in: int = 12, n_out: int = 12, n_pixels: int | None = None, **_: Any) -> DeviceSpec:
        n_pixels = n_pixels or _default_pixels(n_in, n_out)
        return DeviceSpec(
            name="shg",
            input=Port(n_in, 0.0, 1.0, unit="pi rad", doc="spectral phase on the data pixels"),
            output=Port(n_out, unit="counts (normalised)", doc="spectrometer bins of the SH spectrum"),
            params=(ParamSpec("phase", (n_pixels,), -math.pi, math.pi, unit="rad", init=0.0,
                              doc="pulse-shaper phase on every pixel"),),
        )

    def build_model(self, n_in: int = 12, n_out: int = 12, n_pixels: int | None = None, **_: Any) -> SHGModel:
        return SHGModel(n_in, n_out, n_pixels or _default_pixels(n_in, n_out))

    def calibration_spread(self) -> dict[str, Any]:
        n_pix = self.spec.param("phase").shape[0]
        return {
            "env_center": 0.5,
            "env_width": 0.03 * n_pix / 2.5,
            "phase_gain": 0.03 * torch.ones(n_pix),
            "phase_offset": 0.1 * torch.ones(n_pix),
            "crystal_length": 0.05,
            "bin_gain": 0.03 * torch.ones(self.spec.output.size),
        }


def _default_pixels(n_in: int, n_out: int) -> int:
    n = max(2 * n_in, 2 * n_out, 16)
    return int(math.ceil(n / n_out) * n_out)

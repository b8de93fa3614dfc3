"""A lab's own device module, as a user would write it: the README's "Bring your own device" class.

Tests name these classes by import path (``lab_devices:TanhAmp``), as a
configuration or ``serve-device --device`` does. pytest puts ``tests/`` on
``sys.path`` (rootdir conftest, prepend import mode), so in-process imports
work; subprocesses and Ray workers get it through ``PYTHONPATH``.
"""

import numpy as np
import torch

from pnn_cluster.devices import Device, DeviceSpec, ParamSpec, PhysicsModel, Port


class GainModel(PhysicsModel):
    """y = a tanh(g x): the pipeline's and the recalibration watch's small test device's physics."""

    def __init__(self, a: float = 1.0):
        super().__init__()
        self.add_calibration("a", a)

    def forward(self, x, params):
        return self.cal("a") * torch.tanh(params["g"] * x)


class TanhAmpModel(PhysicsModel):
    """What we believe the amplifier does; `gain_scale` is a calibration constant a twin can fit."""

    def __init__(self):
        super().__init__()
        self.add_calibration("gain_scale", 1.0)

    def forward(self, x, params):
        return torch.tanh(self.cal("gain_scale") * params["gain"] * x)


class TanhAmp(Device):
    spec = DeviceSpec(
        name="tanh_amp",
        input=Port(size=4, low=0.0, high=1.0, unit="V"),
        output=Port(size=4, unit="V"),
        params=(ParamSpec("gain", shape=(4,), low=0.0, high=3.0, unit="V/V", init=1.0),),
    )

    def measure(self, x, params):  # replace with your instrument calls
        return np.tanh(1.05 * params["gain"] * x) + 0.01 * np.random.randn(*x.shape)

    def model(self):  # optional: lets a physics twin start from your physics
        return TanhAmpModel()


class SizedTanhAmp(TanhAmp):
    """The same amplifier with constructor options (what ``--option`` and a config's ``options`` set)."""

    def __init__(self, size: int = 4, noise: float = 0.01, gain_max: float = 3.0, seed: int | None = None):
        self.noise = noise
        # seeded: a copy draws the same noise in every run (the README class draws from numpy's global stream)
        self.rng = np.random.default_rng(seed) if seed is not None else np.random
        super().__init__(DeviceSpec(
            name="tanh_amp",
            input=Port(size=size, low=0.0, high=1.0, unit="V"),
            output=Port(size=size, unit="V"),
            params=(ParamSpec("gain", shape=(size,), low=0.0, high=gain_max, unit="V/V", init=1.0),),
        ))

    def measure(self, x, params):
        return np.tanh(1.05 * params["gain"] * x) + self.noise * self.rng.standard_normal(x.shape)

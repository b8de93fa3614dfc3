"""Torch modules: the physical layer, digital glue layers and stacks mixing them."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from pnn_cluster.devices.base import Device
from pnn_cluster.pat import pat_apply

__all__ = ["PhysicalLayer", "FixedMap", "DigitalStandIn", "Pool", "Affine", "Rescale", "Stack", "MODES",
           "init_rescales_"]

#: pat: physical forward, twin backward. in_silico: twin both ways.
#: oracle: physical forward, exact autograd through the simulator (simulated devices only).
MODES = ("pat", "in_silico", "oracle")


class PhysicalLayer(nn.Module):
    """A physical device as an ordinary ``torch.nn.Module``.

    The device's trainable settings are ``nn.Parameter`` s in ``self.theta``
    (one per :class:`~pnn_cluster.devices.spec.ParamSpec`). They are written
    to the device only when they changed, so a training step writes each
    device once, however many micro-batches it measures.

    Parameters never leave the device limits: the device refuses them (a
    ``LimitError``), :meth:`constrain_` projects them back after an optimizer
    step and reports how many entries it moved, and :meth:`limit_penalty`
    (added to the loss when ``penalty > 0``) keeps them away from the edges,
    as the reference code's Lagrangian term does.
    """

    def __init__(self, device: Device, twin: nn.Module | None = None, mode: str = "pat",
                 penalty: float = 0.0, margin: float = 0.02, name: str | None = None,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        self.device = device
        self.spec = device.spec
        self.name = name or device.spec.name
        # rng: where parameters initialised "uniform" draw from (seeded by whoever builds the stack);
        # one generator for all of them, so two such parameters never start equal
        initial = self.spec.initial_params(rng if rng is not None else np.random.default_rng(0))
        self.theta = nn.ParameterDict({
            p.name: nn.Parameter(torch.as_tensor(initial[p.name], dtype=torch.get_default_dtype()))
            for p in self.spec.params
        })
        self.twin = twin
        self.mode = mode
        self.penalty = float(penalty)
        self.margin = float(margin)
        self._sent: dict[str, np.ndarray] | None = None
        self.samples_measured = 0

    # -- configuration ------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"{self.name}: mode must be one of {MODES}, got {value!r}")
        self._mode = value

    def __setattr__(self, name: str, value) -> None:
        if name == "twin":
            if value is not None:
                if not callable(value):
                    raise TypeError(f"{self.name}: twin must be a module mapping (x, params) -> y")
                for p in value.parameters():
                    p.requires_grad_(False)  # the twin supplies Jacobians; training never moves it
            self._modules["twin"] = value
            return
        super().__setattr__(name, value)

    def params_numpy(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().double().numpy() for k, v in self.theta.items()}

    # -- running -----------------------------------------------------------------------

    def sync_params(self, force: bool = False) -> bool:
        """Write the parameters to the device if they changed since the last write."""
        values = self.params_numpy()
        if (not force and self._sent is not None
                and all(np.array_equal(values[k], self._sent[k]) for k in values)):
            return False
        self.device.set_params(values)
        self._sent = {k: v.copy() for k, v in values.items()}
        return True

    def measure(self, x: torch.Tensor) -> torch.Tensor:
        """Run ``x`` on the device with the current parameters; no autograd."""
        self.sync_params()
        y = self.device.forward(x.detach().cpu().double().numpy())
        self.samples_measured += x.shape[0]
        return torch.from_numpy(y).to(dtype=x.dtype, device=x.device)

    def oracle_model(self) -> nn.Module:
        true_model = getattr(self.device, "true_model", None)
        if true_model is None:
            raise TypeError(
                f"{self.name}: mode 'oracle' needs a simulated device (one with true_model()); "
                f"{type(self.device).__name__} is real hardware. Use 'pat' or 'in_silico'."
            )
        return true_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(self.theta.items())
        if self.mode == "in_silico":
            if self.twin is None:
                raise RuntimeError(f"{self.name}: mode 'in_silico' needs a twin; fit one first")
            return self.twin(x, params)
        y = self.measure(x)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params.values()))
        if not needs_grad:
            return y
        if self.mode == "oracle":
            twin = self.oracle_model()
        else:
            if self.twin is None:
                raise RuntimeError(f"{self.name}: mode 'pat' needs a twin for the backward pass; fit one first")
            twin = self.twin
        return pat_apply(x, y, params, twin=twin)

    # -- limits ---------------------------------------------------------------------------

    def limit_penalty(self) -> torch.Tensor:
        total = torch.zeros(())
        for p in self.spec.params:
            t = self.theta[p.name]
            m = self.margin * (p.high - p.low)
            total = total + torch.relu(t - (p.high - m)).pow(2).sum() + torch.relu((p.low + m) - t).pow(2).sum()
        return self.penalty * total

    @torch.no_grad()
    def constrain_(self) -> int:
        """Project parameters back into the device limits; returns how many entries moved."""
        moved = 0
        for p in self.spec.params:
            t = self.theta[p.name]
            bad = (t < p.low) | (t > p.high)
            n = int(bad.sum())
            if n:
                t.clamp_(p.low, p.high)
                moved += n
        return moved

    def extra_repr(self) -> str:
        return f"device={self.name!r}, mode={self.mode!r}, params={list(self.theta)}"


def _random_orthogonal(n_out: int, n_in: int, generator: torch.Generator) -> torch.Tensor:
    """An ``n_out x n_in`` matrix with orthonormal rows or columns (whichever are fewer), Haar-distributed."""
    q, r = torch.linalg.qr(torch.randn(max(n_out, n_in), min(n_out, n_in), generator=generator,
                                       dtype=torch.get_default_dtype()))
    q = q * torch.sign(torch.diagonal(r))  # the sign fix that makes QR's Q Haar-distributed
    return q if n_out >= n_in else q.T


class FixedMap(nn.Module):
    """A physical layer's digital stand-in for the ablation: a fixed random orthogonal map of its shape
    (drawn once from ``seed``, never trained).

    Orthogonal rather than the identity: a physical layer mixes its channels, and a fixed random mixing
    alone already helps the digital layers around it. What the physics adds is measured against that, not
    against no mixing at all. A stack whose physical layers are all replaced so keeps exactly the same
    trainable digital parameters.
    """

    def __init__(self, n_in: int, n_out: int, name: str = "", seed: int = 0) -> None:
        super().__init__()
        self.name, self.n_in, self.n_out = name, int(n_in), int(n_out)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", _random_orthogonal(self.n_out, self.n_in, g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T

    def extra_repr(self) -> str:
        return f"stands for {self.name!r}, {self.n_in} -> {self.n_out}, fixed random orthogonal"


class DigitalStandIn(nn.Module):
    """A physical layer's trainable digital stand-in with as many trainable parameters as the device has
    settings: the ablation's fixed random orthogonal map plus a trainable MLP ``n_in -> h -> n_out``.

    Like the device, it is a fixed transformation of its shape steered by ``n_params`` trainable numbers:
    ``h`` is the smallest hidden width whose parameter count reaches ``n_params``, so the network it belongs
    to is matched in parameter count to the physical one. The fixed map keeps a small ``h`` (one, for a
    device of a few dozen settings) from becoming a bottleneck that no training could get through.
    """

    def __init__(self, n_in: int, n_out: int, n_params: int, name: str = "", center: float = 0.0,
                 seed: int = 0) -> None:
        super().__init__()
        self.name, self.n_in, self.n_out, self.n_params = name, int(n_in), int(n_out), int(n_params)
        self.hidden = max(1, math.ceil((n_params - n_out) / (n_in + n_out + 1)))
        self.center = float(center)
        self.fixed = FixedMap(n_in, n_out, name=name, seed=seed)
        self.net = nn.Sequential(nn.Linear(n_in, self.hidden), nn.Tanh(), nn.Linear(self.hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self.center
        return self.fixed(x) + self.net(x)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return (f"stands for {self.name!r}, fixed {self.n_in} -> {self.n_out} plus {self.n_in} -> {self.hidden} -> "
                f"{self.n_out}, {self.parameter_count()} parameters for the device's {self.n_params}")


class Pool(nn.Module):
    """Fixed average pooling of square images to ``side x side`` (e.g. MNIST's 28 x 28 to 7 x 7 = 49 features).

    How the paper fed MNIST to its mechanical and electronic networks: a downsampled image written straight
    into the drive waveform, with no trainable digital layer before the device.
    """

    def __init__(self, n_in: int, side: int) -> None:
        super().__init__()
        full = math.isqrt(int(n_in))
        if full * full != n_in:
            raise ValueError(f"Pool: {n_in} features are not a square image")
        if not 1 <= side <= full:
            raise ValueError(f"Pool: size {side} must be from 1 to the image side {full}")
        self.full, self.side = full, int(side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = x.reshape(x.shape[0], 1, self.full, self.full)
        return nn.functional.adaptive_avg_pool2d(img, self.side).reshape(x.shape[0], -1)

    def extra_repr(self) -> str:
        return f"{self.full}x{self.full} -> {self.side}x{self.side}"


class _Standardised(nn.Module):
    """Element-wise ``weight * (x - shift) / scale + bias``, ``shift`` and ``scale`` fixed buffers.

    The data-dependent initialisation sets ``shift`` and ``scale`` to its inputs' mean and spread, so the
    trainable ``weight`` and ``bias`` act in standard units and stay O(1): Adam's steps, about ``lr`` in
    each parameter whatever its gradient's size, are then the same relative change for a feature of
    spread 1e-3 (a device's output, a pooled pixel) as for one of spread 1. Without it a readout weight of
    3 / 1e-3 moves 1e-5 of itself per step and never trains.
    """

    def __init__(self, size: int, weight: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((size,), float(weight)))
        self.bias = nn.Parameter(torch.full((size,), float(bias)))
        self.register_buffer("shift", torch.zeros(size))
        self.register_buffer("scale", torch.ones(size))

    def standardise_(self, mean: torch.Tensor, sd: torch.Tensor, weight: float) -> None:
        """Inputs of this ``mean`` and spread ``sd`` map to ``weight`` x their standard score."""
        with torch.no_grad():
            self.shift.copy_(mean)
            self.scale.copy_(sd)
            self.weight.fill_(weight)
            self.bias.zero_()

    def _standard(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale * self.weight + self.bias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the buffers existed: the identity standardisation they implied
        for name, fill in (("shift", 0.0), ("scale", 1.0)):
            state_dict.setdefault(prefix + name, torch.full_like(getattr(self, name), fill))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Affine(_Standardised):
    """Element-wise ``y = w * (x - shift) / scale + b``: the digital rescaling between physical layers, and a
    readout of the last one (``shift``, ``scale``: see :class:`_Standardised`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._standard(x)


class Rescale(_Standardised):
    """Element-wise affine map squashed into ``[low, high]``, so a device input is never out of range.

    ``y = low + (high - low) * sigmoid(w * (x - shift) / scale + b)``. The bound holds by
    construction, without clipping, so gradients stay informative.
    """

    def __init__(self, size: int, low: float, high: float, weight: float = 1.0, bias: float = 0.0,
                 margin: float = 0.0) -> None:
        super().__init__(size, weight, bias)
        if not np.isfinite(low) or not np.isfinite(high) or not low < high:
            raise ValueError(f"Rescale needs finite low < high, got [{low}, {high}]")
        span = high - low
        self.low = float(low + margin * span)
        self.high = float(high - margin * span)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(self._standard(x))

    @classmethod
    def for_device(cls, device: Device, margin: float = 0.0, **kw) -> Rescale:
        port = device.spec.input
        return cls(port.size, port.low, port.high, margin=margin, **kw)


class Stack(nn.Sequential):
    """Physical and digital layers in any order; helpers act on all physical layers at once."""

    def physical_layers(self) -> list[PhysicalLayer]:
        return [m for m in self.modules() if isinstance(m, PhysicalLayer)]

    def set_mode(self, mode: str) -> Stack:
        for layer in self.physical_layers():
            layer.mode = mode
        return self

    @contextlib.contextmanager
    def mode_as(self, mode: str) -> Iterator[Stack]:
        old = [layer.mode for layer in self.physical_layers()]
        self.set_mode(mode)
        try:
            yield self
        finally:
            for layer, m in zip(self.physical_layers(), old):
                layer.mode = m

    def limit_penalty(self) -> torch.Tensor:
        return sum((layer.limit_penalty() for layer in self.physical_layers()), torch.zeros(()))

    def constrain_(self) -> int:
        return sum(layer.constrain_() for layer in self.physical_layers())

    def samples_measured(self) -> int:
        return sum(layer.samples_measured for layer in self.physical_layers())

    def device_params(self) -> Mapping[str, dict[str, np.ndarray]]:
        return {layer.name: layer.params_numpy() for layer in self.physical_layers()}


def _spread(h: torch.Tensor) -> torch.Tensor:
    """Each feature's standard deviation; a feature that never varies (a pooled corner pixel) keeps 1, so
    it stays at the middle of the range instead of being blown up by 1 / 0."""
    sd = h.std(0)
    return torch.where(sd > 1e-6, sd, torch.ones_like(sd))


@torch.no_grad()
def init_rescales_(stack: Stack, x: torch.Tensor, spread: float = 1.5, logit_scale: float = 3.0) -> None:
    """Data-dependent initialisation: each rescale sees standardised inputs, the final affine sane logits.

    Runs ``x`` through the stack once (physical layers measured on their devices).
    """
    h = x
    mods = list(stack)
    for i, m in enumerate(mods):
        if isinstance(m, Rescale):
            m.standardise_(h.mean(0), _spread(h), spread)
        elif isinstance(m, Affine) and i == len(mods) - 1:
            m.standardise_(h.mean(0), _spread(h), logit_scale)
        h = m(h)

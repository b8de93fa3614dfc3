"""How closely PAT's gradient follows the exact one, on one batch of real measurements."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pnn_cluster.layers import PhysicalLayer

__all__ = ["gradient_agreement"]


def gradient_agreement(stack: nn.Module, x: torch.Tensor, target: torch.Tensor,
                       loss: Callable = torch.nn.functional.cross_entropy) -> dict:
    """Compare PAT's gradient of ``loss(stack(x), target)`` with the oracle's, on the same measurements.

    With measured outputs ``y_l = f_p(x_l, theta_l)``, backpropagation gives every parameter's gradient
    as a product of the digital layers' Jacobians and, at each physical layer, ``J_l^T g_l``, where PAT
    takes ``J_l`` from the twin ``f_m`` and the oracle from the simulator's exact physics, both at the
    measured ``(x_l, theta_l)``. The forward values are the same measurements in both, so the two
    gradients differ only through ``J_m - J_p`` at the points training visits: a cosine near 1 means a
    PAT step moves the parameters as the exact gradient would, and PAT trains like the oracle.

    Each physical layer is measured once; the second pass replays the recorded outputs. Returns
    ``{"cosine", "layers": {name: cosine of that layer's parameters}, "relative_error":
    ||g_twin - g_true|| / ||g_true||, "samples": device samples measured}``. Parameters' ``.grad``
    and the layers' modes are left as they were. Simulated devices with a twin only.
    """
    layers = [m for m in stack.modules() if isinstance(m, PhysicalLayer)]
    for layer in layers:
        if layer.twin is None:
            raise ValueError(f"{layer.name}: gradient_agreement needs a twin (layer.twin) for PAT's backward pass")
        if getattr(layer.device, "true_model", None) is None:
            raise TypeError(f"{layer.name}: gradient_agreement needs a simulated device with true_model(); "
                            f"{type(layer.device).__name__} is real hardware")
    named = [(n, p) for n, p in stack.named_parameters() if p.requires_grad]
    modes = [layer.mode for layer in layers]
    before = sum(layer.samples_measured for layer in layers)
    records: dict[int, list] = {id(layer): [] for layer in layers}
    replaying = [False]

    def patch(layer: PhysicalLayer) -> None:
        measure, oracle, log, cursor = layer.measure, layer.oracle_model, records[id(layer)], [0]

        def wrapped(xi: torch.Tensor) -> torch.Tensor:
            if not replaying[0]:
                # the exact physics at measurement time: drift moves the device after every batch
                log.append((xi.detach().clone(), oracle(), measure(xi)))
                return log[-1][2]
            xr, _, y = log[cursor[0]]
            if xr.shape != xi.shape or not torch.allclose(xr, xi):
                raise RuntimeError(f"{layer.name}: replayed input differs from the measured one")
            cursor[0] += 1
            return y

        layer.measure = wrapped  # instance attributes shadow the methods until deleted
        layer.oracle_model = lambda: log[cursor[0] - 1][1]

    def grads() -> list[torch.Tensor]:
        out = loss(stack(x), target)
        got = torch.autograd.grad(out, [p for _, p in named], allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for (_, p), g in zip(named, got)]

    rng = torch.get_rng_state()  # dropout and the like draw the same masks in both passes
    try:
        for layer in layers:
            patch(layer)
            layer.mode = "pat"
        g_twin = grads()
        replaying[0] = True
        torch.set_rng_state(rng)
        for layer in layers:
            layer.mode = "oracle"
        g_true = grads()
    finally:
        for layer, mode in zip(layers, modes):
            layer.__dict__.pop("measure", None)
            layer.__dict__.pop("oracle_model", None)
            layer.mode = mode

    def flat(gs: list[torch.Tensor], only: set[int] | None = None) -> torch.Tensor:
        parts = [g.reshape(-1).double() for (_, p), g in zip(named, gs) if only is None or id(p) in only]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        na, nb = float(a.norm()), float(b.norm())
        return float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan  # no direction, no angle

    a, b = flat(g_twin), flat(g_true)
    per_layer = {}
    for layer in layers:
        own = {id(p) for p in layer.theta.parameters()}
        per_layer[layer.name] = cosine(flat(g_twin, own), flat(g_true, own))
    nb = float(b.norm())
    return {"cosine": cosine(a, b), "layers": per_layer,
            "relative_error": float((a - b).norm()) / nb if nb > 0 else math.nan,
            "samples": sum(layer.samples_measured for layer in layers) - before}

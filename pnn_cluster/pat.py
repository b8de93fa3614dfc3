"""Physics-aware training: physical forward pass, digital-twin backward pass.

Wright, Onodera et al., Nature 601, 549-555 (2022)::

    forward (in situ):    y = f_p(x, theta)                 # measured on the device
    backward (in silico): g_theta = (d f_m / d theta)^T g_y  # the twin f_m, evaluated
                          g_x     = (d f_m / d x)^T g_y      # at the MEASURED x

The measured output flows on; the twin only supplies the vector-Jacobian
product. :func:`pat_apply` takes the measurement as an argument rather than
calling the device itself, so that a scheduler can run devices asynchronously
(or on other machines) and attach the autograd node afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = ["twin_vjp", "pat_apply", "VJP"]

#: (x, params, grad_y) -> (grad_x or None, {name: grad_param})
VJP = Callable[[torch.Tensor, Mapping[str, torch.Tensor], torch.Tensor],
               tuple[torch.Tensor | None, dict[str, torch.Tensor]]]


def twin_vjp(
    twin: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor],
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    grad_y: torch.Tensor,
    need_x: bool = True,
    need: Sequence[str] | None = None,
    output: bool = False,
) -> tuple:
    """Vector-Jacobian product of ``twin`` at ``(x, params)``: ``(grad_x or None, {name: grad_param})``.

    Only the twin's inputs get gradients; its own weights are left untouched
    (they are detached by ``torch.autograd.grad`` only asking for the inputs).
    With ``output``, the twin's prediction at ``(x, params)`` comes third: it
    is computed for the VJP anyway, and set beside the measurement it says
    how far the twin is from its device at the very points training uses.
    """
    names = list(params) if need is None else list(need)
    with torch.enable_grad():
        xd = x.detach().requires_grad_(need_x)
        pd = {k: v.detach().requires_grad_(k in names) for k, v in params.items()}
        y = twin(xd, pd)
        wrt = ([xd] if need_x else []) + [pd[k] for k in names]
        if not wrt:
            return (None, {}, y.detach()) if output else (None, {})
        grads = torch.autograd.grad(y, wrt, grad_y.to(y.dtype), allow_unused=True)
    gx = grads[0] if need_x else None
    gp = grads[1:] if need_x else grads
    out = {}
    for k, g in zip(names, gp):
        out[k] = torch.zeros_like(pd[k]) if g is None else g
    if need_x and gx is None:
        gx = torch.zeros_like(xd)
    return (gx, out, y.detach()) if output else (gx, out)


class _PAT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vjp: VJP, names: tuple[str, ...], x: torch.Tensor, y_measured: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.vjp = vjp
        ctx.names = names
        ctx.save_for_backward(x, *params)
        return y_measured.detach().clone()

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, *params = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        need = [n for n, flag in zip(ctx.names, ctx.needs_input_grad[4:]) if flag]
        gx, gp = ctx.vjp(x, dict(zip(ctx.names, params)), grad_y, need_x, need)
        grads_p = tuple(gp.get(n) if n in gp else None for n in ctx.names)
        return (None, None, gx if need_x else None, None, *grads_p)


def pat_apply(
    x: torch.Tensor,
    y_measured: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    twin: Callable | None = None,
    vjp: Callable | None = None,
) -> torch.Tensor:
    """Return ``y_measured`` as a differentiable function of ``x`` and ``params``.

    Gradients come from ``vjp(x, params, grad_y, need_x, need)`` if given,
    else from :func:`twin_vjp` on ``twin``, always evaluated at the measured
    input ``x`` and the current ``params``.
    """
    if vjp is None:
        if twin is None:
            raise ValueError("pat_apply needs a twin or a vjp function")

        def vjp(x_, p_, g_, need_x=True, need=None, _twin=twin):
            return twin_vjp(_twin, x_, p_, g_, need_x=need_x, need=need)

    y_measured = y_measured.to(dtype=x.dtype)
    names = tuple(params)
    return _PAT.apply(vjp, names, x, y_measured, *(params[n] for n in names))

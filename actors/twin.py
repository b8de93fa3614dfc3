"""TwinActor: a digital twin replica in its own process (forward, vector-Jacobian product, fit)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from pnn_cluster.training.workers import TwinWorker, twin_payload

__all__ = ["TwinActor", "start_twin", "remote_vjp"]


class _TwinActor(TwinWorker):
    def __init__(self, *args: Any, **kw: Any) -> None:
        torch.set_num_threads(1)
        super().__init__(*args, **kw)


TwinActor = ray.remote(_TwinActor)


def start_twin(twin: torch.nn.Module, num_cpus: float = 0, max_restarts: int = 3, **options: Any):
    """A twin actor rebuilt from ``twin``'s kind, config and tensors (the module itself is not shipped)."""
    p = twin_payload(twin)
    opts = {"num_cpus": num_cpus, "max_restarts": max_restarts, "max_task_retries": -1, **options}
    # a restart rebuilds the twin from these arguments: it comes back as it was shipped, not as last fitted
    return TwinActor.options(**opts).remote(p["kind"], p["spec"], p["model"], p["config"], p["state"], p["dtype"])


def remote_vjp(actor):
    """A ``vjp`` for :func:`~pnn_cluster.pat.pat_apply` that asks a twin actor (one round trip per backward)."""

    def vjp(x: torch.Tensor, params: Mapping[str, torch.Tensor], grad_y: torch.Tensor, need_x: bool = True,
            need: Sequence[str] | None = None):
        gx, gp = ray.get(actor.vjp.remote(x.detach().numpy(), {k: v.detach().numpy() for k, v in params.items()},
                                          grad_y.detach().numpy(), need_x, None if need is None else list(need)))
        # replies read zero-copy are read-only: torch.tensor takes its own (small) copy
        out_x = None if gx is None else torch.tensor(gx, dtype=x.dtype)
        return out_x, {k: torch.tensor(v, dtype=params[k].dtype) for k, v in gp.items()}

    return vjp

"""One batch through the micro-batch pipeline: the event loop over pending calls, and the backward passes.

:class:`BatchRun` is what :class:`~pnn_cluster.training.pipeline.PipelineExecutor`
makes of each training step or evaluation (see that module for the schedule
it keeps): it measures every micro-batch stage by stage, waiting on device
calls and twin VJPs through the executor's backend, retries failed calls under
its fault policy, and makes the gradients, streamed or in one replay.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pnn_cluster.layers import PhysicalLayer
from pnn_cluster.pat import pat_apply, twin_vjp
from pnn_cluster.training.backends import CallTimeout
from pnn_cluster.training.faults import NoReplicaLeft
from pnn_cluster.training.pools import Replica, StagePool
from pnn_cluster.training.workers import params_version

if TYPE_CHECKING:
    from pnn_cluster.training.pipeline import PipelineExecutor

__all__ = ["BatchRun"]


@dataclass(eq=False)
class _Micro:
    index: int
    rows: slice
    h: torch.Tensor | None
    pos: int = 0
    x_sent: np.ndarray | None = None
    attempts: collections.Counter = field(default_factory=collections.Counter)
    #: stage position -> (input sent, measurement, replica that measured it)
    measured: dict[int, tuple[np.ndarray, np.ndarray, Replica]] = field(default_factory=dict)
    #: streamed backward: gradient of each parameter from this micro-batch
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    #: stage position -> the dtype its measurement took on in the stack (that of the values sent)
    dtypes: dict[int, torch.dtype] = field(default_factory=dict)
    backward_done: bool = False


class _Stage:
    """One physical layer during one call: its pool and the parameters of this step."""

    def __init__(self, pool: StagePool) -> None:
        layer = pool.layer
        self.pool = pool
        self.layer = layer
        self.params_np = layer.params_numpy()
        self.version = params_version(self.params_np)
        self.params = dict(layer.theta.items())
        self.trainable = any(p.requires_grad for p in self.params.values())
        self._oracles: dict[int, nn.Module] = {}

    def vjp_at(self, rep: Replica, x_measured: torch.Tensor, y_measured: torch.Tensor | None = None,
               observer: Any = None) -> Callable:
        """``rep``'s vector-Jacobian product, evaluated at the input it measured.

        With an ``observer`` (mode 'pat'), the twin's prediction there is handed to it beside ``y_measured``.
        """
        layer = self.layer
        if layer.mode == "oracle":
            if id(rep) not in self._oracles:
                self._oracles[id(rep)] = rep.handle.true_model()
            twin = self._oracles[id(rep)]
        else:
            twin = rep.twin if rep.twin is not None else layer.twin
            if twin is None:
                raise RuntimeError(f"{layer.name}: mode 'pat' needs a twin for the backward pass of replica "
                                   f"{rep.name}; fit one first")

        if observer is None or layer.mode != "pat":
            def vjp(x, params, grad_y, need_x=True, need=None):
                return twin_vjp(twin, x_measured, params, grad_y, need_x=need_x, need=need)
        else:
            def vjp(x, params, grad_y, need_x=True, need=None):
                gx, gp, y = twin_vjp(twin, x_measured, params, grad_y, need_x=need_x, need=need, output=True)
                observer.observe(layer.name, rep, self.params_np, x_measured.numpy(), y_measured.numpy(), y.numpy())
                return gx, gp

        return vjp



class BatchRun:
    """One batch through the pipeline.

    First every micro-batch is measured, stage by stage, in an event loop over
    pending device calls (no autograd: only values travel). Then, when
    training, the batch is replayed through the stack with autograd, the
    measured outputs standing in for the physical layers, and one backward
    pass makes the gradients.
    """

    def __init__(self, ex: PipelineExecutor, model: nn.Module, x: torch.Tensor, slices: list[slice],
                 target: torch.Tensor | None = None, loss_fn=None) -> None:
        self.ex = ex
        self.plan = ex._plan(model)
        self.grad = torch.is_grad_enabled()
        self.x, self.target, self.loss_fn, self.n = x, target, loss_fn, x.shape[0]
        self.stages: dict[int, _Stage] = {}
        for pos, m in enumerate(self.plan):
            if isinstance(m, PhysicalLayer) and m.mode != "in_silico":
                self.stages[pos] = _Stage(ex.pool(m))
        for st in self.stages.values():
            for rep in st.pool.active:
                rep.in_flight = 0  # calls left over from a step that raised are no longer ours
        self.queues = {pos: collections.deque() for pos in self.stages}
        self.order = sorted(self.stages, reverse=True)  # later stages first: a batch finishes sooner
        self.sequential = ex.config.schedule == "sequential"
        self.depth = 1 if self.sequential else ex.config.depth
        self.micros = [_Micro(k, sl, x[sl]) for k, sl in enumerate(slices)]
        self.outputs: list[torch.Tensor | None] = [None] * len(slices)
        self.pending: dict[Any, tuple[_Micro, int, Replica]] = {}
        # each replica's calls in the order sent, and replies that came in ahead of an earlier one
        self.sent: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.early: set[Any] = set()
        self.loss, self.correct, self.device_samples = 0.0, 0, 0
        self._waiting = collections.deque(self.micros)
        #: when each device call is overdue (its replica's timeout_s, times the calls queued ahead of it)
        self.deadline: dict[Any, float] = {}
        #: streamed backward: pending VJP calls -> (micro-batch, stage index, replica, twin handle, grad_y,
        #: the handle's TwinPool.loads when sent)
        self.vjps: dict[Any, tuple[_Micro, int, Replica, Any, torch.Tensor, int]] = {}
        self.observer = ex.observer if self.loss_fn is not None and self.grad else None
        self.stream = self.loss_fn is not None and self.grad and self._streams()
        if self.stream:
            self._plan_stream()

    def go(self) -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            self._measure()
        if self.loss_fn is not None:
            t1 = time.perf_counter()
            if self.stream:
                self._apply_streamed_grads()
            else:
                with torch.set_grad_enabled(self.grad):
                    self._backward()
            # where a training step's time goes (the executor's stats, a run's `executor` figures): waiting for
            # the batch's measurements (and, streamed, its twins' VJPs), then the backward pass after them
            self.ex.stats["measure_s"] += t1 - t0
            self.ex.stats["backward_s"] += time.perf_counter() - t1

    # -- measuring ---------------------------------------------------------------------------

    def _measure(self) -> None:
        self._release()
        while self.pending or self.vjps or any(self.queues.values()) or self._waiting:
            self._dispatch()
            if not self.pending and not self.vjps:
                if self._waiting:
                    self._release()
                    continue
                raise RuntimeError("pipeline: micro-batches are queued but no call is in flight")  # pragma: no cover
            calls = [c for c in self.pending if c not in self.early] + list(self.vjps)
            done = self.ex.backend.wait(calls, timeout=self._next_deadline()) if calls else []
            if not done:
                self._expire()
                continue
            for call in done:
                if call in self.vjps:
                    self._vjp_done(call)
                elif call in self.pending:
                    self._arrived(call)

    def _next_deadline(self) -> float | None:
        if not self.deadline:
            return None
        return max(0.0, min(self.deadline.values()) - time.monotonic())

    def _expire(self) -> None:
        """Device calls past their deadline fail with :class:`CallTimeout` (and are retried by the policy)."""
        now = time.monotonic()
        for call, when in list(self.deadline.items()):
            if when > now or call not in self.pending:
                continue
            mb, pos, rep = self.pending.pop(call)
            del self.deadline[call]
            self.early.discard(call)
            rep.in_flight = max(0, rep.in_flight - 1)
            sent = self.sent[id(rep)]
            if call in sent:
                sent.remove(call)
            self.ex.stats["timeouts"] += 1
            self._failed(mb, pos, rep, CallTimeout(f"device {rep.name}: no reply within its timeout_s of "
                                                   f"{rep.timeout_s:g} s"))
            self._drain(rep)

    def _arrived(self, call: Any) -> None:
        """Take a replica's replies in the order its calls were sent.

        The device measured them in that order, but replies may overtake each
        other on the way back; taken as they come, the next stage would see
        micro-batches in another order, and a rerun would not measure the same.
        """
        rep = self.pending[call][2]
        self.early.add(call)
        self._drain(rep)

    def _drain(self, rep: Replica) -> None:
        sent = self.sent[id(rep)]
        while sent and sent[0] in self.early:
            first = sent.popleft()
            self.early.discard(first)
            self._complete(first)

    def _release(self) -> None:
        """Start micro-batches: all at once when pipelined, the next one when the last finished if not."""
        while self._waiting and not (self.sequential and self._busy()):
            self._advance(self._waiting.popleft())

    def _busy(self) -> bool:
        return bool(self.pending) or any(self.queues.values()) or bool(self.vjps)

    def _advance(self, mb: _Micro) -> None:
        """Run digital layers until the next physical stage (queue it there) or the end of the stack."""
        while mb.pos < len(self.plan):
            if mb.pos in self.stages:
                mb.x_sent = mb.h.numpy()
                self.queues[mb.pos].append(mb)
                return
            mb.h = self.plan[mb.pos](mb.h)
            mb.pos += 1
        self.outputs[mb.index], mb.h = mb.h, None
        if self.stream:
            self._start_backward(mb)
        if self.sequential:
            self._release()

    def _dispatch(self) -> None:
        for pos in self.order:
            queue, st = self.queues[pos], self.stages[pos]
            while queue:
                if self.sequential and self.pending:
                    return
                rep = st.pool.pick(self.depth)
                if rep is None:
                    break
                mb = queue.popleft()
                send = rep.sent_version != st.version
                call = rep.handle.submit(mb.x_sent, st.params_np if send else None, st.version)
                if send:
                    # optimistic: the replica serves its calls in order, so later ones of this step find them
                    rep.sent_version = st.version
                    self.ex.stats["param_writes"] += 1
                if rep.timeout_s is not None:
                    self.deadline[call] = time.monotonic() + rep.timeout_s * (rep.in_flight + 1)
                rep.in_flight += 1
                self.ex.stats["calls"] += 1
                self.pending[call] = (mb, pos, rep)
                self.sent[id(rep)].append(call)

    def _complete(self, call: Any) -> None:
        mb, pos, rep = self.pending.pop(call)
        self.deadline.pop(call, None)
        rep.in_flight = max(0, rep.in_flight - 1)
        completed = getattr(rep.handle, "completed", None)
        if completed is not None:  # optional: a handle that orders its calls learns which replies arrived
            completed(call)
        st = self.stages[pos]
        try:
            y = self.ex.backend.result(call)
        except Exception as exc:
            if not self.ex.backend.is_device_failure(exc):
                raise
            self._failed(mb, pos, rep, exc)
            return
        if y is None:
            # the device does not hold this step's parameters (restarted, or written by someone else)
            rep.sent_version = None
            self.ex.stats["params_resent"] += 1
            self.queues[pos].appendleft(mb)
            return
        rep.failures = 0
        rep.measured += 1
        n = mb.x_sent.shape[0]
        st.layer.samples_measured += n
        self.device_samples += n
        if not y.flags.writeable:  # zero-copy from a shared object store; torch wants to own writable memory
            y = y.copy()
        mb.measured[pos] = (mb.x_sent, y, rep)
        mb.dtypes[pos] = mb.h.dtype
        mb.h = torch.from_numpy(y).to(dtype=mb.h.dtype)
        mb.x_sent = None
        mb.pos = pos + 1
        self._advance(mb)

    def _failed(self, mb: _Micro, pos: int, rep: Replica, exc: BaseException) -> None:
        st = self.stages[pos]
        pool, policy = st.pool, self.ex.policy
        self.ex.stats["retries"] += 1
        rep.sent_version = None  # a restarted device holds no parameters
        if rep in pool.active:
            rep.failures += 1
            if policy.should_retire(pool.name, rep.name, rep.failures, exc, len(pool.active)):
                pool.retire(rep, exc)
                self.ex.stats["replicas_retired"] += 1
        if not pool.active:
            raise NoReplicaLeft(pool.name, pool.retired) from exc
        mb.attempts[pos] += 1
        policy.check_attempts(pool.name, mb.index, mb.attempts[pos], exc)
        self.queues[pos].appendleft(mb)

    # -- the streamed backward pass ------------------------------------------------------------

    def _streams(self) -> bool:
        mode = self.ex.config.backward
        if mode == "batch" or not self.stages:
            return False
        ready = all(st.layer.mode == "pat" and all(r.twins is not None for r in st.pool.active)
                    for st in self.stages.values())
        if mode == "stream" and not ready:
            raise ValueError("PipelineConfig.backward='stream' needs a twin pool on every replica of every stage "
                             "in mode 'pat'; use 'batch' or 'auto'")
        return ready

    def _plan_stream(self) -> None:
        self.positions = sorted(self.stages)
        self.params_at: dict[int, list[torch.Tensor]] = {}
        self.need_x: dict[int, bool] = {}
        self.by_id: dict[int, torch.Tensor] = {}
        anything = False  # does anything before this position learn?
        for pos, m in enumerate(self.plan):
            if pos in self.stages:
                self.need_x[pos] = anything
                st = self.stages[pos]
                for p in st.params.values():
                    if p.requires_grad:
                        self.by_id[id(p)] = p
                anything = anything or st.trainable
            else:
                ps = [p for p in m.parameters() if p.requires_grad]
                self.params_at[pos] = ps
                for p in ps:
                    self.by_id[id(p)] = p
                anything = anything or bool(ps)

    def _segment(self, leaf: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = leaf
        params: list[torch.Tensor] = []
        for pos in range(start, stop):
            h = self.plan[pos](h)
            params += self.params_at.get(pos, [])
        return h, params

    def _keep_grads(self, mb: _Micro, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        for p, g in zip(params, grads):
            if g is not None:
                prev = mb.grads.get(id(p))
                mb.grads[id(p)] = g if prev is None else prev + g

    def _start_backward(self, mb: _Micro) -> None:
        """The loss of a measured micro-batch, and the VJP of its last stage, sent to that replica's twins."""
        k = len(self.positions) - 1
        last = self.positions[k]
        st = self.stages[last]
        with torch.enable_grad():
            y = torch.from_numpy(mb.measured[last][1]).to(mb.dtypes[last])
            y.requires_grad_(st.trainable or self.need_x[last])
            h, params = self._segment(y, last + 1, len(self.plan))
            weight = (mb.rows.stop - mb.rows.start) / self.n
            loss = self.loss_fn(h, self.target[mb.rows]) * weight
            self.loss += float(loss.detach())
            self.correct += int((h.detach().argmax(-1) == self.target[mb.rows]).sum())
            wrt = ([y] if y.requires_grad else []) + params
            grads = list(torch.autograd.grad(loss, wrt, allow_unused=True)) if wrt and loss.requires_grad else []
        if y.requires_grad and grads:
            gy = grads.pop(0)
            self._keep_grads(mb, params, grads)
            self._send_vjp(mb, k, torch.zeros_like(y) if gy is None else gy)
        else:
            self._keep_grads(mb, params, grads)
            mb.backward_done = True

    def _send_vjp(self, mb: _Micro, k: int, grad_y: torch.Tensor) -> None:
        pos = self.positions[k]
        st = self.stages[pos]
        x_sent, _, rep = mb.measured[pos]
        pool = rep.twins
        handle = pool.pick()
        need = [name for name, p in st.params.items() if p.requires_grad]
        if self.observer is not None:
            call = handle.submit_vjp(x_sent, st.params_np, grad_y.detach().numpy(), self.need_x[pos], need,
                                     pool.version, output=True)
        else:  # a handle of the user's own need not know about outputs
            call = handle.submit_vjp(x_sent, st.params_np, grad_y.detach().numpy(), self.need_x[pos], need,
                                     pool.version)
        pool.busy[id(handle)] += 1
        self.ex.stats["twin_calls"] += 1
        self.vjps[call] = (mb, k, rep, handle, grad_y, pool.loads[id(handle)])

    def _vjp_done(self, call: Any) -> None:
        mb, k, rep, handle, grad_y, loads = self.vjps.pop(call)
        rep.twins.busy[id(handle)] -= 1
        reply = self.ex.backend.result(call)
        if reply is None:
            # a twin restarted from older state: it gets the latest, and the same VJP is asked again
            if rep.twins.restore(handle, loads):
                self.ex.stats["twin_restores"] += 1
            self._send_vjp(mb, k, grad_y)
            return
        gx, gp = reply[0], reply[1]
        pos = self.positions[k]
        st = self.stages[pos]
        if self.observer is not None and len(reply) > 2:
            x_sent, y_measured, _ = mb.measured[pos]
            self.observer.observe(st.layer.name, rep, st.params_np, x_sent, y_measured, np.asarray(reply[2]))
        theta = [st.params[name] for name in gp]
        self._keep_grads(mb, theta, [torch.tensor(np.asarray(g), dtype=p.dtype) for p, g in zip(theta, gp.values())])
        if gx is None:
            mb.backward_done = True
            return
        start = self.positions[k - 1] + 1 if k > 0 else 0
        with torch.enable_grad():
            if k > 0:
                prev = self.stages[self.positions[k - 1]]
                leaf = torch.from_numpy(mb.measured[self.positions[k - 1]][1]).to(mb.dtypes[self.positions[k - 1]])
                leaf.requires_grad_(prev.trainable or self.need_x[self.positions[k - 1]])
            else:
                leaf = self.x[mb.rows]
            h, params = self._segment(leaf, start, pos)
            wrt = ([leaf] if k > 0 and leaf.requires_grad else []) + params
            grads = list(torch.autograd.grad(h, wrt, torch.tensor(np.asarray(gx), dtype=h.dtype),
                                             allow_unused=True)) if wrt and h.requires_grad else []
        if k > 0 and leaf.requires_grad and grads:
            g_leaf = grads.pop(0)
            self._keep_grads(mb, params, grads)
            self._send_vjp(mb, k - 1, torch.zeros_like(leaf) if g_leaf is None else g_leaf)
        else:
            self._keep_grads(mb, params, grads)
            mb.backward_done = True

    def _apply_streamed_grads(self) -> None:
        """Every micro-batch's gradients, summed in micro-batch order (the same step, whatever the reply order)."""
        for pid, p in self.by_id.items():
            total = None
            for mb in self.micros:
                g = mb.grads.get(pid)
                if g is not None:
                    total = g if total is None else total + g
            if total is not None:
                total = total.to(p.dtype).reshape(p.shape)
                p.grad = total.clone() if p.grad is None else p.grad + total

    # -- the backward pass ----------------------------------------------------------------------

    def _backward(self) -> None:
        """Replay the batch with autograd on the measured values; one backward pass per chunk of rows."""
        measured = {pos: (torch.cat([torch.from_numpy(mb.measured[pos][0]) for mb in self.micros]),
                          torch.cat([torch.from_numpy(mb.measured[pos][1]) for mb in self.micros]))
                    for pos in self.stages}
        for chunk in self._chunks():
            a, b = chunk[0].rows.start, chunk[-1].rows.stop
            h = self.x[a:b]
            for pos, m in enumerate(self.plan):
                if pos in self.stages:
                    xs, ys = measured[pos]
                    h = self._attach(self.stages[pos], h, xs[a:b], ys[a:b].to(h.dtype), chunk, pos, a)
                else:
                    h = m(h)
            # the same weighting as micro-batch by micro-batch: any loss reduction gives the same result
            loss = sum(self.loss_fn(h[mb.rows.start - a:mb.rows.stop - a], self.target[mb.rows])
                       * ((mb.rows.stop - mb.rows.start) / self.n) for mb in chunk)
            if loss.requires_grad:
                loss.backward()
            self.loss += float(loss.detach())
            self.correct += int((h.argmax(-1) == self.target[a:b]).sum())

    def _chunks(self) -> list[list[_Micro]]:
        limit = self.ex.config.backward_batch
        if limit is None:
            return [self.micros]
        chunks: list[list[_Micro]] = [[]]
        rows = 0
        for mb in self.micros:
            size = mb.rows.stop - mb.rows.start
            if chunks[-1] and rows + size > limit:
                chunks.append([])
                rows = 0
            chunks[-1].append(mb)
            rows += size
        return chunks

    def _attach(self, st: _Stage, h: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, chunk: list[_Micro],
                pos: int, a: int) -> torch.Tensor:
        """The measured outputs, differentiable through each replica's twin at the inputs it measured."""
        if not (st.trainable or h.requires_grad):
            return ys
        by_replica: dict[int, tuple[Replica, list[torch.Tensor]]] = {}
        for mb in chunk:
            rep = mb.measured[pos][2]
            rows = torch.arange(mb.rows.start - a, mb.rows.stop - a)
            by_replica.setdefault(id(rep), (rep, []))[1].append(rows)
        if len(by_replica) == 1:
            (rep, _), = by_replica.values()
            return pat_apply(h, ys, st.params, vjp=st.vjp_at(rep, xs, ys, self.observer))
        pieces, order = [], []
        for rep, rows in by_replica.values():
            idx = torch.cat(rows)
            pieces.append(pat_apply(h.index_select(0, idx), ys[idx], st.params,
                                    vjp=st.vjp_at(rep, xs[idx], ys[idx], self.observer)))
            order.append(idx)
        order_t = torch.cat(order)
        back = torch.empty_like(order_t)
        back[order_t] = torch.arange(len(order_t))
        return torch.cat(pieces).index_select(0, back)


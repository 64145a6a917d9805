"""A sequence block, run chunk by chunk along the sequence, forward and backward.

The block is a captured graph (``BlockPlan.body``) that is local along the sequence except
through its *carries* (proved by :mod:`longctx_compiler.passes.analysis.sequence_window`): output token
``t`` reads input tokens ``t - H .. t``, and the outputs of its carry ops (scans, causal
attentions) at ``t``. With ``M = ⌈T/Q⌉`` chunks ``[t0, t1)``, each run on the window
``[a, t1)`` (``hc = t0 - a``, at least ``min(H, t0)``):

forward (no autograd)::

    carry = (states: the node's own h0, histories: empty)
    for c in 0..M-1:
        states_saved[c] = carry.states                             # entering chunk c
        out[t0:t1] = body(x[a:t1], carry)[hc:]
        carry.states = the scans' final states; append each attention's own k, v to its history

backward (the adjoint sharding of the block: exact)::

    λ = 0; dK, dV = 0                                             # the carries' adjoints
    for c in M-1..0:
        out_c = body(x[a:t1], states_saved[c], history)          # recomputed, with autograd
        dx[a:t1], dθ, λ += vjp((out_c[hc:], final states, own k, v),
                               (dout[t0:t1], λ, dK[t0:t1], dV[t0:t1]))
        # inside, each attention adds the gradient of the history it read into dK, dV[0:t0]

Every path from an output to an input goes through exactly one chunk's vector-Jacobian
product, crossing chunks only through a carry, whose adjoint carries it (``carry.py``).

Saved for backward: the block's non-sequence inputs (weights), its sequence inputs (on the
device, or in the host pool when ``BlockPlan.host_inputs`` says so), ``M`` states per scan
and, per attention, the K/V history (host pool). Working set: one window's activations.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import sympy
import torch
import torch.fx as fx
from torch import Tensor

from longctx_compiler.runtime.autocast import autocast_as
from longctx_compiler.runtime.host_pool import HostHandle, HostPool, get_default_pool
from longctx_compiler.runtime.sequence_parallel import get_group

from .carry import Carry, KVHistory, offload

__all__ = ["BlockPlan", "block_forward", "block_backward", "chunks", "ordinary_dispatch", "autograd_inside_op", "HostGroup"]


@dataclass(frozen=True)
class BlockPlan:
    """How to run one block chunk by chunk.

    Attributes:
        body: ``body(*tensors, *sizes, carry) -> tuple(outputs)``, the block's graph with its
            carry ops (:func:`~.carry.scan_in_window`, :func:`~.carry.attention_in_window`)
            reading and writing ``carry`` by slot.
        tensor_dims: the sequence dim of each tensor input, None where it has none.
        size_exprs: each integer input that depends on the sequence length, as an
            expression in ``length`` (the window run substitutes the window's length);
            None for the others (passed through).
        length: the sequence-length symbol.
        output_dims: each output's sequence dim.
        halo: H, the tokens before a chunk that its window also reads.
        min_length: the shortest window the body is exact on (a window reaches further back
            to be at least this long; see ``sequence_window``).
        chunk: Q, tokens per chunk, at least ``min_length`` (so the first window is long enough).
        scans: number of scan slots (state carries: selective and SSD scans).
        attentions: number of attention slots (K/V history carries).
        host_inputs: per tensor input, its rank if it waits for the backward in the host
            pool (sequence inputs only), 0 if it is saved on the device; empty: all on the device.
        host_budget: the bound on host-pool bytes this block's copies count against (the
            configured ``host_pool_bytes``); None: the pool's own bound only.
        autocast: the autocast state the block was traced in
            (:func:`~longctx_compiler.runtime.autocast.current_autocast`); every run of the
            body (:meth:`run_body`) is in exactly that state.
        sequence_group: the sequence-parallel group the block's sequence is sharded over
            (chunk-interleaved, :mod:`longctx_compiler.runtime.sequence_parallel`), None when
            it is not. Each attention then exchanges its chunk over the group (Ulysses) and
            keeps the whole group's K/V history for its own heads.
    """

    body: fx.GraphModule
    tensor_dims: tuple[int | None, ...]
    size_exprs: tuple[sympy.Expr | None, ...]
    length: sympy.Symbol
    output_dims: tuple[int, ...]
    halo: int
    min_length: int
    chunk: int
    scans: int = 0
    attentions: int = 0
    host_inputs: tuple[int, ...] = ()
    host_budget: int | None = None
    autocast: tuple[tuple[str, torch.dtype], ...] = ()
    sequence_group: str | None = None

    @property
    def ranks(self) -> int:
        """``P``: how many ranks' chunks make one chunk of the K/V history (1 unsharded)."""
        return 1 if self.sequence_group is None else get_group(self.sequence_group).size

    def run_body(self, *args):
        """``body(*args)`` in the autocast state it was traced in (a bf16 autocast region's
        casts happen again in every chunk, as in the original), whatever the caller's. Only the
        forward: the backward of a chunk runs outside autocast, as autograd's does."""
        with autocast_as(self.autocast):
            return self.body(*args)

    def kept_on_host(self, i: int) -> bool:
        return bool(self.host_inputs) and self.host_inputs[i] > 0

    def seq_len(self, tensors: Sequence[Tensor], shapes: Sequence[Sequence[int]] | None = None) -> int:
        i = next(i for i, d in enumerate(self.tensor_dims) if d is not None)
        return (shapes[i] if shapes is not None else tensors[i].shape)[self.tensor_dims[i]]

    def sizes_at(self, sizes: Sequence[int], n: int) -> list[int]:
        """The integer inputs of a run on ``n`` tokens."""
        return [s if e is None else int(e.subs(self.length, n)) for s, e in zip(sizes, self.size_exprs)]

    def check_sizes(self, shapes: Sequence[Sequence[int]], sizes: Sequence[int]) -> int:
        """The sequence length; raises if an input disagrees with it."""
        t = self.seq_len((), shapes)
        for i, d in enumerate(self.tensor_dims):
            if d is not None and shapes[i][d] != t:
                raise RuntimeError(f"sequence_block: sequence input {i} has length {shapes[i][d]}, expected {t}")
        if list(sizes) != self.sizes_at(sizes, t):
            raise RuntimeError(f"sequence_block: integer inputs {list(sizes)} do not match the sequence length {t} ({self.size_exprs})")
        return t


def chunks(t: int, q: int, halo: int, min_length: int = 1) -> list[tuple[int, int, int]]:
    """``(a, t0, t1)`` per chunk: window start, chunk start and end.

    Every window ``[a, t1)`` holds ``halo`` tokens before its chunk and is at least
    ``min_length`` long (or the whole sequence, when that is shorter) if ``q >= min_length``.
    """
    return [(max(0, min(t0 - halo, min(t, t0 + q) - min_length)), t0, min(t, t0 + q)) for t0 in range(0, t, q)]


def _ordinary_keys() -> tuple[torch._C.DispatchKeySet, torch._C.DispatchKeySet]:
    """The thread-local dispatch key sets an ordinary caller has: the current ones without
    ``ADInplaceOrView`` included and with nothing but the autocast keys excluded."""
    keys = torch._C.DispatchKey
    include = torch._C._dispatch_tls_local_include_set().remove(keys.ADInplaceOrView)
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in dir(keys):
        key = getattr(keys, name)
        if isinstance(key, keys) and not name.startswith("Autocast") and exclude.has(key):
            exclude = exclude.remove(key)
    return include, exclude


@contextlib.contextmanager
def ordinary_dispatch(grad: bool):
    """Run the block's body inside a custom op's implementation as an ordinary caller would.

    A ``torch.library`` op's implementation runs below autograd: the dispatcher excludes the
    autograd keys (and includes ``ADInplaceOrView``) in thread-local state, so tensors made
    there record no graph even under ``enable_grad``; the backward differentiates each chunk
    with autograd, so it needs them back. And the state the op is called in is not always
    the same: the first call of a compiled function (the one that compiles) runs it with
    many more keys excluded (functionalization, functorch, ``PythonTLSSnapshot``, ...), under
    which composite ops take other paths and round differently in the last bit. Both the
    forward and the backward's recomputation therefore run in one fixed state, whatever the
    caller's: the same step is bitwise the same, its first call included.
    """
    include, exclude = _ordinary_keys()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.set_grad_enabled(grad):
        yield


def autograd_inside_op():
    """:func:`ordinary_dispatch` with autograd on (the backward's chunks)."""
    return ordinary_dispatch(True)


class HostGroup:
    """What one forward of a block leaves in the host pool for its backward: the sequence
    inputs kept on the host (``"x<i>"``) and each attention's K/V history (``"k<j>"``, ``"v<j>"``)."""

    def __init__(self, pool: HostPool, handles: dict[str, HostHandle] | None = None):
        self.pool = pool
        self.handles: dict[str, HostHandle] = dict(handles or {})

    def input_window(self, i: int, dim: int, a: int, n: int) -> Tensor:
        return self.pool.prefetch(self.handles[f"x{i}"], a, a + n, dim=dim)

    def histories(self, plan: BlockPlan, length: int) -> list[KVHistory]:
        """Each attention's K/V history of a block run on ``length`` tokens (``P·length``
        positions when the sequence is sharded: the history holds every rank's chunks)."""
        histories = [
            KVHistory(self.pool, length * plan.ranks, plan.chunk, self.handles.get(f"k{j}"), self.handles.get(f"v{j}"), plan.host_budget)
            for j in range(plan.attentions)
        ]
        for j, history in enumerate(histories):
            # The keys' document ids (packed documents, padding), when the forward kept them.
            if f"ids{j}" in self.handles:
                history.ids = self.pool.prefetch(self.handles[f"ids{j}"])
        return histories

    def release(self) -> None:
        for h in self.handles.values():
            h.release()


def _window(plan: BlockPlan, tensors: Sequence[Tensor], a: int, n: int, group: HostGroup | None = None) -> list[Tensor]:
    return [
        t if d is None else (group.input_window(i, d, a, n) if group is not None and plan.kept_on_host(i) else t.narrow(d, a, n))
        for i, (t, d) in enumerate(zip(tensors, plan.tensor_dims))
    ]


def block_forward(
    plan: BlockPlan, tensors: Sequence[Tensor], sizes: Sequence[int], pool: HostPool | None = None
) -> tuple[list[Tensor], list[Tensor], HostGroup]:
    """``(outputs, boundary states per scan [B, D, M·S], host group)``, ``S`` the flattened
    size of the scan's carried state (``N`` for a selective scan, ``P·N`` for an SSD scan).

    The state entering chunk 0 is left zero in the boundary states (the backward uses the
    node's own ``h0`` there). Sequence inputs marked ``host_inputs`` and every attention's K/V
    history are in the returned group's pool buffers.
    """
    t = plan.check_sizes([x.shape for x in tensors], sizes)
    spans = chunks(t, plan.chunk, plan.halo, plan.min_length)
    group = HostGroup(pool or get_default_pool())
    histories = group.histories(plan, t)
    outputs: list[Tensor] | None = None
    boundaries: list[Tensor] = []
    states: list[Tensor | None] = [None] * plan.scans
    try:
        for i, x in enumerate(tensors):
            if plan.kept_on_host(i):
                group.handles[f"x{i}"] = offload(group.pool, x.detach(), plan.host_budget)
        with ordinary_dispatch(False):
            for c, (a, t0, t1) in enumerate(spans):
                hc = t0 - a
                carry = Carry(hc, t0, list(states), histories, plan.attentions, plan.sequence_group)
                outs = plan.run_body(*_window(plan, tensors, a, t1 - a), *plan.sizes_at(sizes, t1 - a), carry)
                if outputs is None:
                    outputs = [o.new_empty(_with(o.shape, d, t)) for o, d in zip(outs, plan.output_dims)]
                    boundaries = [f.new_zeros((*f.shape[:2], len(spans), f.shape[2])) for f in carry.states_out]
                for full, o, d in zip(outputs, outs, plan.output_dims):
                    full.narrow(d, t0, t1 - t0).copy_(o.narrow(d, hc, t1 - t0))
                for s in range(plan.scans):
                    if c:
                        boundaries[s][:, :, c] = states[s]
                    states[s] = carry.states_out[s]
                for j, history in enumerate(histories):
                    history.append(carry.history_start, *carry.own[j])
    except BaseException:
        group.release()
        for h in histories:
            h.release()
        raise
    for j, history in enumerate(histories):
        group.handles.update({f"{name}{j}": h for name, h in history.handles().items()})
    return outputs, [b.flatten(2) for b in boundaries], group


def block_backward(
    plan: BlockPlan,
    tensors: Sequence[Tensor],
    shapes: Sequence[Sequence[int]],
    sizes: Sequence[int],
    boundaries: Sequence[Tensor],
    group: HostGroup,
    grad_outputs: Sequence[Tensor],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """Gradients of every tensor input (None where ``needs`` is False), chunk by chunk.

    ``tensors`` holds the inputs saved on the device; an input kept on the host is read from
    ``group`` (its entry in ``tensors`` only gives dtype and device); ``shapes`` are every
    input's shape.
    """
    t = plan.check_sizes(shapes, sizes)
    spans = chunks(t, plan.chunk, plan.halo, plan.min_length)
    states = [b.view(*b.shape[:2], len(spans), -1) for b in boundaries]
    grads: list[Tensor | None] = [
        torch.zeros(s, dtype=x.dtype, device=x.device) if need and d is not None else None
        for x, s, d, need in zip(tensors, shapes, plan.tensor_dims, needs)
    ]
    # Sequence-free inputs (weights) are the same leaf in every chunk; their gradient adds up.
    leaves_fixed = [x.detach().requires_grad_(need) if d is None else None for x, d, need in zip(tensors, plan.tensor_dims, needs)]
    histories = group.histories(plan, t)
    lams: list[Tensor | None] = [None] * plan.scans
    try:
        for h in histories:
            h.start_backward()
        for c in reversed(range(len(spans))):
            a, t0, t1 = spans[c]
            with autograd_inside_op():
                got, lams = _chunk_vjp(plan, tensors, sizes, needs, leaves_fixed, states, histories, group, grad_outputs, lams, c, spans)
            if got is None:
                continue
            for i, (d, g) in enumerate(zip(plan.tensor_dims, got)):
                if g is None:
                    continue
                if d is None:
                    grads[i] = g if grads[i] is None else grads[i].add_(g)
                else:
                    grads[i].narrow(d, a, t1 - a).add_(g)
    finally:
        for h in histories:
            h.release_grads()
    return [
        (torch.zeros(s, dtype=x.dtype, device=x.device) if g is None else g) if need else None
        for x, s, g, need in zip(tensors, shapes, grads, needs)
    ]


def _chunk_vjp(plan, tensors, sizes, needs, leaves_fixed, states, histories, group, grad_outputs, lams, c, spans):
    """One chunk of the backward: recompute it, then the VJP of its outputs and carries.

    Returns (per-input gradients of the window (None where not needed or unused), λ per scan
    for the chunk before); ``(None, λ)`` when nothing in the chunk needs a gradient. Each
    attention adds the gradient of the history it read into its accumulators as a side effect.
    """
    a, t0, t1 = spans[c]
    hc, n = t0 - a, t1 - t0
    last = c == len(spans) - 1
    window = [
        fixed if d is None else w.detach().requires_grad_(need)
        for w, d, need, fixed in zip(_window(plan, tensors, a, t1 - a, group), plan.tensor_dims, needs, leaves_fixed)
    ]
    h_ins = [s[:, :, c].detach().requires_grad_() if c else None for s in states]
    carry = Carry(hc, t0, h_ins, histories, plan.attentions, plan.sequence_group)
    outs = plan.run_body(*window, *plan.sizes_at(sizes, t1 - a), carry)
    roots, cotangents = [], []
    for o, d, g in zip(outs, plan.output_dims, grad_outputs):
        if o.requires_grad:
            roots.append(o.narrow(d, hc, n))
            cotangents.append(g.narrow(d, t0, n))
    for final, lam in zip(carry.states_out, lams):
        if lam is not None and final.requires_grad:
            roots.append(final)
            cotangents.append(lam)
    if not last:
        # The history's adjoint: what every later chunk's attention read of this chunk's k, v.
        for own, history in zip(carry.own, histories):
            dk, dv = history.grad(carry.history_start, carry.history_start + own[0].shape[2])
            for x, g in zip(own, (dk, dv)):
                if x.requires_grad:
                    roots.append(x)
                    cotangents.append(g.to(x.device, x.dtype))
    wrt = [w for w, need in zip(window, needs) if need]
    h_wrt = [h for h in h_ins if h is not None]
    if not roots or not (wrt or h_wrt):
        return None, [None] * plan.scans
    got = list(torch.autograd.grad(roots, wrt + h_wrt, cotangents, allow_unused=True))
    new_lams = got[len(wrt):] if h_wrt else [None] * plan.scans
    it = iter(got[: len(wrt)])
    return [next(it) if need else None for need in needs], new_lams


def _with(shape: torch.Size, dim: int, n: int) -> tuple[int, ...]:
    s = list(shape)
    s[dim] = n
    return tuple(s)

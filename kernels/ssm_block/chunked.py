"""A sequence block around one selective scan, run chunk by chunk along the sequence.

The block is a captured graph (``BlockPlan.body``) that is local along the sequence except
for its scan (proved by :mod:`longctx_compiler.passes.sequence_window`): output token ``t``
reads input tokens ``t - H .. t`` and the scan's output at ``t``. With ``M = ⌈T/Q⌉``
chunks ``[t0, t1)``, each run on the window ``[t0 - hc, t1)`` (``hc = min(H, t0)``):

forward (no autograd)::

    h = h0
    for c in 0..M-1:
        states[c] = h                                  # the state entering chunk c
        out[t0:t1], h = body(x[t0-hc : t1], hc, h)[hc:]

backward (the adjoint sharding of the block: exact)::

    λ = 0                                              # ∂L/∂(state leaving chunk c)
    for c in M-1..0:
        out_c, h_end = body(x[t0-hc : t1], hc, states[c])        # recomputed, with autograd
        dx[t0-hc : t1], dθ, λ += vjp((out_c[hc:], h_end), (dout[t0:t1], λ))

Inside ``body``, the scan reads its inputs' last ``t1 - t0`` tokens with initial state
``h`` and returns ``y`` padded with ``hc`` leading zeros (those positions only feed output
positions the window drops). Every path from an output to an input goes through exactly one
chunk's vector-Jacobian product, through the state adjoint ``λ`` when it crosses chunks.

Memory: the saved set is the block's inputs plus ``M`` boundary states ``[B, D, N]``; the
working set is one chunk's activations, ``O(Q)`` instead of ``O(T)`` per tensor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

# Registers torch.ops.longctx.selective_scan_fwd.
from longctx_compiler.kernels.selective_scan import op as _scan_op  # noqa: F401

__all__ = ["BlockPlan", "scan_in_window", "block_forward", "block_backward", "chunks"]


@dataclass(frozen=True)
class BlockPlan:
    """How to run one block chunk by chunk.

    Attributes:
        body: ``body(*tensors, *sizes, hc, h_in) -> (*outputs, final_state)``, the block's
            graph with its scan replaced by :func:`scan_in_window`.
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
    """

    body: fx.GraphModule
    tensor_dims: tuple[int | None, ...]
    size_exprs: tuple[sympy.Expr | None, ...]
    length: sympy.Symbol
    output_dims: tuple[int, ...]
    halo: int
    min_length: int
    chunk: int

    def seq_len(self, tensors: Sequence[Tensor]) -> int:
        i = next(i for i, d in enumerate(self.tensor_dims) if d is not None)
        return tensors[i].shape[self.tensor_dims[i]]

    def sizes_at(self, sizes: Sequence[int], n: int) -> list[int]:
        """The integer inputs of a run on ``n`` tokens."""
        return [s if e is None else int(e.subs(self.length, n)) for s, e in zip(sizes, self.size_exprs)]

    def check_sizes(self, tensors: Sequence[Tensor], sizes: Sequence[int]) -> int:
        """The sequence length; raises if an integer input disagrees with it."""
        t = self.seq_len(tensors)
        for i, d in enumerate(self.tensor_dims):
            if d is not None and tensors[i].shape[d] != t:
                raise RuntimeError(f"ssm_block: sequence input {i} has length {tensors[i].shape[d]}, expected {t}")
        if list(sizes) != self.sizes_at(sizes, t):
            raise RuntimeError(f"ssm_block: integer inputs {list(sizes)} do not match the sequence length {t} ({self.size_exprs})")
        return t


def chunks(t: int, q: int, halo: int, min_length: int = 1) -> list[tuple[int, int, int]]:
    """``(a, t0, t1)`` per chunk: window start, chunk start and end.

    Every window ``[a, t1)`` holds ``halo`` tokens before its chunk and is at least
    ``min_length`` long (or the whole sequence, when that is shorter) if ``q >= min_length``.
    """
    return [(max(0, min(t0 - halo, min(t, t0 + q) - min_length)), t0, min(t, t0 + q)) for t0 in range(0, t, q)]


def scan_in_window(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, chunk_size, mode, window, hc, h_in):
    """The block's scan inside a window: scan tokens ``hc..`` from state ``h_in`` (the node's
    own ``h0`` for the first chunk), return ``(y padded with hc leading zeros, final state)``."""
    n = u.shape[-1] - hc

    def own(t):
        return None if t is None else t.narrow(-1, hc, n)

    y, final, _ = torch.ops.longctx.selective_scan_fwd(
        own(u), own(delta), A, own(B), own(C), D, own(z), delta_bias, delta_softplus,
        h0 if h_in is None else h_in, chunk_size, mode, window,
    )
    return (F.pad(y, (hc, 0)) if hc else y), final


@contextlib.contextmanager
def autograd_inside_op():
    """Re-enable autograd inside a custom op's implementation.

    A ``torch.library`` op's implementation runs below autograd: the dispatcher excludes the
    autograd keys (and includes ``ADInplaceOrView``) in thread-local state, so tensors made
    there record no graph even under ``enable_grad``. The block's backward differentiates
    each chunk with autograd, so it restores the dispatch state an ordinary caller has.
    """
    keys = torch._C.DispatchKey
    include = torch._C._dispatch_tls_local_include_set().remove(keys.ADInplaceOrView)
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for k in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(k)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def _window(plan: BlockPlan, tensors: Sequence[Tensor], a: int, n: int) -> list[Tensor]:
    return [t if d is None else t.narrow(d, a, n) for t, d in zip(tensors, plan.tensor_dims)]


def block_forward(plan: BlockPlan, tensors: Sequence[Tensor], sizes: Sequence[int]) -> tuple[list[Tensor], Tensor]:
    """``(outputs, boundary_states [B, D, M·N])``; the state entering chunk 0 is left zero."""
    t = plan.check_sizes(tensors, sizes)
    spans = chunks(t, plan.chunk, plan.halo, plan.min_length)
    outputs: list[Tensor] | None = None
    boundary: Tensor | None = None
    h = None
    with torch.no_grad():
        for c, (a, t0, t1) in enumerate(spans):
            hc = t0 - a
            *outs, final = plan.body(*_window(plan, tensors, a, t1 - a), *plan.sizes_at(sizes, t1 - a), hc, h)
            if outputs is None:
                outputs = [o.new_empty(_with(o.shape, d, t)) for o, d in zip(outs, plan.output_dims)]
                boundary = final.new_zeros((*final.shape[:2], len(spans), final.shape[2]))
            for full, o, d in zip(outputs, outs, plan.output_dims):
                full.narrow(d, t0, t1 - t0).copy_(o.narrow(d, hc, t1 - t0))
            if c:
                boundary[:, :, c] = h
            h = final
    return outputs, boundary.flatten(2)


def block_backward(
    plan: BlockPlan,
    tensors: Sequence[Tensor],
    sizes: Sequence[int],
    boundary: Tensor,
    grad_outputs: Sequence[Tensor],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """Gradients of every tensor input (None where ``needs`` is False), chunk by chunk."""
    t = plan.check_sizes(tensors, sizes)
    spans = chunks(t, plan.chunk, plan.halo, plan.min_length)
    states = boundary.view(*boundary.shape[:2], len(spans), -1)
    grads: list[Tensor | None] = [
        torch.zeros_like(x) if need and d is not None else None for x, d, need in zip(tensors, plan.tensor_dims, needs)
    ]
    # Sequence-free inputs (weights) are the same leaf in every chunk; their gradient adds up.
    leaves_fixed = [x.detach().requires_grad_(need) if d is None else None for x, d, need in zip(tensors, plan.tensor_dims, needs)]
    lam: Tensor | None = None
    for c in reversed(range(len(spans))):
        a, t0, t1 = spans[c]
        with autograd_inside_op():
            got, lam = _chunk_vjp(plan, tensors, sizes, needs, leaves_fixed, states, grad_outputs, lam, a, t0, t1, c)
        if got is None:
            continue
        for i, (d, g) in enumerate(zip(plan.tensor_dims, got)):
            if g is None:
                continue
            if d is None:
                grads[i] = g if grads[i] is None else grads[i].add_(g)
            else:
                grads[i].narrow(d, a, t1 - a).add_(g)
    return [
        (torch.zeros_like(x) if g is None else g) if need else None for x, g, need in zip(tensors, grads, needs)
    ]


def _chunk_vjp(plan, tensors, sizes, needs, leaves_fixed, states, grad_outputs, lam, a, t0, t1, c):
    """One chunk of the backward: recompute it, then the VJP of its outputs and final state.

    Returns (per-input gradients of the window (None where not needed or unused), λ for the
    chunk before); ``(None, lam)`` when nothing in the chunk needs a gradient.
    """
    hc, n = t0 - a, t1 - t0
    window = [
        fixed if d is None else w.detach().requires_grad_(need)
        for w, d, need, fixed in zip(_window(plan, tensors, a, t1 - a), plan.tensor_dims, needs, leaves_fixed)
    ]
    h_in = states[:, :, c].detach().requires_grad_() if c else None
    *outs, final = plan.body(*window, *plan.sizes_at(sizes, t1 - a), hc, h_in)
    roots, cotangents = [], []
    for o, d, g in zip(outs, plan.output_dims, grad_outputs):
        if o.requires_grad:
            roots.append(o.narrow(d, hc, n))
            cotangents.append(g.narrow(d, t0, n))
    if lam is not None and final.requires_grad:
        roots.append(final)
        cotangents.append(lam)
    wrt = [w for w, need in zip(window, needs) if need]
    if h_in is not None:
        wrt.append(h_in)
    if not roots or not wrt:
        return None, lam
    got = list(torch.autograd.grad(roots, wrt, cotangents, allow_unused=True))
    lam = got.pop() if h_in is not None else None
    it = iter(got)
    return [next(it) if need else None for need in needs], lam


def _with(shape: torch.Size, dim: int, n: int) -> tuple[int, ...]:
    s = list(shape)
    s[dim] = n
    return tuple(s)

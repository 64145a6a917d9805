"""``torch.library`` registration of a chunk-by-chunk sequence block: ``longctx::ssm_block_fwd/_bwd``.

Schemas::

    longctx::ssm_block_fwd(Tensor[] tensors, SymInt[] sizes, str plan) -> Tensor[]
        # the block's outputs, then its boundary states [B, D, M·N]
    longctx::ssm_block_bwd(Tensor[] tensors, SymInt[] sizes, Tensor boundary_states,
        Tensor[] grad_outputs, bool[] needs_grad, str plan) -> Tensor[]
        # one gradient per tensor input; an empty tensor where needs_grad is False

``plan`` names a :class:`~longctx_compiler.kernels.ssm_block.chunked.BlockPlan` registered
with :func:`register_plan` by the pass that built it. The name is a digest of the plan's
code and numbers, so a compiled graph that names a plan always finds that very plan: the
pass registers it again, under the same name, each time it rewrites the same block (a
compiled graph taken from a cache included). The registered autograd formula saves the
block's tensor inputs and the boundary states, nothing else.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from .chunked import BlockPlan, block_backward, block_forward

__all__ = ["register_plan", "get_plan", "ssm_block_fwd", "ssm_block_bwd"]

_PLANS: dict[str, BlockPlan] = {}


def register_plan(plan: BlockPlan) -> str:
    """Register ``plan``; returns its name (a digest of its code and numbers)."""
    text = "\n".join([
        plan.body.code, repr(plan.tensor_dims), repr([str(e) for e in plan.size_exprs]), str(plan.length),
        repr(plan.output_dims), str(plan.halo), str(plan.min_length), str(plan.chunk),
    ])
    key = "ssm_block_" + hashlib.sha256(text.encode()).hexdigest()[:24]
    _PLANS.setdefault(key, plan)
    return key


def get_plan(key: str) -> BlockPlan:
    try:
        return _PLANS[key]
    except KeyError:
        raise RuntimeError(f"ssm_block: no plan named {key!r} in this process; it is registered by the pass that rewrites the block") from None


@torch.library.custom_op("longctx::ssm_block_fwd", mutates_args=())
def ssm_block_fwd(tensors: list[Tensor], sizes: list[int], plan: str) -> list[Tensor]:
    outputs, boundary = block_forward(get_plan(plan), tensors, sizes)
    return [*outputs, boundary]


@ssm_block_fwd.register_fake
def _(tensors, sizes, plan):
    p = get_plan(plan)
    # The whole-sequence run of the body on fake inputs gives the output shapes (symbolic T
    # stays symbolic) and the state's shape and dtype.
    *outs, final = p.body(*tensors, *sizes, 0, None)
    m = (p.seq_len(tensors) + p.chunk - 1) // p.chunk
    return [o.new_empty(o.shape) for o in outs] + [final.new_empty((final.shape[0], final.shape[1], m * final.shape[2]))]


@torch.library.custom_op("longctx::ssm_block_bwd", mutates_args=())
def ssm_block_bwd(
    tensors: list[Tensor], sizes: list[int], boundary_states: Tensor, grad_outputs: list[Tensor], needs_grad: list[bool], plan: str
) -> list[Tensor]:
    grads = block_backward(get_plan(plan), tensors, sizes, boundary_states, grad_outputs, needs_grad)
    return [g.contiguous() if g is not None else x.new_empty((0,)) for x, g in zip(tensors, grads)]


@ssm_block_bwd.register_fake
def _(tensors, sizes, boundary_states, grad_outputs, needs_grad, plan):
    return [x.new_empty(x.shape) if need else x.new_empty((0,)) for x, need in zip(tensors, needs_grad)]


def _setup_context(ctx, inputs, output):
    tensors, sizes, plan = inputs
    ctx.save_for_backward(*tensors, output[-1])
    ctx.sizes = sizes
    ctx.plan = plan
    ctx.needs = [isinstance(x, Tensor) and x.requires_grad for x in tensors]
    ctx.mark_non_differentiable(output[-1])


def _backward(ctx, grads):
    *tensors, boundary = ctx.saved_tensors
    got = torch.ops.longctx.ssm_block_bwd(tensors, ctx.sizes, boundary, list(grads[:-1]), ctx.needs, ctx.plan)
    # Integer inputs get no gradient: None, or [] for an empty list (torch.library matches an
    # empty list's structure, not None).
    return [g if need else None for g, need in zip(got, ctx.needs)], (None if ctx.sizes else []), None


ssm_block_fwd.register_autograd(_backward, setup_context=_setup_context)

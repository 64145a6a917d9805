"""``torch.library`` registration of a chunk-by-chunk sequence block: ``longctx::sequence_block_fwd/_bwd``.

Schemas::

    longctx::sequence_block_fwd(Tensor[] tensors, SymInt[] sizes, str plan) -> Tensor[]
        # the block's outputs, then one boundary-state tensor per scan ([B, D, M·N] for a
        # selective scan, [B, H, M·P·N] for an SSD scan), then a
        # handle (int64 scalar, CPU) naming what the forward left in the host pool
    longctx::sequence_block_bwd(Tensor[] tensors, SymInt[] sizes, Tensor[] boundary_states,
        Tensor handle, Tensor[] grad_outputs, bool[] needs_grad, SymInt[] host_shapes, str plan)
        -> Tensor[]
        # one gradient per tensor input; an empty tensor where needs_grad is False

``plan`` names a :class:`~longctx_compiler.kernels.sequence_block.chunked.BlockPlan` registered
with :func:`register_plan` by the pass that built it. The name is a digest of the plan's
code and numbers, so a compiled graph that names a plan always finds that very plan: the
pass registers it again, under the same name, each time it rewrites the same block (a
compiled graph taken from a cache included).

The registered autograd formula saves the block's tensor inputs that stay on the device
(weights; sequence inputs unless the plan keeps them on the host), the boundary states and
the handle, nothing else. A sequence input kept on the host reaches the backward op as an
empty tensor of its dtype and device, its shape in ``host_shapes`` (flattened, in order).
The host copies (kept inputs, K/V histories) are released when the handle tensor dies:
autograd frees it right after the node's backward, or with the graph if there is none.
"""

from __future__ import annotations

import hashlib
import weakref

import numpy as np
import torch
from torch import Tensor

from longctx_compiler.runtime.host_pool import get_default_pool

from .chunked import BlockPlan, HostGroup, block_backward, block_forward
from .carry import Carry

__all__ = ["register_plan", "get_plan", "sequence_block_fwd", "sequence_block_bwd", "BLOCK_OP"]

_PLANS: dict[str, BlockPlan] = {}
_GROUPS: dict[int, HostGroup] = {}
_next_group = iter(range(1, 1 << 62))


def register_plan(plan: BlockPlan) -> str:
    """Register ``plan``; returns its name (a digest of its code and numbers)."""
    text = "\n".join([
        plan.body.code, repr(plan.tensor_dims), repr([str(e) for e in plan.size_exprs]), str(plan.length),
        repr(plan.output_dims), str(plan.halo), str(plan.min_length), str(plan.chunk), str(plan.scans),
        str(plan.attentions), repr(plan.host_inputs), repr(plan.host_budget), repr(plan.autocast),
        repr(plan.sequence_group),
    ])
    key = "sequence_block_" + hashlib.sha256(text.encode()).hexdigest()[:24]
    _PLANS.setdefault(key, plan)
    return key


def get_plan(key: str) -> BlockPlan:
    try:
        return _PLANS[key]
    except KeyError:
        raise RuntimeError(f"sequence_block: no plan named {key!r} in this process; it is registered by the pass that rewrites the block") from None


def _handle_tensor(group: HostGroup) -> Tensor:
    if not group.handles:
        # Nothing in the host tier (a block whose carries are all states): handle 0, always
        # the same, so that the op's outputs are a function of its inputs.
        return torch.zeros((), dtype=torch.int64)
    # The handle's storage wraps a numpy array; the array dies exactly when the last tensor
    # sharing that storage does (autograd's saved copy included), which releases the group.
    gid = next(_next_group)
    _GROUPS[gid] = group
    arr = np.array(gid, dtype=np.int64)
    weakref.finalize(arr, _release, gid)
    return torch.from_numpy(arr)


def _release(gid: int) -> None:
    group = _GROUPS.pop(gid, None)
    if group is not None:
        group.release()


def _lookup(handle: Tensor) -> HostGroup:
    gid = int(handle.item())
    if gid == 0:
        return HostGroup(get_default_pool())
    group = _GROUPS.get(gid)
    if group is None:
        raise RuntimeError(f"sequence_block: host group {gid} is unknown or already released (its forward's graph is gone)")
    return group


@torch.library.custom_op("longctx::sequence_block_fwd", mutates_args=())
def sequence_block_fwd(tensors: list[Tensor], sizes: list[int], plan: str) -> list[Tensor]:
    outputs, boundaries, group = block_forward(get_plan(plan), tensors, sizes)
    return [*outputs, *boundaries, _handle_tensor(group)]


@sequence_block_fwd.register_fake
def _(tensors, sizes, plan):
    p = get_plan(plan)
    # The whole-sequence run of the body on fake inputs gives the output shapes (symbolic T
    # stays symbolic) and each state's shape and dtype.
    carry = Carry.whole(p.scans, p.attentions)
    outs = p.run_body(*tensors, *sizes, carry)
    m = (p.seq_len(tensors) + p.chunk - 1) // p.chunk
    boundaries = [f.new_empty((f.shape[0], f.shape[1], m * f.shape[2])) for f in carry.states_out]
    return [o.new_empty(o.shape) for o in outs] + boundaries + [torch.empty((), dtype=torch.int64, device="cpu")]


@torch.library.custom_op("longctx::sequence_block_bwd", mutates_args=())
def sequence_block_bwd(
    tensors: list[Tensor], sizes: list[int], boundary_states: list[Tensor], handle: Tensor,
    grad_outputs: list[Tensor], needs_grad: list[bool], host_shapes: list[int], plan: str,
) -> list[Tensor]:
    p = get_plan(plan)
    shapes = _input_shapes(p, tensors, host_shapes)
    grads = block_backward(p, tensors, shapes, sizes, boundary_states, _lookup(handle), grad_outputs, needs_grad)
    return [g.contiguous() if g is not None else x.new_empty((0,)) for x, g in zip(tensors, grads)]


@sequence_block_bwd.register_fake
def _(tensors, sizes, boundary_states, handle, grad_outputs, needs_grad, host_shapes, plan):
    shapes = _input_shapes(get_plan(plan), tensors, host_shapes)
    return [x.new_empty(s) if need else x.new_empty((0,)) for x, s, need in zip(tensors, shapes, needs_grad)]


def _input_shapes(p: BlockPlan, tensors: list[Tensor], host_shapes: list[int]) -> list[list[int]]:
    """Every input's shape: the tensor's own, or (kept on the host: an empty stand-in) the next
    ``rank`` numbers of ``host_shapes``."""
    out, pos = [], 0
    for i, x in enumerate(tensors):
        if p.kept_on_host(i):
            rank = p.host_inputs[i]
            out.append(list(host_shapes[pos:pos + rank]))
            pos += rank
        else:
            out.append(list(x.shape))
    return out


def _setup_context(ctx, inputs, output):
    tensors, sizes, plan = inputs
    p = get_plan(plan)
    n_out = len(output) - p.scans - 1
    kept = [x if not p.kept_on_host(i) else None for i, x in enumerate(tensors)]
    ctx.save_for_backward(*[x for x in kept if x is not None], *output[n_out:])
    ctx.kept = [x is not None for x in kept]
    ctx.host = [(x.dtype, x.device) if not k else None for x, k in zip(tensors, ctx.kept)]
    ctx.host_shapes = [s for i, x in enumerate(tensors) if p.kept_on_host(i) for s in x.shape]
    ctx.sizes = sizes
    ctx.plan = plan
    ctx.n_out = n_out
    ctx.needs = [isinstance(x, Tensor) and x.requires_grad for x in tensors]
    ctx.mark_non_differentiable(*output[n_out:])


def _backward(ctx, grads):
    saved = list(ctx.saved_tensors)
    p = get_plan(ctx.plan)
    handle = saved.pop()
    boundaries = saved[len(saved) - p.scans:] if p.scans else []
    it = iter(saved[: len(saved) - p.scans])
    tensors = [next(it) if k else torch.empty((0,), dtype=h[0], device=h[1]) for k, h in zip(ctx.kept, ctx.host)]
    got = torch.ops.longctx.sequence_block_bwd(
        tensors, ctx.sizes, boundaries, handle, list(grads[: ctx.n_out]), ctx.needs, ctx.host_shapes, ctx.plan,
    )
    # Integer inputs get no gradient: None, or [] for an empty list (torch.library matches an
    # empty list's structure, not None).
    return [g if need else None for g, need in zip(got, ctx.needs)], (None if ctx.sizes else []), None


sequence_block_fwd.register_autograd(_backward, setup_context=_setup_context)

BLOCK_OP = torch.ops.longctx.sequence_block_fwd.default

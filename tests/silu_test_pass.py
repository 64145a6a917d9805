"""A pass that lives in the tests (not shipped): F.silu → a custom op with its own autograd.

It exercises the whole pass contract — match, check (with a refusal), apply, provenance,
report — on a pattern every Llama MLP contains, with an op whose result is exactly equal to
the original so gradients can be compared at float64 round-off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx_compiler.passes import CantApply, Match, Pass


@torch.library.custom_op("longctx_test::silu", mutates_args=())
def silu_op(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


@silu_op.register_fake
def _silu_fake(x):
    return torch.empty_like(x)


def _silu_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _silu_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    s = torch.sigmoid(x)
    return grad * s * (1 + x * (1 - s))


silu_op.register_autograd(_silu_backward, setup_context=_silu_setup)


class SiluToCustomOp(Pass):
    """Before: ``y = torch.nn.functional.silu(x)``; after: ``y = torch.ops.longctx_test.silu(x)``.

    Refuses in-place silu (the custom op is functional).
    """

    name = "test_silu_to_custom_op"
    kind = "silu -> longctx_test.silu"

    def match(self, gm, ctx):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is F.silu:
                yield Match(anchor=node, nodes=[node])

    def check(self, gm, match, ctx):
        node = match.anchor
        if node.kwargs.get("inplace", False) or (len(node.args) > 1 and node.args[1]):
            raise CantApply("in-place silu: the replacement op is functional")

    def apply(self, gm, match, ctx):
        node = match.anchor
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.longctx_test.silu.default, (node.args[0],))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "val", "tensor_meta")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return [new]


class BrokenPass(Pass):
    """Matches every silu and then fails while rewriting: exercises the fallback path."""

    name = "test_broken"
    kind = "silu -> (crash)"

    def match(self, gm, ctx):
        yield from SiluToCustomOp().match(gm, ctx)

    def apply(self, gm, match, ctx):
        # Half-rewrite the graph before failing, so the fallback must really restore it.
        match.anchor.target = torch.tanh
        raise RuntimeError("deliberate failure inside a pass")

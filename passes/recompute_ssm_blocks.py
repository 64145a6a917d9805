"""Recompute the token-wise work of every block that holds an adjoint-sharded scan.

(The fallback for blocks that :mod:`adjoint_sharded_blocks` refuses: that pass runs a block
chunk by chunk along the sequence, which holds one chunk's activations instead of a whole
block's; this one recomputes the whole block at once.)

Once a scan is adjoint-sharded, its own saved state is tiny (``[B, D, M, N]`` boundary
states). What a Mamba-style block still keeps for backward is its *token-wise* work: the
norm, the input projection ``[T, 2·D_inner]``, the causal convolution and its activation,
``x_proj``/``dt_proj`` outputs, the gate — about ten ``[T, D_inner]`` activations per layer,
more than the scan itself ever needed. All of it is a cheap function of the block's input
``[T, hidden]``, so this pass wraps each such block in an activation-checkpoint region::

    before:  x ─ norm ─ in_proj ─ conv ─ silu ─ x_proj ─ dt_proj ─ scan ─ out_proj ─ (+x) ─ out
    after:   out = tag_activation_checkpoint(block_body, x, *params)[0]
             (block_body holds the same nodes; the scan inside is marked MUST_SAVE)

AOTAutograd's partitioner then saves the block's inputs and the scan's outputs (``y`` and
the boundary states, which the scan's backward needs anyway) and recomputes the rest in
backward. Saving the scan's outputs means the scan's forward never runs twice; the price
is one extra forward of the token-wise layers (projections and convolution).

Which nodes form "the block": the outermost module (from Dynamo's ``nn_module_stack``) that
contains exactly one scan node — a ``MambaBlock`` (norm + mixer + residual) in a stack of
layers, the whole backbone in a one-layer model. Refused, with the reason, when the block
cannot be recomputed exactly or cheaply: random ops (dropout with p > 0 in training),
in-place updates or other side effects, other ``longctx`` ops (attention offload has host
side effects), non-tensor values leaving the block, or a block whose nodes are interleaved
with outside work that depends on them.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from longctx_compiler.kernels.sequence_block import BLOCK_OP
from longctx_compiler.passes.adjoint_sharded_scan import SCAN_OP
from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext
from longctx_compiler.passes.block_region import check_region, find_blocks, replace_region
from longctx_compiler.passes.analysis.fx_utils import example_value
from longctx_compiler.passes.ssd_scan import SSD_OP

__all__ = ["RecomputeSSMBlocksPass", "CHECKPOINT_HOP", "find_scan_blocks", "SCAN_OPS", "is_scan", "is_ssd"]

CHECKPOINT_HOP = torch.ops.higher_order.tag_activation_checkpoint
#: The scans a block is built around: the selective scan (Mamba) and the SSD scan (Mamba-2),
#: the latter also as its overload packet (what ``ssd_scan`` calls, and Dynamo records).
SCAN_OPS = (SCAN_OP, SSD_OP, torch.ops.longctx.ssd_fwd)


def is_scan(n: fx.Node) -> bool:
    """Whether ``n`` calls one of :data:`SCAN_OPS`."""
    return n.op == "call_function" and n.target in SCAN_OPS


def is_ssd(n: fx.Node) -> bool:
    """Whether ``n`` calls the SSD scan."""
    return n.op == "call_function" and n.target in (SSD_OP, torch.ops.longctx.ssd_fwd)


def _scan_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    # The scan's outputs are saved (its backward reads y's inputs and the boundary states
    # anyway, and recomputing the scan would double its cost); everything else is recomputed.
    if op in SCAN_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def find_scan_blocks(gm: fx.GraphModule) -> Iterable[Match]:
    """Each scan's block: the outermost module holding it and no other scan (a block that a
    sequence-block op already replaced still holds one). ``data``: ``path``, ``scan``."""
    scans = [n for n in gm.graph.nodes if is_scan(n)]
    counted = lambda n: is_scan(n) or (n.op == "call_function" and n.target is BLOCK_OP)  # noqa: E731
    for m in find_blocks(gm, scans, counted):
        m.data["scan"] = m.data["anchor_node"]
        yield m


class RecomputeSSMBlocksPass(Pass):
    """Wrap each block around an adjoint-sharded scan in an activation-checkpoint region."""

    name = "recompute_ssm_blocks"
    kind = "ssm block -> recomputed in backward"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.config.ssm.enabled and ctx.config.ssm.recompute_blocks and not ctx.config.distributed.active

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        d = match.data
        return {"block": d["path"], "nodes": len(match.nodes), "inputs": len(d.get("inputs", ())), "saved": "block inputs + scan outputs"}

    # -- match ------------------------------------------------------------------------------
    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        return find_scan_blocks(gm)

    # -- check ------------------------------------------------------------------------------
    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        if match.data["path"] is None:
            raise CantApply("the scan is not inside a module of its own (no enclosing block to recompute)")
        check_region(gm, match, is_scan)

    # -- apply ------------------------------------------------------------------------------
    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        inputs: list[fx.Node] = match.data["inputs"]
        outputs: list[fx.Node] = match.data["outputs"]
        body_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for a in inputs:
            p = body_graph.placeholder(a.name)
            p.meta.update({k: v for k, v in a.meta.items() if k in ("example_value", "val", "tensor_meta")})
            env[a] = p
        for n in match.nodes:
            env[n] = body_graph.node_copy(n, lambda x: env[x])
        body_graph.output(tuple(env[o] for o in outputs))
        body = fx.GraphModule(gm, body_graph, class_name="RecomputedBlock")
        body.meta["_checkpoint_context_fn"] = functools.partial(create_selective_checkpoint_contexts, _scan_policy)
        name = _free_attr(gm, "recompute_block")
        gm.add_submodule(name, body)

        with gm.graph.inserting_before(match.data["insert_before"]):
            body_node = gm.graph.get_attr(name)
        call, results = replace_region(gm, match, CHECKPOINT_HOP, (body_node, *inputs), {"use_reentrant": False},
                                            example=tuple(example_value(o) for o in outputs))
        return [body_node, call, *results]


def _free_attr(gm: fx.GraphModule, prefix: str) -> str:
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"

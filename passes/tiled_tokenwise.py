"""Tile a layer's token-wise work (its MLP) along the sequence, with recompute in backward.

A decoder layer that is not pipelined whole (``layers.enabled`` off, or the layer refused)
still holds token-wise work whose activations grow with ``T``: an MLP saves ``[T,
intermediate]`` tensors for backward (SwiGLU: gate, up, their activation and product — four
of them). This pass runs each such region one chunk of ``Q`` tokens at a time — ALST's
TiledMLP, found from the graph for every model::

    before:  x ─ gate_proj ─ silu ─┐
               └ up_proj ──────────┴ (*) ─ down_proj ─ out           # saves 4 × [T, intermediate]
    after:   out, _ = longctx.sequence_block_fwd([x, *weights], sizes, plan)   # saves x

Forward runs the region chunk by chunk without autograd; backward recomputes each chunk and
takes its vector-Jacobian product. Saved for backward: the region's input (and the weights);
the device holds one chunk's intermediates. Exact. The runtime is the sequence-block runtime
(``kernels/sequence_block/``) with no carry at all.

Which regions: the outermost module around a ``linear`` that holds at least two linears and
no long-context op (attention, scan, a block already chunked, the tiled loss) — a layer's
MLP; a lone projection saves nothing worth tiling. And, when the region's input goes to the
host pool, the stack's end: the module whose output the tiled LM loss reads (a final norm),
whose input — the last layer's output, ``[T, hidden]`` — the device would otherwise hold
from the end of the forward until the backward reaches it. :mod:`sequence_window` proves it
token-wise (no reduction, shift or look-ahead along the sequence; halo 0) or the pass refuses
with the reason. It runs after ``pipelined_layers`` (a pipelined layer's MLP is already
chunked) and after ``tiled_lm_loss`` (the LM head is the loss's).

Configuration: ``Config.layers.tile_tokenwise`` (default: on when ``layers.enabled`` is; the
recompute costs about one more MLP forward per step), ``layers.chunk_size`` tokens per chunk
and ``layers.offload`` for the region's input.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from longctx_compiler.kernels.sequence_block import BLOCK_OP
from longctx_compiler.passes.adjoint_sharded_blocks import sequence_block_plan
from longctx_compiler.passes.analysis.fx_utils import example_value, is_call, is_view_like
from longctx_compiler.passes.analysis.sequence_window import analyse_window
from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext
from longctx_compiler.passes.block_region import check_region, long_context_op, module_region, module_stack, replace_region
from longctx_compiler.passes.pipelined_layers import DEFAULT_CHUNK
from longctx_compiler.passes.tiled_lm_loss import OP as LOSS_OP

__all__ = ["TiledTokenwisePass"]

_LINEAR = (F.linear, torch._C._nn.linear)


def _through_views(n: fx.Node) -> fx.Node:
    """The node whose value ``n`` views (through reshapes, slices and casts)."""
    while is_view_like(n):
        n = n.args[0]
    return n


def _not_tileable(n: fx.Node) -> bool:
    # Our ops (and higher-order ops such as a raised scan) carry state along the sequence.
    return long_context_op(n) or (n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator))


class TiledTokenwisePass(Pass):
    """Each MLP-like token-wise module → one op that runs it chunk by chunk (recompute in backward)."""

    name = "tiled_tokenwise"
    kind = "token-wise region -> chunked along T (recomputed in backward)"

    def enabled(self, ctx: PassContext) -> bool:
        layers = ctx.config.layers
        return layers.enabled if layers.tile_tokenwise is None else layers.tile_tokenwise

    def chunk(self, ctx: PassContext) -> int:
        return ctx.config.layers.chunk_size or ctx.config.attention.chunk_size or DEFAULT_CHUNK

    @staticmethod
    def offload(ctx: PassContext) -> bool:
        layers = ctx.config.layers
        return bool(ctx.config.attention.offload if layers.offload is None else layers.offload)

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        return {"module": match.data["path"], "role": match.data["role"], "nodes": len(match.nodes), "linears": match.data["linears"],
                "chunk_size": self.chunk(ctx), "offload": self.offload(ctx),
                "saved": "region input" + (" (host pool)" if self.offload(ctx) else "") + " + weights"}

    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        # Modules holding a long-context op are not token-wise; their submodules may be.
        dirty: set[str] = set()
        paths: dict[str, str] = {}
        for n in gm.graph.nodes:
            for key, path in module_stack(n):
                paths[key] = path
                if _not_tileable(n):
                    dirty.add(key)

        def outermost_clean(n: fx.Node) -> str | None:
            return next((k for k, _ in module_stack(n) if k not in dirty), None)

        done: set[str] = set()
        # The stack's end: the module (a final norm) whose output the tiled LM loss reads.
        # Alone it saves only its input, but that input is the last layer's output, a
        # [T, hidden] tensor the device would hold until the backward reaches it; as a
        # block with its input in the host pool it holds nothing.
        if self.offload(ctx):
            for loss in gm.graph.find_nodes(op="call_function", target=LOSS_OP):
                key = outermost_clean(_through_views(loss.args[0]))
                if key is not None and key not in done:
                    done.add(key)
                    nodes, first = module_region(gm, key)
                    yield Match(anchor=first or nodes[0], nodes=nodes, data={"path": paths[key], "linears": 0, "role": "stack end"})
        for n in gm.graph.nodes:
            if not is_call(n, *_LINEAR):
                continue
            key = outermost_clean(n)
            if key is None or key in done:
                continue
            done.add(key)
            nodes, first = module_region(gm, key)
            linears = sum(1 for m in nodes if is_call(m, *_LINEAR))
            if linears < 2:
                continue  # a lone projection: its saved input is all it holds
            yield Match(anchor=first or nodes[0], nodes=nodes, data={"path": paths[key], "linears": linears, "role": "MLP"})

    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        check_region(gm, match, lambda n: False)
        window = analyse_window(match.nodes, match.data["inputs"], match.data["outputs"], [])
        if window.halo:
            raise CantApply(f"the module reads {window.halo} earlier tokens (a convolution or shift along the sequence): not token-wise")
        if not window.input_dims:
            raise CantApply("no input of the module runs along the sequence")
        for a in match.data["inputs"]:
            v = example_value(a)
            if not isinstance(v, (torch.Tensor, torch.SymInt, int)):
                raise CantApply(f"module input {a.name} is a {type(v).__name__}")
        match.data["window"] = window

    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        window = match.data["window"]
        key, tensors, sizes = sequence_block_plan(
            gm, match, window, [], {}, max(self.chunk(ctx), window.min_length),
            host_inputs=self.offload(ctx), host_budget=ctx.config.attention.host_pool_bytes,
        )
        call, results = replace_region(gm, match, BLOCK_OP, (list(tensors), list(sizes), key), {})
        return [call, *results]

"""Packed documents (``Config.packed_documents``): every scan resets where a document starts,
and nothing else in the graph mixes documents.

With the option, the compiled call carries the caller's document ids ``[B, T]`` as a graph
input, named by the marker op ``longctx::document_ids`` (:mod:`longctx_compiler.runtime.documents`).
The passes before this one already used them where they build their ops: the attention pass
joins them into the chunked attention's ``segment_ids``, the depthwise-convolution pass reads
zero for taps in an earlier document. This pass gives them to the scans::

    before:  y, h, s = longctx.selective_scan_fwd(u, Δ, A, B, C, ..., seq_idx=None)
    after:   y, h, s = longctx.selective_scan_fwd(u, Δ, A, B, C, ..., seq_idx=ids)
             (an SSD scan alike; one that already had ``seq_idx`` keeps its resets too:
             ``joint_documents(seq_idx, ids)``)

and then checks the whole graph: every attention is the chunked op with document ids, every
scan resets, no convolution along the sequence is left, and nothing else reads along the
sequence in floating point (a softmax over the tokens — a hand-written attention the
attention pass refused —, a cumulative sum or product, an associative scan, a scan the
capture left to its library). Anything found raises :class:`PackedDocumentsError` naming the
site: the model would otherwise mix the documents the caller asked to keep apart, and the
backend does not fall back to the un-rewritten graph with this option.

It runs after the per-op passes and before the block passes, which carry the ops (with their
document arguments) into their chunk-by-chunk bodies.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from longctx_compiler.capture import refusal_of
from longctx_compiler.kernels.attention.op import forward_arg
from longctx_compiler.kernels.selective_scan.schema import ScanArgs
from longctx_compiler.kernels.ssd.schema import SSDArgs
from longctx_compiler.passes.analysis.fx_utils import example_value, insert_call, is_call, propagate_example_value
from longctx_compiler.passes.base import Match, Pass, PassContext
from longctx_compiler.report import node_site
from longctx_compiler.runtime.documents import PackedDocumentsError, documents_node, joint_documents

__all__ = ["PackedDocumentsPass"]

_SCANS = {torch.ops.longctx.selective_scan_fwd.default: (ScanArgs, "u", -1), torch.ops.longctx.ssd_fwd.default: (SSDArgs, "x", 1)}
_ATTENTION = (torch.ops.longctx.chunked_attention_fwd.default, torch.ops.longctx.chunked_attention_fwd_offload.default)
_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SOFTMAX = (F.softmax, torch.softmax, torch._softmax, "softmax")
_CUMULATIVE = (torch.cumsum, torch.cumprod, torch.logcumsumexp, "cumsum", "cumprod", "logcumsumexp")
_CONV = (F.conv1d, torch.conv1d, F.conv2d, torch.conv2d, F.conv_transpose1d)
_SCAN_HOPS = ("associative_scan", "scan")


def _dim(node: fx.Node, position: int, default: Any = None) -> Any:
    """The ``dim`` argument of a call (method calls take ``self`` first)."""
    at = position + (1 if node.op == "call_method" else 0)
    return node.args[at] if len(node.args) > at else node.kwargs.get("dim", default)


def _along(value: Any, dim: Any, length: Any) -> bool:
    """Whether ``value``'s ``dim`` is the sequence (size ``length``)."""
    if not isinstance(value, torch.Tensor) or not isinstance(dim, int) or not -value.dim() <= dim < value.dim():
        return False
    return statically_known_true(value.shape[dim] == length)


def _mixes_documents(node: fx.Node, length: Any) -> str | None:
    """Why ``node`` would mix documents (it reads along the sequence and has no document
    argument), or None."""
    if node.op not in ("call_function", "call_method"):
        return None
    why = refusal_of(node)
    if why:
        return f"the {why[1]} ran the library's own function ({why[2]}), which scans across documents"
    if is_call(node, *_SDPA):
        return "an attention the attention pass did not rewrite (see its refusal in the report)"
    if node.op == "call_function" and node.target in _ATTENTION and forward_arg(node, "segment_ids") is None:
        return "a chunked attention without document ids"
    value = example_value(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if is_call(node, *_CONV) and isinstance(value, torch.Tensor) and any(_along(value, d, length) for d in range(2, value.dim())):
        return "a convolution along the sequence the depthwise-convolution pass did not rewrite (see its refusal)"
    if is_call(node, *_SOFTMAX) and _along(value, _dim(node, 1), length):
        return "a softmax over the tokens: an attention the attention pass did not rewrite (see its refusal)"
    if is_call(node, *_CUMULATIVE) and isinstance(value, torch.Tensor) and value.is_floating_point() and _along(value, _dim(node, 1), length):
        return f"a floating-point {node.target if node.op == 'call_method' else node.target.__name__} along the sequence"
    if isinstance(node.target, torch._ops.HigherOrderOperator) and node.target.name() in _SCAN_HOPS:
        return f"a {node.target.name()} (a recurrence over the tokens with no document resets)"
    return None


class PackedDocumentsPass(Pass):
    """Give every scan the packed documents' ids; refuse, by raising, whatever else mixes them."""

    name = "packed_documents"
    kind = "scan -> scan with document resets"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.config.packed_documents

    def kind_of(self, match: Match) -> str:
        return f"{match.data['what']} -> {match.data['what']} with document resets (seq_idx)"

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        return {"documents": "joined with the scan's own seq_idx" if match.data["joined"] else "the caller's"}

    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        documents = documents_node(gm)
        if documents is None:
            raise PackedDocumentsError("packed_documents: the graph does not carry the documents' ids (it was not compiled "
                                       "through the optimized model's call)")
        ids = example_value(documents)
        length = ids.shape[1]
        for node in gm.graph.nodes:
            why = None if node.op == "call_function" and node.target in _SCANS else _mixes_documents(node, length)
            if why:
                raise PackedDocumentsError(f"packed_documents: {why}, at {node_site(node)}")
        matches = []
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in _SCANS:
                fields, first, dim = _SCANS[node.target]
                args = fields.of(node)
                x = example_value(getattr(args, first))
                if not (statically_known_true(x.shape[dim] == length) and statically_known_true(x.shape[0] == ids.shape[0])):
                    raise PackedDocumentsError(f"packed_documents: a scan over {tuple(x.shape)} is not over the documents' "
                                               f"{tuple(ids.shape)} tokens, at {node_site(node)}")
                what = "selective scan" if fields is ScanArgs else "ssd scan"
                matches.append(Match(anchor=node, nodes=[node], data={"documents": documents, "what": what,
                                                                      "joined": args.seq_idx is not None}))
        return matches

    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        node, documents = match.anchor, match.data["documents"]
        args = _SCANS[node.target][0].of(node)
        graph = gm.graph
        with graph.inserting_before(node):
            seq_idx = documents if args.seq_idx is None else insert_call(graph, joint_documents, (args.seq_idx, documents))
            new = graph.call_function(node.target, tuple(args._replace(seq_idx=seq_idx)), {})
        new.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        propagate_example_value(new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return [new] if seq_idx is documents else [seq_idx, new]

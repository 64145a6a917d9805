"""Depthwise 1-D convolution → K shifted multiply-adds (token-wise, one graph for every T).

Mamba-style blocks run a short causal depthwise convolution along the sequence
(``conv1d(x, w [C, 1, K], b, padding=K-1, groups=C)``, K = 4). Inductor lowers the backward of
a convolution by fixing the strides of its gradient to integers, which pins the sequence
length: every new T then compiles a new graph (and after Dynamo's recompile limit the model
silently drops to eager). Written as what it is — a K-tap filter::

    before:  y = conv1d(x, w, b, stride=1, padding=P, dilation=1, groups=C)      x: [B, C, T]
    after:   xp = pad(x, (P, P))                                                 [B, C, T + 2P]
             y  = b[:, None] + Σ_{k<K} xp[:, :, k : k + L] * w[:, 0, k:k+1]      L = T + 2P - K + 1

the convolution becomes K pointwise multiply-adds over shifted views that Inductor fuses into
one loop, with nothing specialised on T. The arithmetic is the same products and sums (in a
fixed order), so float64 results agree to round-off and low precision stays within the
dtype's rule. The graph grows with K, never with T.

Matched: ``conv1d`` with a ``[B, C, T]`` input, a ``[C, 1, K]`` weight and ``groups == C``
(depthwise, one filter per channel), stride 1, dilation 1, integer padding, floating dtypes.
Anything else (grouped or dense convolutions, strides, dilation, ``padding="same"``, K > 64)
is left to the convolution kernel, with the reason in the report.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext
from longctx_compiler.passes.fx_utils import arg, example_value, insert_call
from longctx_compiler.passes.registry import register_pass

__all__ = ["DepthwiseConvPass", "MAX_TAPS"]

#: Longest filter rewritten: the graph grows by a few nodes per tap.
MAX_TAPS = 64
_CONV1D = (torch.conv1d, F.conv1d)
_ALL = slice(None)


def _single(value: Any, name: str) -> int:
    """An int from ``1`` or ``(1,)``; CantApply otherwise."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise CantApply(f"{name}={value!r} is not a plain integer")
    return value


@register_pass("rewrite", order=50)
class DepthwiseConvPass(Pass):
    """Depthwise ``conv1d`` → shifted multiply-adds."""

    name = "depthwise_conv"
    kind = "depthwise conv1d -> shifted multiply-add"

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        return {"taps": match.data["taps"], "padding": match.data["padding"], "channels": match.data["channels"]}

    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in _CONV1D:
                yield Match(anchor=node, nodes=[node])

    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        node = match.anchor
        x, w = example_value(arg(node, 0, "input")), example_value(arg(node, 1, "weight"))
        bias = arg(node, 2, "bias")
        b = example_value(bias)
        if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
            raise CantApply("unknown input or weight")
        if x.dim() != 3:
            raise CantApply(f"input has {x.dim()} dims; only batched [B, C, T] input is rewritten")
        if not (x.dtype.is_floating_point and w.dtype == x.dtype and (b is None or b.dtype == x.dtype)):
            raise CantApply("input, weight and bias must share one floating dtype")
        groups = _single(arg(node, 6, "groups", 1), "groups")
        channels = x.shape[1]
        if w.dim() != 3 or w.shape[1] != 1 or groups != channels or w.shape[0] != channels:
            raise CantApply(f"not depthwise: weight {tuple(w.shape)}, groups={groups}, {channels} input channels")
        if _single(arg(node, 3, "stride", 1), "stride") != 1:
            raise CantApply("stride != 1")
        if _single(arg(node, 5, "dilation", 1), "dilation") != 1:
            raise CantApply("dilation != 1")
        padding = arg(node, 4, "padding", 0)
        if isinstance(padding, str):
            raise CantApply(f"padding={padding!r}")
        padding = _single(padding, "padding")
        taps = int(w.shape[2])
        if taps > MAX_TAPS:
            raise CantApply(f"{taps} taps > {MAX_TAPS}: left to the convolution kernel")
        match.data.update(taps=taps, padding=padding, channels=str(channels), bias=bias)

    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        node = match.anchor
        x, w = arg(node, 0, "input"), arg(node, 1, "weight")
        taps, padding, bias = match.data["taps"], match.data["padding"], match.data["bias"]
        graph = gm.graph
        with graph.inserting_before(node):
            xp = insert_call(graph, torch.constant_pad_nd, (x, [padding, padding], 0.0)) if padding else x
            out = None
            for k in range(taps):
                # xp[..., k : k + L] with L = len(xp) - (K - 1): a negative stop needs no SymInt.
                stop = k - (taps - 1) or None
                shifted = insert_call(graph, operator.getitem, (xp, (_ALL, _ALL, slice(k, stop))))
                tap = insert_call(graph, operator.getitem, (w, (_ALL, 0, slice(k, k + 1))))  # [C, 1]
                term = insert_call(graph, operator.mul, (shifted, tap))
                out = term if out is None else insert_call(graph, operator.add, (out, term))
            if bias is not None:
                out = insert_call(graph, operator.add, (out, insert_call(graph, operator.getitem, (bias, (_ALL, None)))))
        out.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        return [out]

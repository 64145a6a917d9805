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

Dtypes: 16-bit convolutions accumulate in float32 and round once, so the taps are summed in
float32 for 16-bit data (float32/float64 data: in its own dtype). Under ``torch.autocast``
(``conv1d`` is on its lower-precision list) the operands arrive in mixed dtypes; the rewrite
casts them to the autocast dtype first, as autocast does, then accumulates the same way.
Anything else (grouped or dense convolutions, strides, dilation, ``padding="same"``, K > 64)
is left to the convolution kernel, with the reason in the report.

Packed documents (``Config.packed_documents``, :mod:`longctx_compiler.runtime.documents`): a
causal filter (``P = K − 1``) reads tokens ``i − K + 1 .. i``; a tap whose token lies in an
earlier document reads zero instead (``where(ids[i − P + k] == ids[i], xp[k + i], 0)``), which is
what the convolution's zero padding gives a document run alone.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext
from longctx_compiler.passes.analysis.fx_utils import arg, example_value, insert_call, propagate_example_value
from longctx_compiler.runtime.documents import documents_node

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


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """What a convolution accumulates in: float32 for 16-bit data, else the data's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _autocast_dtype(out: torch.Tensor, operands: list[torch.Tensor]) -> torch.dtype:
    """The autocast dtype when mixed operand dtypes are autocast's casting of ``conv1d`` (on its
    lower-precision list: eligible operands — floating, on the device, not float64 — cast to
    the autocast dtype, the result in it); CantApply otherwise."""
    device_type = out.device.type
    what = f"input, weight and bias dtypes {sorted({str(t.dtype).replace('torch.', '') for t in operands})}"
    if not torch.amp.is_autocast_available(device_type) or not torch._C._dispatch_has_kernel_for_dispatch_key(
        "aten::conv1d", "Autocast" + torch._C._dispatch_key_for_device(device_type)
    ):
        raise CantApply(f"{what}: not autocast's casting of conv1d on {device_type}")
    if out.dtype not in (torch.float16, torch.bfloat16):
        raise CantApply(f"{what} with a {out.dtype} result: not an autocast lower-precision convolution")
    for t in operands:
        if t.dtype != out.dtype and (t.dtype == torch.float64 or t.device.type != device_type):
            raise CantApply(f"{what}: an operand autocast would not cast")
    return out.dtype


def _to(graph: fx.Graph, x: Any, dtype: torch.dtype) -> Any:
    if not isinstance(x, fx.Node) or example_value(x).dtype == dtype:
        return x
    node = graph.call_method("to", (x, dtype))
    propagate_example_value(node)
    return node


class DepthwiseConvPass(Pass):
    """Depthwise ``conv1d`` → shifted multiply-adds."""

    name = "depthwise_conv"
    kind = "depthwise conv1d -> shifted multiply-add"

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        d = match.data
        extra = {}
        if d.get("cast") is not None:
            extra["autocast"] = f"operands cast to {str(d['cast']).replace('torch.', '')} as autocast casts conv1d"
        if d.get("acc") is not None and d["acc"] != d["out_dtype"]:
            extra["accumulation"] = f"taps summed in {str(d['acc']).replace('torch.', '')}, rounded once to {str(d['out_dtype']).replace('torch.', '')}"
        if d.get("documents") is not None:
            extra["documents"] = "taps reading an earlier packed document read zero"
        return {"taps": d["taps"], "padding": d["padding"], "channels": d["channels"], **extra}

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
        out = example_value(node)
        operands = [x, w] + ([b] if b is not None else [])
        if not isinstance(out, torch.Tensor) or not all(t.dtype.is_floating_point for t in operands + [out]):
            raise CantApply("input, weight and bias must be floating point")
        cast = None
        if {t.dtype for t in operands} != {out.dtype}:
            cast = _autocast_dtype(out, operands)
        match.data.update(cast=cast, out_dtype=out.dtype, acc=_accumulation(out.dtype))
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
        match.data.update(taps=taps, padding=padding, channels=str(channels), bias=bias, documents=None)
        documents = documents_node(gm)
        if documents is not None:
            # Packed documents: token i's taps i - P + k must stay in its document. That is
            # defined for the causal form only (output i is token i's).
            ids = example_value(documents)
            if padding != taps - 1:
                raise CantApply(f"packed documents: padding={padding} is not the causal padding {taps - 1} of a {taps}-tap filter")
            if not statically_known_true(ids.shape[1] == x.shape[2]):
                raise CantApply(f"packed documents: the input's {x.shape[2]} steps are not the documents' {ids.shape[1]} tokens")
            match.data["documents"] = documents

    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        node = match.anchor
        x, w = arg(node, 0, "input"), arg(node, 1, "weight")
        taps, padding, bias = match.data["taps"], match.data["padding"], match.data["bias"]
        cast, out_dtype, acc = match.data["cast"], match.data["out_dtype"], match.data["acc"]
        graph = gm.graph
        with graph.inserting_before(node):
            if cast is not None:
                # Autocast ran the convolution on its operands cast to its lower-precision
                # dtype: the same roundings, explicit.
                x, w, bias = (_to(graph, t, cast) for t in (x, w, bias))
            # 16-bit convolutions accumulate in float32 and round once: so do the taps.
            x, w, bias = (_to(graph, t, acc) for t in (x, w, bias))
            xp = insert_call(graph, torch.constant_pad_nd, (x, [padding, padding], 0.0)) if padding else x
            documents = match.data["documents"]
            if documents is not None:
                # Padded like x, with -1 (no document's id): output i's own id is idp[P + i];
                # its tap k reads token i - P + k, whose id is idp[k + i].
                idp = insert_call(graph, torch.constant_pad_nd, (documents, [padding, padding], -1))
                own = insert_call(graph, operator.getitem, (idp, (_ALL, slice(padding, None))))
            out = None
            for k in range(taps):
                # xp[..., k : k + L] with L = len(xp) - (K - 1): a negative stop needs no SymInt.
                stop = k - (taps - 1) or None
                shifted = insert_call(graph, operator.getitem, (xp, (_ALL, _ALL, slice(k, stop))))
                if documents is not None and k < taps - 1:
                    # A tap in another document reads zero, as a document run alone reads
                    # the convolution's zero padding there (where, not a product: no inf·0).
                    tap_ids = insert_call(graph, operator.getitem, (idp, (_ALL, slice(k, stop))))
                    same = insert_call(graph, operator.getitem, (insert_call(graph, torch.eq, (tap_ids, own)), (_ALL, None)))
                    shifted = insert_call(graph, torch.where, (same, shifted, 0.0))
                tap = insert_call(graph, operator.getitem, (w, (_ALL, 0, slice(k, k + 1))))  # [C, 1]
                term = insert_call(graph, operator.mul, (shifted, tap))
                out = term if out is None else insert_call(graph, operator.add, (out, term))
            if bias is not None:
                out = insert_call(graph, operator.add, (out, insert_call(graph, operator.getitem, (bias, (_ALL, None)))))
            out = _to(graph, out, out_dtype)
        out.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        return [out]

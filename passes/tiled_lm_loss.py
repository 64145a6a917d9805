"""LM head + cross-entropy → sequence-tiled ``longctx::linear_cross_entropy``.

The spelling of ``transformers``' causal LMs (``ForCausalLMLoss``: logits upcast, labels
padded and shifted, ``fixed_cross_entropy``)::

    before:  logits = linear(h, W)                    # [B, T, V]   (also returned)
             x = logits.float().view(-1, V)           # [B·T, V]    float32 copy
             loss = cross_entropy(x, labels, ignore_index=-100, reduction="mean")
    after:   logits = linear(h, W)                    # kept only for its other users
             res = longctx.linear_cross_entropy_fwd(h.reshape(-1, H), W, None, labels,
                                                    logits.detach().reshape(-1, V), -100, "mean", C)
             loss = res[0]                            # (.to(float32) in a float64 model)

When nothing else uses the logits, the ``linear`` disappears and the op gets no logits: it
computes them tile by tile itself, so the ``[B·T, V]`` logits never exist. When something
does (``transformers`` returns them), the op reads the already-computed logits for its
forward value (no second matmul); either way its backward recomputes each tile's logits
from ``h`` and ``W`` and saves only ``h, W, bias, labels`` and the per-token log-sum-exp:
nothing ``[B·T, V]`` (logits, log-softmax, their gradient) is kept for backward.

Recognised between the head and the loss (in any order): dtype casts to a float type
(``.float()``, ``.to(float32)``, ...), ``.contiguous()``, reshapes that keep the vocabulary as
the last dimension (``view(-1, V)``, ``flatten``), and basic indexing that leaves the
vocabulary dimension alone — the classic shift ``logits[..., :-1, :]`` — which is replayed on
``h`` (a row of logits depends on the same row of ``h`` only). The head is ``linear(h, W[, b])``
or ``h @ M`` with a 2-D ``M`` (``h @ W.T``: then ``W = Mᵀ``). A reduction ``"sum"`` followed
by a division (``num_items_in_batch``) keeps the division in the graph.

The heads that transform their logits before the loss have the transform folded into the op
(its ``logit_scale``/``softcap`` arguments, applied to each tile in the accumulation dtype):
constant scales — Granite's ``logits / logits_scaling``, Cohere's ``logits * logit_scale`` —
then optionally a soft-capping ``cap · tanh(x / cap)`` — Gemma 2's
``final_logit_softcapping`` (``x / cap → tanh → · cap``; a bare ``tanh`` is cap 1). A scale
after the soft-capping, two ``tanh``, a ``tanh`` times a cap it was not divided by: refused.

What makes the rewrite exact (refused otherwise, with the reason): plain class-index targets
(int64), no class weights, ``label_smoothing == 0``, reduction ``"mean"`` or ``"sum"``,
nothing else between the head and the loss (a mask, a scale known only at run time...),
the logits never modified in place, ``h``/``W``/bias in the head's dtype or in dtypes that
autocast casts to it (below), no cast up beyond the op's accumulation dtype (a float32 model
whose logits are cast to float64 before the loss: the op would be less precise), a static
vocabulary and hidden size.

Autocast (``torch.autocast``, e.g. Hugging Face Trainer's ``bf16=True``): ``linear`` and
``matmul`` are on autocast's lower-precision list, so the head runs in bfloat16 on float32
operands (the recorded output dtype says so), and ``cross_entropy`` is on its float32 list.
The rewrite casts ``h``, ``W`` and the bias to the head's dtype explicitly, as autocast
casts them (only mixed dtypes that autocast explains are accepted: an autocast kernel for the
head's aten op on that device, a 16-bit result, eligible operands), and the op accumulates in
float32 — the original's dtypes, whatever the ambient autocast state when the graph runs
(``details["autocast"]``).

Precision: the op computes each tile's logits with ``F.linear`` in the head's dtype, then the
log-sum-exp and the loss in float32 (float64 for float64 logits) — at least the precision of
the original. Where the original rounds on the way — a float64 model's ``.float()``,
``.half()`` or ``.bfloat16()``, or ``cross_entropy`` computed on 16-bit logits — the op stays
in its wider dtype and returns the loss in the original's dtype; the rewrite records it in
``details["precision"]`` ("computes in float64 where the original rounded the logits to
float16 (`.half()`, ...)"), which the report's table shows next to the rewrite.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

# Importing the kernels registers the torch.library ops the rewrite inserts.
import longctx_compiler.kernels.linear_cross_entropy  # noqa: F401
from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext
from longctx_compiler.passes.analysis.fx_utils import arg, example_value, getitem, insert_call, is_call, propagate_example_value, writes_in_place

__all__ = ["TiledLMLossPass"]

OP = torch.ops.longctx.linear_cross_entropy_fwd.default

_CROSS_ENTROPY = (F.cross_entropy, torch.nn.functional.cross_entropy)
_LINEAR = (F.linear, torch._C._nn.linear)
_MATMUL = (torch.matmul, operator.matmul, torch.mm, "matmul", "mm")
_CASTS = ("to", "type", "float", "double", "half", "bfloat16", "long", "int", "short", "bool", "char", "byte")
_RESHAPES = (torch.reshape, "view", "reshape")
_FLATTEN = (torch.flatten, "flatten")
_MUL = (operator.mul, torch.mul, "mul")
_DIV = (operator.truediv, torch.div, torch.true_divide, "div", "true_divide")
_TANH = (torch.tanh, "tanh")
_TRANSPOSE_2D = ("t", torch.t)
# Users through which a tensor is still the same memory (for the in-place check).
_ALIASING_METHODS = {
    "view", "reshape", "contiguous", "to", "type", "float", "double", "half", "bfloat16", "flatten", "transpose", "t",
    "permute", "expand", "expand_as", "squeeze", "unsqueeze", "narrow", "select", "split", "chunk", "unbind",
    "as_strided", "detach", "view_as", "reshape_as", "unflatten", "movedim", "swapaxes", "swapdims", "unfold",
    "diagonal", "real", "imag",
}
_ALIASING_FUNCTIONS = {
    operator.getitem, torch.reshape, torch.flatten, torch.transpose, torch.t, torch.permute, torch.squeeze,
    torch.unsqueeze, torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind, torch.as_strided,
    torch.detach, torch.movedim, torch.swapaxes, torch.diagonal, getattr,
}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# How far past an unrecognised op we look for an LM head before deciding the loss is not ours.
_LOOKBACK = 6


class TiledLMLossPass(Pass):
    """``cross_entropy(linear(h, W, b) [cast/view/shift], labels)`` → ``longctx::linear_cross_entropy_fwd``."""

    name = "tiled_lm_loss"
    kind = "linear+cross_entropy -> linear_cross_entropy"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.config.lm_loss.enabled

    def kind_of(self, match: Match) -> str:
        kept = " (logits kept)" if match.data.get("logits_kept") else ""
        return f"{match.data['head_kind']}+cross_entropy -> linear_cross_entropy{kept}"

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        d = match.data
        return {
            "chunk_size": ctx.config.lm_loss.chunk_size or "auto (tile logits no larger than the hidden states, at most 2^22)",
            "reduction": d.get("reduction"),
            "ignore_index": d.get("ignore_index"),
            "vocab": d.get("V"),
            "hidden": d.get("H"),
            "bias": d.get("bias") is not None,
            "logits_kept": d.get("logits_kept"),
            **({"logits": "returned as None (training with labels; lm_loss.return_logits=True keeps them)"} if d.get("logits_dropped") else {}),
            "shift_slice": any(kind == "index" for _, kind in d.get("steps", ())),
            "saved": "h, weight, bias, labels, lse [N]",
            **({"autocast": f"head in {_name(d['autocast'])} (operands cast as autocast casts linear), loss in float32"} if d.get("autocast") else {}),
            **({"precision": d["precision"]} if d.get("precision") else {}),
            **({"logit_scale": d["logit_scale"]} if d.get("logit_scale", 1.0) != 1.0 else {}),
            **({"softcap": d["softcap"]} if d.get("softcap") else {}),
        }

    # -- match ------------------------------------------------------------------------------
    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        for node in gm.graph.nodes:
            if is_call(node, *_CROSS_ENTROPY):
                m = self._match_loss(node)
                if m is not None:
                    yield m

    def _match_loss(self, ce: fx.Node) -> Match | None:
        """Walk back from the loss's input through casts/reshapes/indexing to the head."""
        steps: list[tuple[fx.Node, str]] = []
        cur = arg(ce, 0, "input")
        while isinstance(cur, fx.Node) and _head_kind(cur) is None:
            kind = _step_kind(cur)
            scaled = _scale_step(cur) if kind is None else None
            if scaled is not None:
                steps.append((cur, "scale"))
                cur = scaled[0]
                continue
            if kind is None:
                head = _find_head_upstream(cur)
                if head is None:
                    # No LM head in sight: some other loss, not ours to judge.
                    return None
                what = cur.target if cur.op == "call_method" else getattr(cur.target, "__name__", str(cur.target))
                return Match(
                    anchor=head, nodes=[ce, *[n for n, _ in steps], cur],
                    data={"refuse": f"`{what}` ({cur.name}) between the LM head ({head.name}) and the loss: only casts, "
                                    "reshapes, slicing, constant scales and soft-capping (cap · tanh(x / cap)) are "
                                    "folded into the tiled loss"},
                )
            steps.append((cur, kind))
            cur = cur.args[0]
        if not isinstance(cur, fx.Node):
            return None
        head = cur
        data = {"ce": ce, "head": head, "head_kind": _head_kind(head), "steps": list(reversed(steps))}
        return Match(anchor=head, nodes=[ce, *[n for n, _ in steps], head], data=data)

    # -- check -------------------------------------------------------------------------------
    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        d = match.data
        if "refuse" in d:
            raise CantApply(d["refuse"])
        ce, head = d["ce"], d["head"]
        self._check_loss_arguments(ce, d)
        self._check_head(head, d)
        V = d["V"]

        labels = example_value(d["labels"])
        if not isinstance(labels, torch.Tensor):
            raise CantApply("the labels are not a tensor")
        if labels.dtype.is_floating_point:
            raise CantApply("soft (probability) targets: only class-index labels are supported")
        if labels.dtype != torch.int64 or labels.dim() != 1:
            raise CantApply(f"labels must be 1-D int64 class indices, got {labels.dim()}-D {labels.dtype}")
        x = example_value(arg(ce, 0, "input"))
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise CantApply("the loss's input is not 2-D [tokens, vocab] (class dimension elsewhere)")
        if not x.dtype.is_floating_point:
            raise CantApply(f"the loss's input has non-float dtype {x.dtype}")

        prev = example_value(head)
        for node, kind in d["steps"]:
            out = example_value(node)
            if not isinstance(out, torch.Tensor):
                raise CantApply(f"unknown value for {node.name}")
            if kind == "cast":
                if out.dtype not in _FLOATS:
                    raise CantApply(f"the logits are cast to the non-float dtype {out.dtype} ({node.name})")
                if out.device != prev.device or out.dim() != prev.dim() or not all(_same_size(a, b) for a, b in zip(out.shape, prev.shape)):
                    raise CantApply(f"{node.name} moves the logits to another device or changes their shape")
            elif kind == "index":
                _check_index(node, prev)
            elif kind == "reshape":
                shape = _reshape_args(node)
                if shape is None or not all(isinstance(s, (int, fx.Node)) for s in shape):
                    raise CantApply(f"{node.name} is not a plain reshape")
            elif kind == "flatten":
                _check_flatten(node, prev)
            elif kind in ("scale", "tanh"):
                if out.dtype not in _FLOATS or tuple(out.shape) != tuple(prev.shape):
                    raise CantApply(f"{node.name} changes the logits' shape or dtype")
            if out.dim() == 0 or not _same_size(out.shape[-1], V) or not _same_size(prev.shape[-1], V):
                raise CantApply(f"{node.name} does not keep the vocabulary ({V}) as the last dimension")
            prev = out

        _check_no_inplace(head)
        d["logit_scale"], d["softcap"] = _transform(d["steps"])
        d["precision"] = _precision(ce, head, d["steps"])
        chain = [n for n, _ in reversed(d["steps"])] + [head]
        d["removed"] = _removable(ce, chain)
        d["logits_dropped"] = False
        if head not in d["removed"] and self._drop_returned_logits(ce, ctx):
            d["removed"] = _removable(ce, chain, returned=True)
            d["logits_dropped"] = head in d["removed"]
        d["logits_kept"] = head not in d["removed"]
        # The report's "nodes replaced": what actually disappears.
        match.nodes = [n for n in match.nodes if n in d["removed"]]

    def _drop_returned_logits(self, ce: fx.Node, ctx: PassContext) -> bool:
        """Whether the logits the graph returns become None (Liger Kernel's convention): in
        training — the loss needs a gradient, which Dynamo only records with grad mode on, so
        evaluation and ``generate`` keep their logits — unless ``return_logits`` is set."""
        loss = example_value(ce)
        return not ctx.config.lm_loss.return_logits and isinstance(loss, torch.Tensor) and loss.requires_grad

    def _check_loss_arguments(self, ce: fx.Node, d: dict) -> None:
        if arg(ce, 2, "weight") is not None:
            raise CantApply("class weights: the tiled loss computes the unweighted cross-entropy")
        if arg(ce, 3, "size_average") is not None or arg(ce, 5, "reduce") is not None:
            raise CantApply("legacy size_average/reduce arguments")
        reduction = arg(ce, 6, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise CantApply(f"reduction={reduction!r}: the tiled op returns a reduced loss ('mean' or 'sum'), not per-token losses")
        smoothing = arg(ce, 7, "label_smoothing", 0.0)
        if not isinstance(smoothing, (int, float)) or smoothing != 0:
            raise CantApply(f"label_smoothing={smoothing!r}: only the plain cross-entropy is implemented")
        ignore_index = arg(ce, 4, "ignore_index", -100)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise CantApply("ignore_index is only known at run time")
        d.update(reduction=reduction, ignore_index=ignore_index, labels=arg(ce, 1, "target"))

    def _check_head(self, head: fx.Node, d: dict) -> None:
        if d["head_kind"] == "linear":
            h, w, b = head.args[0], arg(head, 1, "weight"), arg(head, 2, "bias")
            wt = None
        else:
            h, m = head.args[0], head.args[1]
            b = None
            w, wt = _untranspose(m), None
            if w is None:
                w, wt = None, m
        hv, outv = example_value(h), example_value(head)
        wv = example_value(w if w is not None else wt)
        bv = example_value(b)
        if not all(isinstance(t, torch.Tensor) for t in (hv, wv, outv)) or (b is not None and not isinstance(bv, torch.Tensor)):
            raise CantApply("unknown values for the LM head's operands")
        if hv.dtype not in _FLOATS:
            raise CantApply(f"the hidden states have non-float dtype {hv.dtype}")
        if hv.dim() < 2 or wv.dim() != 2:
            raise CantApply(f"the head is not [.., H] x [V, H] (got {hv.dim()}-D hidden states, {wv.dim()}-D weight)")
        d["autocast"] = _autocast_dtype(head, outv, [hv, wv] + ([bv] if b is not None else []))
        V, H = (wv.shape[1], wv.shape[0]) if wt is not None else (wv.shape[0], wv.shape[1])
        if isinstance(V, torch.SymInt) or isinstance(H, torch.SymInt):
            raise CantApply("the vocabulary or hidden size is dynamic")
        if b is not None and (bv.dim() != 1 or bv.shape[0] != V):
            raise CantApply(f"a bias of shape {tuple(bv.shape)} is not [V] = [{V}]")
        if not _same_size(hv.shape[-1], H) or not _same_size(outv.shape[-1], V):
            raise CantApply("the LM head's shapes do not line up")
        d.update(h=h, weight=w, weight_t=wt, bias=b, V=int(V), H=int(H))

    # -- apply -------------------------------------------------------------------------------
    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        d = match.data
        graph = gm.graph
        ce, head = d["ce"], d["head"]
        before = set(graph.nodes)
        with graph.inserting_before(ce):
            weight = d["weight"] if d["weight"] is not None else insert_call(graph, torch.t, (d["weight_t"],))
            h = _replay(graph, d["h"], d["steps"], d["H"])
            bias = d["bias"]
            if d["autocast"] is not None:
                # Autocast ran the head in its lower-precision dtype: the same casts, explicit,
                # so the op computes what the original did whatever the ambient autocast state.
                h, weight, bias = (_cast(graph, x, d["autocast"]) for x in (h, weight, bias))
            logits = None
            if d["logits_kept"]:
                logits = _replay(graph, insert_call(graph, torch.detach, (head,)), d["steps"], d["V"])
            res = insert_call(graph, OP, (h, weight, bias, d["labels"], logits, d["ignore_index"], d["reduction"], _chunk(ctx),
                                          d["logit_scale"], d["softcap"]))
            loss = getitem(graph, res, 0)
            want = example_value(ce)
            if isinstance(want, torch.Tensor) and example_value(loss).dtype != want.dtype:
                loss = graph.call_method("to", (loss, want.dtype))
                propagate_example_value(loss)
        ce.replace_all_uses_with(loss)
        if d["logits_dropped"]:
            out = next(n for n in graph.nodes if n.op == "output")
            gone = set(d["removed"])
            out.args = fx.node.map_arg(out.args, lambda a: None if a in gone else a)
        for n in d["removed"]:
            if not n.users:
                graph.erase_node(n)
        return [n for n in graph.nodes if n not in before]


# ------------------------------------------------------------------------------------------ helpers
def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _bits(dtype: torch.dtype) -> int:
    """Mantissa bits: the order "more precise than" among float dtypes (bf16 < fp16 < fp32 < fp64)."""
    return round(-math.log2(torch.finfo(dtype).eps))


def _autocast_dtype(head: fx.Node, out: torch.Tensor, operands: list[torch.Tensor]) -> torch.dtype | None:
    """None when the head computes in its operands' one dtype; the autocast dtype when its
    dtypes are autocast's casting of a ``linear``/``matmul`` (CantApply otherwise).

    Autocast (torch.amp) puts ``linear`` and ``matmul`` on its lower-precision list: every
    eligible operand (floating point, on the autocast device, not float64) is cast to the
    autocast dtype and the result comes out in it. Mixed operand dtypes reach a traced head only
    that way (``linear`` refuses them otherwise), and the head's recorded output dtype says which.
    """
    dtypes = {t.dtype for t in operands}
    if dtypes == {out.dtype}:
        return None
    what = f"mixed dtypes in the LM head ({', '.join(sorted(_name(x) for x in dtypes | {out.dtype}))})"
    device_type = out.device.type
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type) if torch.amp.is_autocast_available(device_type) else None
    aten = "aten::linear" if is_call(head, *_LINEAR) else "aten::matmul"
    if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(aten, key):
        raise CantApply(f"{what}: not autocast's casting of {aten} on {device_type}")
    if out.dtype not in (torch.float16, torch.bfloat16):
        raise CantApply(f"{what}: the head's result is {_name(out.dtype)}, not an autocast lower-precision dtype")
    for t in operands:
        if t.dtype != out.dtype and not (t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device_type):
            raise CantApply(f"{what}: an operand in {_name(t.dtype)} is not one autocast casts to {_name(out.dtype)}")
    return out.dtype


def _precision(ce: fx.Node, head: fx.Node, steps: list[tuple[fx.Node, str]]) -> str | None:
    """The report's note when the op is more precise than the original (None when it is as
    precise); CantApply when the original is *more* precise than the op would be.

    The op computes the head's logits in the head's dtype (as the original, autocast
    included), then the log-softmax and the loss in its accumulation dtype (float32; float64
    for float64 logits). The original rounds the logits to every cast's dtype on the way to the
    loss, and ``cross_entropy`` computes in its own result's dtype (float32 under autocast,
    which has it on its float32 list).
    """
    from longctx_compiler.kernels.linear_cross_entropy.reference import accumulation_dtype

    acc = accumulation_dtype(example_value(head).dtype)
    rounded = [(node, example_value(node).dtype) for node, kind in steps if kind == "cast"]
    loss_dtype = example_value(ce).dtype
    for node, dt in rounded + [(ce, loss_dtype)]:
        if _bits(dt) > _bits(acc):
            where = f"the logits are cast up to {_name(dt)} ({node.name})" if node is not ce else f"cross_entropy computes in {_name(dt)}"
            raise CantApply(f"{where}: the tiled loss accumulates in {_name(acc)} and would be less precise than the original")
    notes = []
    for node, dt in rounded:
        if _bits(dt) < _bits(acc):
            what = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
            notes.append(f"the original rounded the logits to {_name(dt)} (`.{what}()`, {node.name})")
    narrow = sorted({_name(example_value(n).dtype) for n, kind in steps if kind in ("scale", "tanh") and _bits(example_value(n).dtype) < _bits(acc)})
    if narrow:
        notes.append(f"the original scaled or soft-capped the logits in {', '.join(narrow)}")
    if _bits(loss_dtype) < _bits(acc):
        notes.append(f"the original computed cross_entropy in {_name(loss_dtype)}")
    if not notes:
        return None
    return f"computes in {_name(acc)} where " + "; ".join(notes)


def _cast(graph: fx.Graph, x: fx.Node | None, dtype: torch.dtype) -> fx.Node | None:
    if x is None or example_value(x).dtype == dtype:
        return x
    node = graph.call_method("to", (x, dtype))
    propagate_example_value(node)
    return node


def _chunk(ctx: PassContext) -> int:
    """The op's tile argument: the configured rows, or 0 (automatic, see ``tile_rows``)."""
    return ctx.config.lm_loss.chunk_size or 0


def _head_kind(node: fx.Node) -> str | None:
    if is_call(node, *_LINEAR):
        return "linear"
    if is_call(node, *_MATMUL) and len(node.args) == 2:
        m = example_value(node.args[1])
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            return "matmul"
    return None


def _step_kind(node: fx.Node) -> str | None:
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_method" and node.target in _CASTS:
        return "cast"
    if node.op == "call_method" and node.target == "contiguous":
        return "contiguous"
    if is_call(node, operator.getitem):
        return "index"
    if is_call(node, *_RESHAPES):
        return "reshape"
    if is_call(node, *_FLATTEN):
        return "flatten"
    if is_call(node, *_TANH) and len(node.args) == 1 and not node.kwargs:
        return "tanh"
    return None


def _scale_step(node: fx.Node) -> tuple[fx.Node, str, float] | None:
    """``(logits, "mul"|"div", constant)`` when ``node`` multiplies or divides one value by a
    number known at compile time (``logits * 0.5``, ``2.0 * logits``, ``logits / 8``)."""
    if not isinstance(node, fx.Node) or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if is_call(node, *_MUL):
        if isinstance(a, fx.Node) and _is_number(b):
            return a, "mul", float(b)
        if isinstance(b, fx.Node) and _is_number(a):
            return b, "mul", float(a)
    elif is_call(node, *_DIV) and isinstance(a, fx.Node) and _is_number(b):
        return a, "div", float(b)
    return None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _transform(steps: list[tuple[fx.Node, str]]) -> tuple[float, float]:
    """``(logit_scale, softcap)`` of the elementwise steps between head and loss (head side
    first): any number of constant scales, then optionally a soft-capping
    ``cap · tanh(x / cap)`` (Gemma's ``x / cap → tanh → · cap``; a bare ``tanh`` is cap 1)."""
    ops = [(n, kind, *(_scale_step(n)[1:] if kind == "scale" else ())) for n, kind in steps if kind in ("scale", "tanh")]
    tanhs = [i for i, o in enumerate(ops) if o[1] == "tanh"]
    if len(tanhs) > 1:
        raise CantApply(f"tanh applied {len(tanhs)} times to the logits: only one soft-capping is folded into the tiled loss")
    scale, cap = 1.0, 0.0
    pre = ops
    if tanhs:
        t = tanhs[0]
        before, after = ops[:t], ops[t + 1:]
        cap = 1.0
        if after:
            last = after[0]
            if len(after) != 1 or last[2] != "mul":
                raise CantApply(f"{last[0].name} after the tanh of the logits: only `cap · tanh(x / cap)` (soft-capping) is folded into the tiled loss")
            cap = last[3]
            if not before or not ((before[-1][2] == "div" and before[-1][3] == cap) or (before[-1][2] == "mul" and before[-1][3] * cap == 1.0)):
                raise CantApply(f"`tanh(...) · {cap:g}` without the matching `x / {cap:g}` before it: not a soft-capping `cap · tanh(x / cap)`")
            before = before[:-1]
        if not cap > 0:
            raise CantApply(f"soft-capping with cap {cap:g}: the tiled loss takes a positive cap")
        pre = before
    for _, _, op, c in pre:
        if op == "div" and c == 0:
            raise CantApply("the logits are divided by 0")
        scale = scale * c if op == "mul" else scale / c
    return scale, cap


def _find_head_upstream(node: fx.Node) -> fx.Node | None:
    frontier, seen = [node], set()
    for _ in range(_LOOKBACK):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a in seen:
                    continue
                seen.add(a)
                if _head_kind(a) is not None:
                    return a
                nxt.append(a)
        frontier = nxt
    return None


def _untranspose(m: fx.Node) -> fx.Node | None:
    """``W`` when ``m`` is ``W.T`` / ``W.t()`` / ``W.transpose(0, 1)`` of a 2-D ``W``, else None."""
    if not isinstance(m, fx.Node):
        return None
    base = None
    if is_call(m, *_TRANSPOSE_2D):
        base = m.args[0]
    elif is_call(m, getattr) and m.args[1] in ("T", "mT"):
        base = m.args[0]
    elif is_call(m, "transpose", torch.transpose) and sorted(d % 2 for d in m.args[1:3] if isinstance(d, int)) == [0, 1]:
        base = m.args[0]
    elif is_call(m, "permute", torch.permute) and tuple(m.args[1:] if len(m.args) > 2 else m.args[1]) in ((1, 0), (-1, -2), (1, -2), (-1, 0)):
        base = m.args[0]
    bv = example_value(base)
    return base if isinstance(bv, torch.Tensor) and bv.dim() == 2 else None


def _same_size(a: Any, b: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b)) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else a == b


def _reshape_args(node: fx.Node) -> tuple | None:
    if "shape" in node.kwargs or "size" in node.kwargs:
        shape = node.kwargs.get("shape", node.kwargs.get("size"))
    elif len(node.args) == 2 and isinstance(node.args[1], (tuple, list, torch.Size)):
        shape = node.args[1]
    else:
        shape = node.args[1:]
    return tuple(shape) if len(shape) else None


def _flatten_dims(node: fx.Node, rank: int) -> tuple[int, int]:
    start = arg(node, 1, "start_dim", 0)
    end = arg(node, 2, "end_dim", -1)
    if not isinstance(start, int) or not isinstance(end, int):
        raise CantApply(f"{node.name}: flatten dims only known at run time")
    return start % rank if rank else 0, end % rank if rank else 0


def _check_flatten(node: fx.Node, prev: torch.Tensor) -> None:
    _, end = _flatten_dims(node, prev.dim())
    if end == prev.dim() - 1:
        raise CantApply(f"{node.name} flattens the vocabulary dimension")


def _check_index(node: fx.Node, prev: torch.Tensor) -> None:
    """Basic indexing (ints, slices, ``...``) that leaves the last (vocabulary) dim whole."""
    idx = node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    for i in idx:
        basic = i is Ellipsis or isinstance(i, (int, slice)) or (isinstance(i, fx.Node) and isinstance(example_value(i), (int, torch.SymInt)))
        if not basic:
            raise CantApply(f"{node.name}: indexing of the logits with {type(i).__name__} (only ints, slices and ... are replayed on h)")
    if sum(i is Ellipsis for i in idx) > 1:
        raise CantApply(f"{node.name}: more than one Ellipsis")
    full = slice(None, None, None)
    if Ellipsis in idx:
        after = idx[idx.index(Ellipsis) + 1:]
        last = after[-1] if after else full
    else:
        last = idx[-1] if len(idx) == prev.dim() else full
    if not (isinstance(last, slice) and last == full):
        raise CantApply(f"{node.name}: the indexing selects vocabulary entries ({last!r})")


def _check_no_inplace(head: fx.Node) -> None:
    """Refuse when the logits (or any view of them) are modified in place anywhere."""
    todo, seen = [head], {head}
    while todo:
        n = todo.pop()
        for u in n.users:
            if writes_in_place(u, n):
                what = u.target if u.op == "call_method" else getattr(u.target, "__name__", str(u.target))
                raise CantApply(f"the logits are modified in place by `{what}` ({u.name}): the tiled loss recomputes them from h and W")
            if u not in seen and (
                (u.op == "call_method" and u.target in _ALIASING_METHODS) or (u.op == "call_function" and u.target in _ALIASING_FUNCTIONS)
            ):
                seen.add(u)
                todo.append(u)


def _removable(ce: fx.Node, chain: list[fx.Node], returned: bool = False) -> list[fx.Node]:
    """The loss and the chain nodes (loss-side first) that die with it: a node survives when
    something outside the dying set uses it, and then so does everything upstream of it.
    ``returned``: the graph's output does not count as a use (what it returns of the logits —
    the head's result, its ``.float()``, ... — becomes None)."""
    dead = [ce]
    for n in chain:
        if all(u in dead or (returned and u.op == "output") for u in n.users):
            dead.append(n)
        else:
            break
    return dead


def _replay(graph: fx.Graph, x: fx.Node, steps: list[tuple[fx.Node, str]], last: int) -> fx.Node:
    """Apply the index/reshape steps that led from the logits to the loss's input to ``x``
    (``h`` with last dim ``H``, or the logits themselves), skipping casts and copies; ends 2-D."""
    for node, kind in steps:
        if kind == "index":
            x = insert_call(graph, operator.getitem, (x, node.args[1]))
        elif kind == "reshape":
            shape = _reshape_args(node)
            x = insert_call(graph, torch.reshape, (x, (*shape[:-1], last)))
        elif kind == "flatten":
            start, end = _flatten_dims(node, example_value(x).dim())
            x = insert_call(graph, torch.flatten, (x, start, end))
    if example_value(x).dim() != 2:
        x = insert_call(graph, torch.reshape, (x, (-1, last)))
    return x

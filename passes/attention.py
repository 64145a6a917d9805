"""Attention → sequence-chunked (FPDT) attention.

Two spellings are recognised in the Dynamo graph:

* **SDPA** — ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal,
  scale, enable_gqa)``::

      before:  out = scaled_dot_product_attention(q, k, v, is_causal=True, scale=s)
      after:   res = longctx.chunked_attention_fwd(q, k, v, True, s, chunk)
               out = res[0]

* **Hand-written** (``transformers``' ``attn_implementation="eager"``)::

      before:  w = matmul(q, k.transpose(2, 3)) * s ; w = w + mask
               p = softmax(w, dim=-1, dtype=float32).to(q.dtype) ; p = dropout(p, 0.0)
               out = matmul(p, v)
      after:   res = longctx.chunked_attention_fwd(q, k, v, True, s, chunk) ; out = res[0]

Keys/values repeated per query head (``repeat_kv``'s expand + reshape) are traced back to
the un-repeated tensors: the op reads grouped heads by index, so the copies disappear too.

What makes a rewrite exact (checked, refused otherwise with the reason in the report):
dropout is exactly 0 (or the module is in eval mode), the mask is absent or *proven* causal
for every sequence length (:mod:`longctx_compiler.passes.causal_mask`), tensors are 4-D
``[B, H, T, D]``, heads divide evenly, and — for the hand-written form — the intermediate
scores and probabilities are used by nothing else (``output_attentions=True`` returns them).

Precision: the op accumulates in float32 for 16/32-bit inputs and in float64 for float64,
which is at least the precision of either spelling (``transformers`` computes the eager
softmax in float32 even in a float64 model: our float64 result is more precise there).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

# Importing the kernels registers the torch.library ops the rewrite inserts.
import longctx_compiler.kernels.attention  # noqa: F401
from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext
from longctx_compiler.passes.causal_mask import NotProvable, prove_causal
from longctx_compiler.passes.fx_utils import arg, example_value, getitem, insert_call, is_call, strip_repeat_kv
from longctx_compiler.passes.registry import register_pass

__all__ = ["ChunkedAttentionPass"]

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_MATMUL = (torch.matmul, operator.matmul, "matmul")
_SOFTMAX = (F.softmax, torch.softmax, torch.nn.functional.softmax, "softmax")


@register_pass("rewrite", order=10)
class ChunkedAttentionPass(Pass):
    """Scaled-dot-product attention (SDPA or hand-written) → ``longctx::chunked_attention_fwd``."""

    name = "chunked_attention"
    kind = "attention -> chunked_attention"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.config.attention.enabled

    def kind_of(self, match: Match) -> str:
        spelling = match.data["spelling"]
        target = "chunked_attention+offload" if match.data.get("offload") else "chunked_attention"
        return f"{spelling} -> {target}"

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        d = match.data
        return {
            "chunk_size": ctx.config.attention.chunk_size,
            "offload": ctx.config.attention.offload,
            "causal": d.get("causal"),
            "gqa_groups": d.get("groups"),
            "repeat_kv_removed": d.get("repeat_kv_removed", False),
        }

    # -- match ------------------------------------------------------------------------------
    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        for node in gm.graph.nodes:
            if is_call(node, *_SDPA):
                yield self._match_sdpa(node)
            elif is_call(node, *_MATMUL):
                m = self._match_eager(node)
                if m is not None:
                    yield m

    def _match_sdpa(self, node: fx.Node) -> Match:
        q, k, v = node.args[:3]
        data = {
            "spelling": "sdpa",
            "q": q,
            "k": k,
            "v": v,
            "mask": arg(node, 3, "attn_mask"),
            "dropout": arg(node, 4, "dropout_p", 0.0),
            "causal": arg(node, 5, "is_causal", False),
            "scale": arg(node, 6, "scale"),
            "enable_gqa": arg(node, 7, "enable_gqa", False),
            "mask_additive": None,
        }
        return Match(anchor=node, nodes=[node], data=data)

    def _match_eager(self, out: fx.Node) -> Match | None:
        """Walk back from ``matmul(probs, v)`` through dropout/cast/softmax/mask/scale to ``q @ kᵀ``."""
        probs, v = out.args[0], out.args[1]
        nodes = [out]
        dropout = 0.0
        training = True
        cur = probs
        if is_call(cur, F.dropout, torch.dropout, "dropout"):
            dropout = arg(cur, 1, "p", 0.5)
            training = arg(cur, 2, "training", True)
            nodes.append(cur)
            cur = cur.args[0]
        if is_call(cur, "to", "type_as", "float", "double", "half", "bfloat16"):
            nodes.append(cur)
            cur = cur.args[0]
        if not is_call(cur, *_SOFTMAX):
            return None
        softmax = cur
        dim = arg(softmax, 1, "dim")
        nodes.append(softmax)
        cur = softmax.args[0]
        mask = None
        if is_call(cur, operator.add, torch.add, "add"):
            mask = cur.args[1]
            nodes.append(cur)
            cur = cur.args[0]
        scale = 1.0
        if is_call(cur, operator.mul, torch.mul, "mul") and isinstance(cur.args[1], (int, float)):
            scale = float(cur.args[1])
            nodes.append(cur)
            cur = cur.args[0]
        elif is_call(cur, operator.truediv, torch.div, "div") and isinstance(cur.args[1], (int, float)):
            scale = 1.0 / float(cur.args[1])
            nodes.append(cur)
            cur = cur.args[0]
        if not is_call(cur, *_MATMUL):
            return None
        scores = cur
        nodes.append(scores)
        q, kt = scores.args[0], scores.args[1]
        if not (is_call(kt, "transpose", torch.transpose) and sorted(_norm_dims(kt.args[1:3], kt)) == [2, 3]):
            return None
        nodes.append(kt)
        k = kt.args[0]
        data = {
            "spelling": "matmul-softmax-matmul",
            "q": q,
            "k": k,
            "v": v,
            "mask": mask,
            "dropout": dropout if training else 0.0,
            "causal": False,
            "scale": scale,
            "enable_gqa": False,
            "mask_additive": True,
            "softmax_dim": dim,
        }
        return Match(anchor=out, nodes=nodes, data=data)

    # -- check -------------------------------------------------------------------------------
    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        d = match.data
        if not isinstance(d["dropout"], (int, float)) or d["dropout"] != 0:
            raise CantApply(f"attention dropout p={d['dropout']} in training: chunking would change the random mask (use p=0 or eval mode)")
        if d["spelling"] == "matmul-softmax-matmul":
            if d["softmax_dim"] not in (-1, 3):
                raise CantApply(f"softmax over dim {d['softmax_dim']}, not over the keys")
            # Intermediates must die inside the pattern, or the [T, S] tensors still exist.
            inner = set(match.nodes)
            for n in match.nodes:
                if n is match.anchor:
                    continue
                outside = [u for u in n.users if u not in inner]
                if outside:
                    raise CantApply(f"the attention scores/probabilities ({n.name}) are used outside attention (output_attentions=True?)")
        q, k, v = (example_value(d[x]) for x in ("q", "k", "v"))
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            raise CantApply("unknown shapes for q/k/v")
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise CantApply(f"q/k/v are not 4-D [B, H, T, D] (got {q.dim()}-D/{k.dim()}-D/{v.dim()}-D)")
        if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
            raise CantApply(f"mixed or non-float dtypes {q.dtype}/{k.dtype}/{v.dtype}")
        if not statically_known_true(k.shape[3] == q.shape[3]) or not statically_known_true(v.shape[3] == q.shape[3]):
            raise CantApply("value head dim differs from query head dim")
        if isinstance(q.shape[3], torch.SymInt):
            raise CantApply("the head dim is dynamic")
        if isinstance(q.shape[1], torch.SymInt) or isinstance(k.shape[1], torch.SymInt):
            raise CantApply("the number of heads is dynamic")
        hq, hkv = q.shape[1], k.shape[1]
        if hq != hkv and not (d["enable_gqa"] or hq % hkv == 0):
            raise CantApply(f"{hq} query heads and {hkv} key/value heads without enable_gqa")
        if hq % hkv:
            raise CantApply(f"{hq} query heads are not a multiple of {hkv} key/value heads")
        if d["scale"] is not None and not isinstance(d["scale"], (int, float)):
            raise CantApply("the softmax scale is only known at run time")
        mask = d["mask"]
        if mask is not None:
            if d["causal"]:
                raise CantApply("both a mask and is_causal")
            mval = example_value(mask)
            if not isinstance(mask, fx.Node) or not isinstance(mval, torch.Tensor):
                raise CantApply("a mask that is not a tensor")
            additive = mval.dtype != torch.bool if d["mask_additive"] is None else d["mask_additive"]
            if additive and mval.dtype == torch.bool:
                raise CantApply("a boolean tensor added to the scores")
            try:
                prove_causal(mask, additive=additive)
            except NotProvable as why:
                raise CantApply(f"mask not proven causal: {why}") from None
            d["causal"] = True
            d["mask_proven_causal"] = True
        d["offload"] = ctx.config.attention.offload

    # -- apply -------------------------------------------------------------------------------
    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        d = match.data
        graph = gm.graph
        k, v = strip_repeat_kv(d["k"]), strip_repeat_kv(d["v"])
        d["repeat_kv_removed"] = k is not d["k"]
        d["groups"] = example_value(d["q"]).shape[1] // example_value(k).shape[1]
        head_dim = example_value(d["q"]).shape[3]
        scale = float(d["scale"]) if d["scale"] is not None else 1.0 / math.sqrt(head_dim)
        cfg = ctx.config.attention
        if cfg.offload and cfg.host_pool_bytes is not None:
            # The offload ops keep their copies in the process-wide pool; its budget is the
            # user's bound on host memory (a clear HostMemoryError past it, never a swap storm).
            from longctx_compiler.runtime import get_default_pool

            get_default_pool().max_bytes = cfg.host_pool_bytes
        op = torch.ops.longctx.chunked_attention_fwd_offload.default if cfg.offload else torch.ops.longctx.chunked_attention_fwd.default
        with graph.inserting_before(match.anchor):
            res = insert_call(graph, op, (d["q"], k, v, bool(d["causal"]), scale, cfg.chunk_size))
            out = getitem(graph, res, 0)
        _carry_dtype(match.anchor, out)
        match.anchor.replace_all_uses_with(out)
        for n in match.nodes:
            if not n.users:
                graph.erase_node(n)
        return [res, out]


def _norm_dims(dims: Any, node: fx.Node) -> list[int]:
    rank = example_value(node.args[0]).dim() if isinstance(example_value(node.args[0]), torch.Tensor) else 4
    return [x + rank if isinstance(x, int) and x < 0 else x for x in dims]


def _carry_dtype(old: fx.Node, new: fx.Node) -> None:
    # Both spellings return the input dtype, and so does the op: nothing to cast. Checked so
    # that a future spelling with a cast cannot slip through silently.
    ov, nv = example_value(old), example_value(new)
    if isinstance(ov, torch.Tensor) and isinstance(nv, torch.Tensor) and ov.dtype != nv.dtype:
        raise RuntimeError(f"chunked attention would change the dtype {ov.dtype} -> {nv.dtype}")

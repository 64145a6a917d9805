"""Attention → sequence-chunked (FPDT) attention.

Two spellings are recognised in the Dynamo graph:

* **SDPA** — ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal,
  scale, enable_gqa)``::

      before:  out = scaled_dot_product_attention(q, k, v, is_causal=True, scale=s)
      after:   res = longctx.chunked_attention_fwd(q, k, v, True, s, chunk, budget)
               out = res[0]

* **Hand-written** (``transformers``' ``attn_implementation="eager"``)::

      before:  w = matmul(q, k.transpose(2, 3)) * s ; w = w + mask
               p = softmax(w, dim=-1, dtype=float32).to(q.dtype) ; p = dropout(p, 0.0)
               out = matmul(p, v)
      after:   res = longctx.chunked_attention_fwd(q, k, v, True, s, chunk, budget) ; out = res[0]

Keys/values repeated per query head (``repeat_kv``'s expand + reshape) are traced back to
the un-repeated tensors: the op reads grouped heads by index, so the copies disappear too.

**Input relations.** The op takes ``q [B, H, T, D]`` and ``k, v [B, P, S, D]`` with ``P | H``
(query head ``h`` reads key/value head ``h // (H/P)``). The original may relate its operands
in more ways, and each is brought to that form exactly or refused with the reason:

* heads: every key/value spelling (``repeat_kv``, ``enable_gqa``'s ``repeat_interleave``,
  broadcasting a single head, equal heads) reads physical head ``h // (H/P)`` of its tensor;
  when ``k`` and ``v`` end up with different ``P`` (``repeat_kv`` on one of them only,
  ``enable_gqa`` with different head counts) both are brought to ``lcm(Pk, Pv)`` heads (a view
  for one head, else ``repeat_interleave``); a single query head broadcast against ``H`` is
  expanded (a view);
* batch: operands of batch 1 broadcast against the output's batch are expanded (a view;
  autograd sums their gradients back);
* sequence: ``T != S`` is fine (``is_causal`` is SDPA's top-left mask, which the op uses);
  ``k`` and ``v`` of lengths known to differ, a query length other than the output's, a value head
  dim other than the query head dim, non-4-D operands, dynamic head dims/counts: refused;
* scale: any finite number (zero and negative included) — refused when only known at run
  time, infinite, nan, or a division by zero or with rounding;
* dtypes: one floating dtype after the casts autocast applies (below), and the op's result
  dtype equal to the original's; otherwise refused;
* empty sequences (``T = 0`` or ``S = 0``) and strided/non-contiguous operands: the op
  handles them as the original does.

**Autocast.** Under ``torch.autocast`` (around the compiled call, or a region inside the graph)
SDPA casts q/k/v to the autocast dtype (it is on autocast's lower-precision list) and the
hand-written spelling's matmuls do the same. The op has an Autocast kernel with that rule
(``kernels/attention/op.py``), so a site whose q/k/v dtypes differ only because of autocast
(RoPE in fp32 next to a bf16 value projection) is rewritten, and runs in the autocast dtype
with fp32 accumulation inside. The pass reads the autocast state that holds at the site (the
state around the compiled call, which Dynamo guards on, updated by the graph's own
``_enter_autocast``/``_exit_autocast`` nodes) to decide.

What makes a rewrite exact (checked, refused otherwise with the reason in the report):
dropout is exactly 0 (or the module is in eval mode), the mask is absent or *proven* causal
for every sequence length (:mod:`longctx_compiler.passes.analysis.causal_mask`), the relations above,
and — for the hand-written form — the intermediate scores and probabilities are used by
nothing else (``output_attentions=True`` returns them).

Precision: the op accumulates in float32 for 16/32-bit inputs and in float64 for float64,
which is at least the precision of either spelling (``transformers`` computes the eager
softmax in float32 even in a float64 model: our float64 result is more precise there).

Configuration travels with the op, never into process-wide state: ``attention.chunk_size``
(None: chosen from the shapes when the op runs, passed as 0) and ``attention.host_pool_bytes``
(the offload op's budget argument) are arguments of each inserted call.
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
from longctx_compiler.passes.analysis.causal_mask import NotProvable, prove_mask
from longctx_compiler.passes.analysis.fx_utils import arg, example_value, getitem, insert_call, is_call, propagate_example_value, strip_repeat_kv
from longctx_compiler.runtime.documents import documents_node, joint_documents

__all__ = ["ChunkedAttentionPass", "autocast_state_at"]

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_MATMUL = (torch.matmul, operator.matmul, "matmul")
_SOFTMAX = (F.softmax, torch.softmax, torch.nn.functional.softmax, "softmax")
_ENTER_AUTOCAST = getattr(torch.amp.autocast_mode, "_enter_autocast", None)
_EXIT_AUTOCAST = getattr(torch.amp.autocast_mode, "_exit_autocast", None)


class ChunkedAttentionPass(Pass):
    """Scaled-dot-product attention (SDPA or hand-written) → ``longctx::chunked_attention_fwd``."""

    name = "chunked_attention"
    kind = "attention -> chunked_attention"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.config.attention.enabled

    def kind_of(self, match: Match) -> str:
        spelling = match.data["spelling"]
        target = "chunked_attention+offload" if match.data.get("offload") else "chunked_attention"
        variants = [f"sliding window {match.data['window']}" if match.data.get("window") else None,
                    f"soft-cap {match.data['softcap']:g}" if match.data.get("softcap") else None,
                    "sinks" if match.data.get("sinks") is not None else None,
                    "packed documents" if match.data.get("documents") is not None
                    or match.data.get("explicit_documents") is not None else None,
                    "padded keys" if match.data.get("key_padding") is not None else None]
        shown = ", ".join(v for v in variants if v)
        return f"{spelling} -> {target}" + (f" ({shown})" if shown else "")

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        d = match.data
        cfg = ctx.config.attention
        return {
            "chunk_size": "auto" if cfg.chunk_size is None else cfg.chunk_size,
            "offload": cfg.offload,
            "host_pool_bytes": cfg.host_pool_bytes if cfg.offload else None,
            "causal": d.get("causal"),
            "window": d.get("window"),
            "softcap": d.get("softcap"),
            "sinks": d.get("sinks") is not None,
            "documents": d.get("documents") is not None or d.get("explicit_documents") is not None,
            "key_padding": d.get("key_padding") is not None,
            "gqa_groups": d.get("groups"),
            "repeat_kv_removed": d.get("repeat_kv_removed", False),
            "autocast": d.get("autocast"),
            "broadcast": d.get("broadcast", []),
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
        """Walk back from ``matmul(probs, v)`` through dropout/cast/softmax/mask/soft-cap/scale
        to ``q @ kᵀ``. None when ``probs`` is not a softmax (not attention); a softmax that
        leads elsewhere is a refusal with the reason (an attention we could not read)."""
        probs, v = out.args[0], out.args[1]
        nodes = [out]
        dropout = 0.0
        training = True
        cur = probs
        for _ in range(2):  # dropout and a cast, in either order
            if is_call(cur, F.dropout, torch.dropout, "dropout"):
                dropout = arg(cur, 1, "p", 0.5)
                training = arg(cur, 2, "training", True)
                nodes.append(cur)
                cur = cur.args[0]
            if is_call(cur, "to", "type", "type_as", "float", "double", "half", "bfloat16"):
                nodes.append(cur)
                cur = cur.args[0]
        with_sinks = is_call(cur, operator.getitem) and is_call(cur.args[0], *_SOFTMAX) and _drops_last_column(cur.args[1])
        if with_sinks:  # gpt-oss: softmax over [scores, sink logit], the sink's column dropped
            nodes.append(cur)
            cur = cur.args[0]
        if not is_call(cur, *_SOFTMAX):
            return None
        softmax = cur
        dim = arg(softmax, 1, "dim")
        nodes.append(softmax)
        cur = softmax.args[0]
        sinks = None
        if with_sinks:
            cur = _without_row_max(cur, nodes)
            if not (is_call(cur, torch.cat) and len(cur.args[0]) == 2 and arg(cur, 1, "dim", 0) in (-1, 3)):
                return self._unread(out, softmax, f"a column is dropped after the softmax, whose input is {_name(cur)}, not [scores, sinks]")
            nodes.append(cur)
            scores_part, sink_part = cur.args[0]
            sinks = _sink_vector(sink_part, nodes)
            if sinks is None:
                return self._unread(out, softmax, f"the softmax's extra column {_name(sink_part)} is not one logit per head")
            cur = scores_part
        mask = None
        if is_call(cur, operator.add, torch.add, "add"):
            mask = cur.args[1]
            nodes.append(cur)
            cur = cur.args[0]
        softcap, cur = _soft_cap(cur, nodes)
        scale: Any = 1.0
        scale_problem = None
        while True:  # a chain of constant factors (GPT-2: 1/sqrt(d), then 1/(layer + 1))
            factor = _constant_factor(cur)
            if factor is None:
                break
            value, problem = factor
            scale_problem = scale_problem or problem
            if problem is None:
                scale *= value
            nodes.extend(n for n in (cur, cur.args[1]) if isinstance(n, fx.Node) and n not in nodes and len(n.users) == 1)
            cur = cur.args[0]
        if not is_call(cur, *_MATMUL):
            return self._unread(out, softmax, f"the softmax's input is {_name(cur)}, not scaled q·kᵀ scores")
        scores = cur
        nodes.append(scores)
        q, kt = scores.args[0], scores.args[1]
        if not (is_call(kt, "transpose", torch.transpose) and sorted(_norm_dims(kt.args[1:3], kt)) == [2, 3]):
            return self._unread(out, softmax, f"the scores' second operand is {_name(kt)}, not kᵀ (a transpose of the last two dims)")
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
            "scale_problem": scale_problem,
            "enable_gqa": False,
            "mask_additive": True,
            "softmax_dim": dim,
            "softcap": softcap,
            "sinks": sinks,
        }
        return Match(anchor=out, nodes=nodes, data=data)

    @staticmethod
    def _unread(out: fx.Node, softmax: fx.Node, why: str) -> Match:
        """A softmax feeding a matmul that the pass could not read as attention: reported."""
        return Match(anchor=out, nodes=[out], data={"spelling": "matmul-softmax-matmul", "unread": f"{why} ({softmax.name})"})

    # -- check -------------------------------------------------------------------------------
    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        d = match.data
        if "unread" in d:
            raise CantApply(f"a softmax between two matmuls that is not read as attention: {d['unread']}")
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
        out = example_value(match.anchor)
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v, out)):
            raise CantApply("unknown shapes for q/k/v")
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or out.dim() != 4:
            raise CantApply(f"q/k/v are not 4-D [B, H, T, D] (got {q.dim()}-D/{k.dim()}-D/{v.dim()}-D)")
        self._check_dtypes(gm, match, q, k, v, out)
        self._check_shapes(match, q, k, v, out)
        self._check_scale(d, q)
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
                proof = prove_mask(mask, additive=additive)
            except NotProvable as why:
                raise CantApply(f"mask not proven causal: {why}") from None
            d["window"] = proof.window
            for ids, what in ((proof.documents, "the packed documents' ids"), (proof.key_padding, "the padding mask")):
                if ids is not None:
                    self._check_token_rows(ids, what, q, k)
            d.update(documents=proof.documents, document_row=proof.document_row,
                     key_padding=proof.key_padding, key_padding_row=proof.key_padding_row,
                     # SDPA with a boolean mask gives a query row that sees no key (left
                     # padding) out = 0, as the op does; every other spelling gives it
                     # something else (an average of every key, or nan), so the op checks
                     # at run time that no such row exists.
                     rows_may_see_no_key=not (d["spelling"] == "sdpa" and not additive))
            d["causal"] = True
            d["mask_proven_causal"] = True
        explicit = documents_node(gm)
        if explicit is not None:
            # Config.packed_documents: the caller's documents, on top of the model's own mask.
            self._check_token_rows(explicit, "the packed documents' ids (packed_documents)", q, k)
        d["explicit_documents"] = explicit
        d["offload"] = ctx.config.attention.offload

    def _check_dtypes(self, gm: fx.GraphModule, match: Match, q, k, v, out) -> None:
        """One floating dtype for the op after autocast's casts, and the original's result dtype."""
        d = match.data
        device_type = q.device.type
        states = set(_autocast_states(gm, match.nodes, device_type).values())
        if len(states) != 1:
            raise CantApply("the attention pattern crosses the boundary of an autocast region")
        (state,) = states
        if state is None:
            raise CantApply("the autocast state at the site is not known (a global autocast setter in the graph)")
        enabled, ac_dtype = state
        effective = [_autocast_dtype(t, device_type, enabled, ac_dtype) for t in (q, k, v)]
        if not all(dt.is_floating_point for dt in effective):
            raise CantApply(f"non-float dtypes {q.dtype}/{k.dtype}/{v.dtype}")
        if len(set(effective)) != 1:
            where = f"under autocast to {ac_dtype}" if enabled else "outside autocast"
            raise CantApply(f"mixed dtypes {q.dtype}/{k.dtype}/{v.dtype} for q/k/v {where}: the op computes in one dtype")
        if out.dtype != effective[0]:
            raise CantApply(f"the original returns {out.dtype} where the op would return {effective[0]}")
        d["autocast_state"] = state
        # Reported when the op runs under autocast's cast rule (its inputs cast, or already
        # in the autocast dtype).
        d["autocast"] = str(ac_dtype).replace("torch.", "") if enabled and effective[0] == ac_dtype else None

    def _check_shapes(self, match: Match, q, k, v, out) -> None:
        """Bring the operands' batch/head relations to the op's form, or refuse (module docstring)."""
        d = match.data

        def known(expr) -> bool:
            return statically_known_true(expr)

        for name, t in (("query", q), ("key", k), ("value", v)):
            if isinstance(t.shape[3], torch.SymInt):
                raise CantApply(f"the {name} head dim is dynamic")
            if isinstance(t.shape[1], torch.SymInt):
                raise CantApply(f"the number of {name} heads is dynamic")
        if 0 in (q.shape[1], k.shape[1], v.shape[1], q.shape[3]):
            raise CantApply(f"zero heads or a zero head dim (q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})")
        if not known(k.shape[3] == q.shape[3]):
            raise CantApply(f"query and key head dims differ ({q.shape[3]} vs {k.shape[3]})")
        if not known(v.shape[3] == q.shape[3]):
            raise CantApply(f"value head dim differs from query head dim ({v.shape[3]} vs {q.shape[3]})")
        # SDPA's meta function does not tie the key and value lengths together: with dynamic
        # shapes they may be two symbols. Different lengths fail in eager (and in the op,
        # which checks at run time), so only a difference known here is refused.
        if known(k.shape[2] != v.shape[2]):
            raise CantApply(f"keys and values have different lengths ({k.shape[2]} vs {v.shape[2]})")
        if not (known(out.shape[2] == q.shape[2]) and known(out.shape[3] == v.shape[3])):
            raise CantApply(f"the output shape {tuple(out.shape)} is not [B, H, T, D] of the queries {tuple(q.shape)}")
        H = out.shape[1]
        if isinstance(H, torch.SymInt):
            raise CantApply("the number of output heads is dynamic")
        broadcast: list[str] = []
        if q.shape[1] != H:
            if q.shape[1] != 1:
                raise CantApply(f"{q.shape[1]} query heads do not give the {H} output heads")
            broadcast.append(f"query head 1 -> {H}")
        # Each of k, v: its physical tensor (repeat_kv stripped) and P, with logical head h
        # reading physical head h // (H / P).
        phys = {}
        for name, node, val in (("k", d["k"], k), ("v", d["v"], v)):
            logical = val.shape[1]
            if not (logical == H or logical == 1 or (d["enable_gqa"] and H % logical == 0)):
                raise CantApply(f"{logical} {'key' if name == 'k' else 'value'} heads do not divide the {H} query heads"
                                + ("" if d["enable_gqa"] else " (without enable_gqa)"))
            base = strip_repeat_kv(node)
            bval = example_value(base)
            P = bval.shape[1] if base is not node else logical
            if H % P:
                raise CantApply(f"{P} {'key' if name == 'k' else 'value'} heads do not divide the {H} query heads")
            phys[name] = (base, P)
            if logical == 1 and H > 1:
                broadcast.append(f"{'key' if name == 'k' else 'value'} head 1 -> {H}")
        P = math.lcm(phys["k"][1], phys["v"][1])
        if phys["k"][1] != phys["v"][1]:
            broadcast.append(f"key/value heads {phys['k'][1]}/{phys['v'][1]} -> {P}")
        # Batch: each operand's batch is the output's or 1 (broadcast, expanded as a view).
        Bo = out.shape[0]
        for name, t in (("query", q), ("key", k), ("value", v)):
            b = t.shape[0]
            if known(b == Bo):
                continue
            if isinstance(b, int) and b == 1 and isinstance(Bo, int):
                broadcast.append(f"{name} batch 1 -> {Bo}")
                continue
            raise CantApply(f"the {name} batch {b} does not match the output batch {Bo} statically")
        d["heads"] = (H, P)
        d["phys"] = phys
        d["batch"] = Bo
        d["groups"] = H // P
        d["repeat_kv_removed"] = any(base is not d[n] for n, (base, _) in phys.items())
        d["broadcast"] = broadcast

    @staticmethod
    def _check_token_rows(node: fx.Node, what: str, q, k) -> None:
        """Document ids or a padding mask ``[B', T]`` must describe the attention's own tokens
        (self-attention), one row per batch row or one row for all."""
        ids = example_value(node)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise CantApply(f"{what} have no known [batch, length] shape")
        T, S = q.shape[2], k.shape[2]
        if not (statically_known_true(T == S) and statically_known_true(ids.shape[1] == T)):
            raise CantApply(f"{what}: self-attention over the tokens they describe is not proven (T = {T}, S = {S}, "
                            f"{ids.shape[1]} tokens described; a KV cache in the call makes S a different length)")
        if not (ids.shape[0] == 1 or statically_known_true(ids.shape[0] == q.shape[0])):
            raise CantApply(f"{what} have {ids.shape[0]} rows for a batch of {q.shape[0]}")

    def _check_scale(self, d: dict[str, Any], q) -> None:
        if d.get("scale_problem"):
            raise CantApply(d["scale_problem"])
        scale = d["scale"]
        if scale is None:
            d["scale_value"] = 1.0 / math.sqrt(q.shape[3])
            return
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise CantApply("the softmax scale is only known at run time")
        if not math.isfinite(float(scale)):
            raise CantApply(f"the softmax scale {scale} is not finite")
        d["scale_value"] = float(scale)

    # -- apply -------------------------------------------------------------------------------
    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        d = match.data
        graph = gm.graph
        cfg = ctx.config.attention
        H, P = d["heads"]
        Bo = d["batch"]
        chunk = 0 if cfg.chunk_size is None else int(cfg.chunk_size)
        budget = cfg.host_pool_bytes if cfg.offload else None
        op = torch.ops.longctx.chunked_attention_fwd_offload.default if cfg.offload else torch.ops.longctx.chunked_attention_fwd.default
        enabled, ac_dtype = d["autocast_state"]
        device_type = example_value(d["q"]).device.type
        with graph.inserting_before(match.anchor):
            q = _fit(graph, d["q"], Bo, H)
            k = _fit(graph, d["phys"]["k"][0], Bo, P)
            v = _fit(graph, d["phys"]["v"][0], Bo, P)
            # The op's fake value under the autocast state of the site (its Autocast kernel
            # casts there as it will when the graph runs).
            with torch.autocast(device_type, dtype=ac_dtype, enabled=enabled):
                sinks = None
                if d.get("sinks") is not None:
                    sinks = insert_call(graph, torch.reshape, (d["sinks"], (-1,)))
                segments = _segment_ids(graph, d, Bo)
                variants = _variant_args(d.get("window") or 0, d.get("softcap") or 0.0, sinks, *segments)
                res = insert_call(graph, op, (q, k, v, bool(d["causal"]), d["scale_value"], chunk, budget, *variants))
                out = getitem(graph, res, 0)
        _carry_dtype(match.anchor, out)
        match.anchor.replace_all_uses_with(out)
        for n in match.nodes:
            if not n.users:
                graph.erase_node(n)
        return [res, out]


def _rows(graph: fx.Graph, node: fx.Node, row: int | None, batch: int) -> fx.Node:
    """``node [B', T]`` as ``[batch, T]``: its one ``row`` (when every batch row reads that
    row) or its rows, broadcast over the batch."""
    if row is not None:
        node = insert_call(graph, operator.getitem, (node, (slice(row, row + 1), slice(None))))
    if not statically_known_true(example_value(node).shape[0] == batch):
        node = _method(graph, "expand", (node, batch, -1), {})
    return node


def _segment_ids(graph: fx.Graph, d: dict[str, Any], batch: int) -> tuple:
    """The op's ``segment_ids`` and ``key_segment_ids`` (``[batch, T]``), as few as say
    something: the proven document ids for queries and keys (joined with the caller's, with
    ``Config.packed_documents``); with key padding, the queries'
    ids (documents, or 0) and the keys' ids with -1 at padded keys, which no query holds."""
    documents = None if d.get("documents") is None else _rows(graph, d["documents"], d["document_row"], batch)
    if d.get("explicit_documents") is not None:
        # Config.packed_documents: the caller's documents, joined with the model's own.
        explicit = _rows(graph, d["explicit_documents"], None, batch)
        documents = explicit if documents is None else insert_call(graph, joint_documents, (documents, explicit))
    if d.get("key_padding") is None:
        return () if documents is None else (documents,)
    pad = _rows(graph, d["key_padding"], d["key_padding_row"], batch)
    queries = documents if documents is not None else insert_call(graph, torch.zeros_like, (pad,), {"dtype": torch.int64})
    real = insert_call(graph, torch.ne, (pad, 0))
    keys = insert_call(graph, torch.where, (real, queries, -1))
    if d["rows_may_see_no_key"]:
        keys = insert_call(graph, torch.ops.longctx.attention_rows_see_keys.default, (queries, keys, True, d.get("window") or 0))
    return queries, keys


def _variant_args(window: int, softcap: float, sinks: fx.Node | None, *segments: fx.Node) -> tuple:
    """The op's trailing ``window, softcap, sinks, segment_ids, key_segment_ids`` arguments,
    as few as say something (a plain causal call keeps the original argument list)."""
    if segments:
        return (window, softcap, sinks, *segments)
    if sinks is not None:
        return (window, softcap, sinks)
    if softcap:
        return (window, softcap)
    return (window,) if window else ()


def _drops_last_column(index: Any) -> bool:
    """``[..., :-1]``."""
    return (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)
            and index[1].start in (None, 0) and index[1].stop == -1 and index[1].step in (None, 1))


def _without_row_max(n: Any, nodes: list[fx.Node]) -> Any:
    """``x`` from ``x − x.max(dim=-1, keepdim=True).values`` (a shift the softmax does not
    see: gpt-oss's guard against overflow), else ``n``."""
    if not is_call(n, operator.sub, torch.sub, "sub"):
        return n
    x, m = n.args[0], n.args[1]
    picked = is_call(m, operator.getitem) and m.args[1] == 0 or (is_call(m, getattr) and m.args[1] == "values")
    mx = m.args[0] if picked else None
    if not (is_call(mx, torch.max, "max") and mx.args[0] is x and arg(mx, 1, "dim") in (-1, 3) and arg(mx, 2, "keepdim", False)):
        return n
    nodes.extend([n, m, mx])
    return x


def _sink_vector(n: Any, nodes: list[fx.Node]) -> fx.Node | None:
    """The ``[H]`` tensor behind ``sinks.reshape(1, -1, 1, 1).expand(B, -1, T, -1)``: walked
    back through reshapes and expands that keep head ``h`` at ``h`` (None otherwise)."""
    chain = []
    while isinstance(n, fx.Node):
        v = example_value(n)
        if isinstance(v, torch.Tensor) and v.dim() == 1:
            nodes.extend(c for c in chain if len(c.users) == 1)
            return n
        if not is_call(n, "reshape", "view", "expand", torch.reshape):
            return None
        if is_call(n, "expand"):
            src = example_value(n.args[0])
            # expand only broadcasts size-1 dims; the head dim (1) must stay as it is
            if not isinstance(src, torch.Tensor) or src.dim() != 4 or not _same_dim(src.shape[1], v.shape[1]):
                return None
        else:
            if not (isinstance(v, torch.Tensor) and v.dim() == 4 and all(_same_dim(v.shape[i], 1) for i in (0, 2, 3))):
                return None
        chain.append(n)
        n = n.args[0]
    return None


def _same_dim(a: Any, b: Any) -> bool:
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def _name(n: Any) -> str:
    """``name = op`` of a node, for messages."""
    if not isinstance(n, fx.Node):
        return repr(n)
    op = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"{n.name} = {op}"


def _number(n: Any) -> float | None:
    """A Python number, or a 0-d ``torch.full``/``torch.tensor`` of one (GPT-2's divisor)."""
    if isinstance(n, (int, float)) and not isinstance(n, bool):
        return float(n)
    if is_call(n, torch.full) and tuple(arg(n, 0, "size", None) or ()) == () and isinstance(arg(n, 1, "fill_value"), (int, float)):
        return float(arg(n, 1, "fill_value"))
    if is_call(n, torch.tensor) and isinstance(n.args[0], (int, float)):
        return float(n.args[0])
    return None


def _constant_factor(n: Any) -> tuple[float, str | None] | None:
    """``(factor, problem)`` when ``n`` multiplies or divides the scores by a constant."""
    if is_call(n, operator.mul, torch.mul, "mul") and _number(n.args[1]) is not None:
        return _number(n.args[1]), None
    if is_call(n, operator.truediv, torch.div, "div") and _number(n.args[1]) is not None:
        divisor = _number(n.args[1])
        if n.kwargs.get("rounding_mode") is not None:
            return 0.0, f"the scores are divided with rounding_mode={n.kwargs['rounding_mode']!r}"
        if divisor == 0:
            return 0.0, "the scores are divided by zero"
        return 1.0 / divisor, None
    return None


def _soft_cap(n: Any, nodes: list[fx.Node]) -> tuple[float, Any]:
    """``cap · tanh(x / cap)`` (Gemma 2's logit soft-capping): ``(cap, x)``; ``(0.0, n)`` when
    ``n`` is not that."""
    if not is_call(n, operator.mul, torch.mul, "mul") or _number(n.args[1]) is None:
        return 0.0, n
    t = n.args[0]
    if not is_call(t, torch.tanh, "tanh"):
        return 0.0, n
    inner = t.args[0]
    cap = _number(n.args[1])
    divided = _constant_factor(inner)
    if divided is None or not is_call(inner, operator.truediv, torch.div, "div") or _number(inner.args[1]) != cap or cap <= 0:
        return 0.0, n
    nodes.extend([n, t, inner])
    return cap, inner.args[0]


def _fit(graph: fx.Graph, node: fx.Node, batch: int, heads: int) -> fx.Node:
    """``node`` ``[b, h, L, D]`` as ``[batch, heads, L, D]``: a view when ``b`` or ``h`` is 1
    (expand), ``repeat_interleave`` of the heads when ``h`` divides ``heads``."""
    val = example_value(node)
    b, h = val.shape[0], val.shape[1]
    if h != heads and h != 1:
        node = _method(graph, "repeat_interleave", (node, heads // h), {"dim": 1})
        h = heads
    if h != heads or not statically_known_true(b == batch):
        node = _method(graph, "expand", (node, batch if not statically_known_true(b == batch) else -1, heads, -1, -1), {})
    return node


def _method(graph: fx.Graph, name: str, args: tuple, kwargs: dict) -> fx.Node:
    node = graph.call_method(name, args, kwargs)
    propagate_example_value(node)
    return node


def autocast_state_at(gm: fx.GraphModule, node: fx.Node, device_type: str) -> tuple[bool, torch.dtype] | None:
    """``(enabled, dtype)`` of autocast for ``device_type`` where ``node`` runs, or None if unknown.

    Starts from the state around the compiled call (Dynamo guards on it, so it is the state
    at run time too) and follows the graph's ``_enter_autocast``/``_exit_autocast`` nodes up
    to ``node``. Any other call that sets autocast state makes it unknown.
    """
    return _autocast_states(gm, [node], device_type)[node]


def _autocast_states(gm: fx.GraphModule, nodes: Iterable[fx.Node], device_type: str) -> dict[fx.Node, Any]:
    """:func:`autocast_state_at` for several nodes, in one walk over the graph."""
    wanted = set(nodes)
    found: dict[fx.Node, Any] = {}
    state: Any = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    saved: dict[fx.Node, Any] = {}
    for n in gm.graph.nodes:
        if n in wanted:
            found[n] = state
            if len(found) == len(wanted):
                break
        if n.op != "call_function" or state is None:
            continue
        if n.target is _ENTER_AUTOCAST:
            saved[n] = state
            if arg(n, 0, "device_type") == device_type:
                dtype = arg(n, 1, "dtype")
                enabled = arg(n, 2, "enabled", True)
                state = (enabled, state[1] if dtype is None else dtype) if isinstance(enabled, bool) else None
        elif n.target is _EXIT_AUTOCAST:
            ctx_node = n.args[0] if n.args else None
            if ctx_node in saved:
                state = saved.pop(ctx_node)
        elif "autocast" in getattr(n.target, "__name__", "").lower():
            state = None
    for n in wanted:
        found.setdefault(n, None)
    return found


def _autocast_dtype(t: torch.Tensor, device_type: str, enabled: bool, dtype: torch.dtype) -> torch.dtype:
    # autocast's rule for its lower-precision ops, SDPA's and matmul's (and our op's).
    if enabled and t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64:
        return dtype
    return t.dtype


def _norm_dims(dims: Any, node: fx.Node) -> list[int]:
    rank = example_value(node.args[0]).dim() if isinstance(example_value(node.args[0]), torch.Tensor) else 4
    return [x + rank if isinstance(x, int) and x < 0 else x for x in dims]


def _carry_dtype(old: fx.Node, new: fx.Node) -> None:
    # check() refused every site where the op's result dtype differs from the original's;
    # this keeps it that way if check and apply ever drift apart.
    ov, nv = example_value(old), example_value(new)
    if isinstance(ov, torch.Tensor) and isinstance(nv, torch.Tensor) and ov.dtype != nv.dtype:
        raise RuntimeError(f"chunked attention would change the dtype {ov.dtype} -> {nv.dtype}")

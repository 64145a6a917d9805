"""Shard the sequence over ``P`` ranks: Ulysses attention, time-sharded scans, global positions.

With ``Config.distributed.sequence_parallel = P`` every rank runs the graph on its own
contiguous shard of ``L`` tokens (the optimized model slices the inputs, see
:mod:`longctx_compiler.runtime.sequence_parallel`). This pass makes that exact:

* **Attention** (each chunked causal attention): q, k, v ``[B, H, L, D]`` (sequence-sharded)
  become ``[B, H/P, P·L, D]`` (head-sharded, the whole sequence) by an all-to-all; the
  attention runs over the whole sequence for its heads; its output goes back by the inverse
  all-to-all::

      before:  out, lse = chunked_attention(q, k, v, causal)
      after:   out, lse = chunked_attention(a2a(q), a2a(k'), a2a(v'), causal);  out = a2a⁻¹(out)

  With fewer KV heads than ranks (GQA), each KV head is repeated ``P / H_kv`` times first
  (``k'``), so each rank receives the one KV head its query heads read.
* **Scans** (each selective scan, sharded over time): shard ``j`` maps a start state ``h`` to
  ``P_j ⊙ h + s_j`` (``P_j = exp(A·Σ_t Δ_t)``, ``s_j`` its final state from zero); one
  all-gather of ``(P_j, s_j)`` gives each rank the state the whole sequence has at its first
  token, and the scan runs from it. The gradient of the all-gather (an all-reduce) carries
  the adjoint back across ranks. ``O(B·D·N)`` per scan, whatever ``T``.
* **Pipelined layers** (``sequence_block_fwd`` with attentions, after ``pipelined_layers``):
  the shards are chunk-interleaved (FPDT's layout, see
  :mod:`longctx_compiler.runtime.sequence_parallel`), and inside the layer each chunk's
  q, k, v go through the all-to-all: the layer's attention sees the group's ``P`` chunks —
  consecutive tokens — for its heads, and keeps the K/V history of every earlier group in the
  host pool. A layer the prover refused keeps its chunked attention over the whole shard,
  which under this layout gathers the shards and puts them in sequence order around it.
  Time-sharded scans and halos need contiguous shards: a model with both refuses.
* **Causal convolutions**: a zero padding of the sequence's start (Mamba's ``conv1d``, after
  ``depthwise_conv``) becomes the previous shard's last tokens (``longctx::seq_halo``).
* **Positions**: an ``arange`` over the sequence (transformers' ``cache_position``, from which
  ``position_ids`` and RoPE come) starts at the shard's first global position ``r·L``.
  ``position_ids`` the caller passes are sharded with the batch (each rank gets its slice).
* **Packed documents** (an attention with ``segment_ids`` / ``key_segment_ids``, contiguous
  shards): the ids are computed in the graph from inputs (transformers' ``position_ids``
  restarting at each document: ``cumsum(diff(pos) != 1)``), which on a rank is its shard
  only — numbered from the shard's start. The inputs they come from (``mask_inputs``) are
  all-gathered in sequence order and the nodes computing them copied onto the gathered
  tensors, once per graph: the attention, over the whole sequence, reads the whole
  sequence's ids. Those nodes must mean the same on the gathered inputs — elementwise ops,
  ``diff``, ``cumsum``, start-anchored slices, ``expand``, and no size of the sequence nor
  ``arange`` — or compilation stops naming the node. Interleaved shards (pipelined layers)
  refuse documents by name.
* **The loss**: the tiled LM loss sums its shard's tokens; divided by the global count of
  labelled tokens (``num_items_in_batch``, set by the model wrapper) it is the shard's part
  of the global mean, and the wrapper sums the parts.

What makes it exact is proved from the graph by :mod:`sequence_window` over the whole graph
(positions global, start paddings exchanged): every op other than the attentions and scans is
local to its token, they read their inputs at their own positions, nothing reduces along the
sequence but the loss. Anything else — a reduction or shift along the sequence, a block run
chunk by chunk, an attention the attention pass refused — stops compilation with
:class:`~longctx_compiler.runtime.sequence_parallel.SequenceParallelError` naming it: a shard
run of a graph that mixes tokens would be silently wrong, so nothing falls back.

Collectives are ops every rank of the group must join in the same order: the graph is the
same on every rank but for the rank constant, and every rank reads every collective's result
(rank 0 an empty slice of the gathered states), so none is pruned as dead code on one rank.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Iterable

import torch
import torch.fx as fx

from longctx_compiler.passes.adjoint_sharded_blocks import scan_site
from longctx_compiler.kernels.attention.op import FORWARD_ARGS, forward_arg
from longctx_compiler.kernels.selective_scan.schema import FINAL_STATE, ScanArgs
from longctx_compiler.passes.adjoint_sharded_scan import SCAN_OP
from longctx_compiler.passes.analysis.causal_mask import mask_inputs
from longctx_compiler.passes.analysis.fx_utils import arg, example_value, is_view_like, propagate_example_value
from longctx_compiler.passes.analysis.sequence_window import ATTENTION, CarrySite, analyse_window
from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext
from longctx_compiler.passes.block_region import long_context_op
from longctx_compiler.kernels.sequence_block import BLOCK_OP
from longctx_compiler.kernels.sequence_block.op import get_plan, register_plan
from longctx_compiler.passes.pipelined_layers import ATTENTION_OPS, configured_chunk
from longctx_compiler.passes.tiled_lm_loss import OP as LOSS_OP
from longctx_compiler.runtime.sequence_parallel import (
    SequenceParallelError, current_group, interleaved_to_sequence, sequence_to_interleaved, shard_positions,
)

__all__ = ["SequenceParallelPass", "layout_chunk"]


def layout_chunk(config: Any) -> int | None:
    """``Q`` of the chunk-interleaved layout the shards take when sequence-pipelined layers
    are on (their chunk), None for contiguous shards."""
    layers = getattr(config, "layers", None)
    if config.distributed.active and config.attention.enabled and getattr(layers, "enabled", False):
        return configured_chunk(config)
    return None

A2A = torch.ops.longctx.seq_all_to_all.default
GATHER = torch.ops.longctx.seq_all_gather.default
HALO = torch.ops.longctx.seq_halo.default
# Arguments of the loss op: h, weight, bias, labels, logits, ignore_index, reduction.
_LOSS_LOGITS, _LOSS_REDUCTION = 4, 6
_SINKS = FORWARD_ARGS.index("sinks")
# The attention's document ids (queries', keys'): computed on each rank from its shard of the
# inputs, rebuilt for the whole sequence before the exchanged attention reads them.
_SEGMENTS = tuple(name for name in ("segment_ids", "key_segment_ids") if name in FORWARD_ARGS)
# What the document ids may be computed with: ops that mean the same on the whole sequence as
# on the inputs gathered for it (elementwise, a difference with the token before, a running
# sum, start-anchored slices); nothing that reads a length or makes positions.
_DOCUMENT_FUNCTIONS = {torch.diff, torch.ne, operator.ne, torch.eq, operator.eq, torch.cumsum, operator.getitem,
                       torch.zeros_like, torch.where, torch.sub, operator.sub, torch.add, operator.add}
try:
    _DOCUMENT_FUNCTIONS.add(torch.ops.longctx.attention_rows_see_keys.default)
except AttributeError:  # the kernels' own check op, where it exists
    pass
_DOCUMENT_METHODS = {"diff", "ne", "eq", "cumsum", "expand", "to", "long", "int", "sub", "add", "where"}
# What may stand between the loss op and the graph's output: linear in the loss.
_LINEAR_AFTER_LOSS = {operator.getitem, operator.truediv, operator.mul, torch.div, torch.mul}


def _name(n: fx.Node) -> str:
    return getattr(n.target, "__name__", str(n.target))


def _picks_result(n: fx.Node) -> bool:
    """``n`` takes one result of a multi-result op (not a view of a tensor)."""
    return n.target is operator.getitem and isinstance(example_value(n.args[0]), (tuple, list))


def _segment_nodes(n: fx.Node) -> list[fx.Node]:
    """The attention call's document id arguments that are nodes."""
    return [s for s in (forward_arg(n, name) for name in _SEGMENTS) if isinstance(s, fx.Node)]


def _reads_only_as_segments(user: fx.Node, n: fx.Node) -> bool:
    """``user`` is an attention that reads ``n`` as its document ids and nowhere else."""
    if user.target not in ATTENTION_OPS:
        return False
    where = [FORWARD_ARGS[i] for i, a in enumerate(user.args) if a is n] + [k for k, a in user.kwargs.items() if a is n]
    return bool(where) and all(w in _SEGMENTS for w in where)


def _documents_only(nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes that compute the attentions' document ids and nothing else: the whole-graph
    proof leaves them out (the ids are rebuilt for the whole sequence, see ``_ulysses``)."""
    found: set[fx.Node] = set()
    stack = [s for n in nodes if n.target in ATTENTION_OPS for s in _segment_nodes(n)]
    while stack:
        n = stack.pop()
        if n not in found and n.op in ("call_function", "call_method"):
            found.add(n)
            stack.extend(n.all_input_nodes)
    changed = True
    while changed:
        changed = False
        for n in list(found):
            if any(u not in found and not _reads_only_as_segments(u, n) for u in n.users):
                found.discard(n)
                changed = True
    return found


def _sequence_symbols(length: Any) -> set:
    return set(length.node.expr.free_symbols) if isinstance(length, torch.SymInt) else set()


def _reads_length(value: Any, symbols: set) -> bool:
    """``value`` (a size, or a structure holding sizes) depends on the sequence length."""
    if isinstance(value, torch.SymInt):
        return bool(set(value.node.expr.free_symbols) & symbols) or not symbols
    if isinstance(value, slice):
        return any(_reads_length(v, symbols) for v in (value.start, value.stop, value.step))
    if isinstance(value, (tuple, list)):
        return any(_reads_length(v, symbols) for v in value)
    if isinstance(value, dict):
        return any(_reads_length(v, symbols) for v in value.values())
    return False


def _start_anchored(index: Any) -> bool:
    """A ``getitem`` index that means the same on the whole sequence as on a shard's:
    non-negative integers and slices with non-negative bounds and step 1, ``...``, None."""
    def bound(b: Any) -> bool:
        return b is None or (isinstance(b, int) and not isinstance(b, bool) and b >= 0)

    items = index if isinstance(index, tuple) else (index,)
    return all(i is Ellipsis or i is None or (bound(i) and i is not None)
               or (isinstance(i, slice) and bound(i.start) and bound(i.stop) and i.step in (None, 1)) for i in items)


def _leaves(value: Any) -> Iterable[Any]:
    """The arguments in ``value`` (tuples, lists, dicts and slices opened)."""
    if isinstance(value, slice):
        value = (value.start, value.stop, value.step)
    if isinstance(value, dict):
        value = tuple(value.values())
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _document_subgraph(ids: fx.Node, length: Any) -> list[fx.Node]:
    """The nodes ``ids`` is computed by from the graph's inputs (graph order), each checked to
    mean the same on the whole sequence's inputs as on a shard's: from the allow-list, reading
    no size of the sequence and no position of its own. Raises :class:`SequenceParallelError`
    naming the first node that does not."""
    symbols = _sequence_symbols(length)
    found: set[fx.Node] = set()
    stack = [ids]
    while stack:
        n = stack.pop()
        if n in found:
            continue
        found.add(n)
        if n.op == "placeholder":
            if not isinstance(example_value(n), torch.Tensor) and _reads_length(example_value(n), symbols):
                raise SequenceParallelError(
                    f"{ids.name}: the document ids read the size {n.name}, which is the shard's length here and the whole "
                    "sequence's on one process: not supported with sequence_parallel")
            continue
        what = f"{n.name} ({_name(n) if n.op == 'call_function' else n.target})"
        if n.op == "call_function" and n.target in _DOCUMENT_FUNCTIONS:
            pass
        elif n.op == "call_method" and n.target in _DOCUMENT_METHODS:
            pass
        else:
            raise SequenceParallelError(
                f"{ids.name}: the document ids are computed with {what}, which sequence parallelism does not rebuild for "
                "the whole sequence (its rebuild takes elementwise ops, diff, cumsum, start-anchored slices and expand only)")
        if n.target is operator.getitem and (isinstance(example_value(n.args[0]), (tuple, list)) or not _start_anchored(n.args[1])):
            raise SequenceParallelError(f"{ids.name}: the document ids are computed with {what}, an index that is not start-anchored")
        if _name(n) == "diff" or n.target == "diff":
            if arg(n, 1, "n", 1) != 1 or arg(n, 4, "append", None) is not None:
                raise SequenceParallelError(f"{ids.name}: the document ids are computed with {what}: only a first difference without append is rebuilt")
        for a in _leaves((n.args, n.kwargs)):
            if isinstance(a, fx.Node):
                v = example_value(a)
                if not isinstance(v, torch.Tensor) and _reads_length(v, symbols):
                    raise SequenceParallelError(
                        f"{ids.name}: the document ids are computed with {what}, which reads the size {a.name}: the shard's "
                        "length here and the whole sequence's on one process")
                stack.append(a)
            elif _reads_length(a, symbols):
                raise SequenceParallelError(f"{ids.name}: the document ids are computed with {what}, which reads the sequence length")
    order = {n: i for i, n in enumerate(ids.graph.nodes)}
    return sorted((n for n in found if n.op != "placeholder"), key=order.__getitem__)


def _downstream(starts: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


class SequenceParallelPass(Pass):
    """The graph on one shard of the sequence: all-to-all around attention, global positions."""

    name = "sequence_parallel"
    kind = "sequence sharded over P ranks"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.config.distributed.active

    def kind_of(self, match: Match) -> str:
        return {"attention": "attention -> Ulysses all-to-all (heads <-> sequence)",
                "block": "pipelined layer -> Ulysses all-to-all per chunk (K/V history of all ranks)",
                "scan": "scan -> time-sharded (state from earlier ranks, all-gather)",
                "halo": "zero padding -> halo from the previous shard",
                "positions": "arange -> global positions of the shard",
                "loss": "loss -> this shard's part of the global sum"}[match.data["what"]]

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        group = match.data["group"]
        out = {"P": group.size, "rank": group.rank}
        if match.data["what"] == "attention":
            out.update(kv_replicated=match.data["replicate"], collectives="4 all-to-all forward, 4 backward")
        if match.data["what"] == "block":
            out.update(collectives="per chunk and attention: 4 all-to-all forward, 8 backward (recompute + gradient)")
        if match.data.get("layout"):
            out.update(layout=f"chunk-interleaved, Q={match.data['layout']}")
        if match.data["what"] == "loss":
            out.update(collectives="1 all-reduce (in the model wrapper)")
        return out

    # -- the whole-graph proof ---------------------------------------------------------------
    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        group = current_group()
        if group is None:
            raise SequenceParallelError("sequence parallelism: the graph was compiled outside the optimized model's call (no sequence group)")
        graph = gm.graph
        losses = list(graph.find_nodes(op="call_function", target=LOSS_OP))
        after = _downstream(losses)
        # The loss's own reshapes of h, labels and kept logits ([B, L, H] -> [B·L, H]) belong to it.
        prologue: set[fx.Node] = set()
        for loss in losses:
            for a in loss.args[:_LOSS_LOGITS + 1]:
                while (isinstance(a, fx.Node) and is_view_like(a) and not _picks_result(a)
                       and all(u in after or u in prologue for u in a.users)):
                    prologue.add(a)
                    a = a.args[0]
        nodes = [n for n in graph.nodes if n.op in ("call_function", "call_method") and n not in after and n not in prologue]
        # The attentions' document ids are rebuilt for the whole sequence from the gathered
        # inputs (checked per attention): the shard's own computation of them is not proved.
        documents = _documents_only(nodes)
        nodes = [n for n in nodes if n not in documents]
        region = set(nodes)
        inputs = [n for n in graph.nodes if n.op == "placeholder" and any(u in region for u in n.users)]
        outputs = [n for n in nodes if any(u not in region for u in n.users)]
        layout = layout_chunk(ctx.config)
        carries = []
        for n in nodes:
            if n.target in ATTENTION_OPS:
                carries.append(CarrySite(n, tuple(n.args), {0: 2, 1: 2, 2: 2}, 0, ATTENTION))
            elif n.target is SCAN_OP:
                mode = ScanArgs.of(n).mode
                if ScanArgs.of(n).seq_idx is not None:
                    raise SequenceParallelError(f"{n.name}: a scan with packed documents (seq_idx) is not sharded over time yet "
                                                "(a reset at a shard boundary is not carried across ranks)")
                if mode != "exact":
                    raise SequenceParallelError(f"{n.name}: a scan with a {mode!r} adjoint cannot be sharded over time (the adjoint crosses ranks exactly only)")
                if layout is not None:
                    raise SequenceParallelError(
                        f"{n.name}: a scan is sharded over time on contiguous shards, but pipelined layers (layers.enabled) "
                        "take chunk-interleaved ones: turn off layers.enabled for this model under sequence parallelism")
                carries.append(scan_site(n))
            elif n.target is BLOCK_OP:
                carries.append(self._block_site(n, layout))
            elif long_context_op(n):
                raise SequenceParallelError(f"sequence parallelism does not shard {n.target} ({n.name}) yet")
        try:
            window = analyse_window(nodes, inputs, outputs, carries, global_positions=True)
        except CantApply as why:
            raise SequenceParallelError(
                f"the graph cannot run on a shard of the sequence exactly: {why.reason} (attention must be rewritten "
                "to chunked causal attention — see the report's refusals — and every other op must be local to its token)") from None
        if window.halo:
            raise SequenceParallelError(f"the graph reads {window.halo} earlier tokens across a shard boundary (a convolution along the sequence): not supported yet")
        if window.halos and layout is not None:
            raise SequenceParallelError(
                f"{window.halos[0].name}: a convolution's halo comes from the previous contiguous shard, but pipelined layers "
                "(layers.enabled) take chunk-interleaved ones: turn off layers.enabled for this model under sequence parallelism")
        for loss in losses:
            self._check_loss(loss, after)
        # built: each node's whole-sequence version (document ids), shared by the attentions
        common = {"group": group, "layout": layout, "built": {}}
        for n in carries:
            if n.node.target is not BLOCK_OP or get_plan(n.node.args[2]).attentions:
                yield Match(anchor=n.node, nodes=[n.node], data={"what": n.what, **common})
        for n in window.halos:
            yield Match(anchor=n, nodes=[n], data={"what": "halo", **common})
        for n in window.positions:
            yield Match(anchor=n, nodes=[n], data={"what": "positions", **common})
        for loss in losses:
            yield Match(anchor=loss, nodes=[loss], data={"what": "loss", **common})

    @staticmethod
    def _block_site(n: fx.Node, layout: int | None) -> CarrySite:
        """A block run chunk by chunk, as a carry of the whole-graph proof: its output at ``t``
        reads its sequence inputs up to ``t`` (its own proof). One whose attentions the pass
        shards must run on chunk-interleaved shards of its own chunk; a token-wise one (tiled
        MLPs, the stack's end) runs on any shard."""
        plan = get_plan(n.args[2])
        if plan.scans or plan.halo:
            raise SequenceParallelError(
                f"{n.name}: a block run chunk by chunk with a scan or a convolution (Mamba's) is not sharded over the "
                "sequence; sequence parallelism turns SSM block sharding off — leave it so")
        if plan.attentions and layout != plan.chunk:
            raise SequenceParallelError(
                f"{n.name}: a pipelined layer of chunk {plan.chunk} needs shards interleaved by that chunk, but they are "
                + ("contiguous (pipelined layers were added by a pass, not Config.layers.enabled)" if layout is None else
                   f"interleaved by {layout} (give Config.layers.chunk_size, not a pass's own chunk)"))
        if len(plan.output_dims) != 1:
            raise SequenceParallelError(f"{n.name}: a pipelined layer with {len(plan.output_dims)} sequence outputs is not sharded yet")
        tensors = n.args[0]
        seq = {i: d for i, d in enumerate(plan.tensor_dims) if d is not None}
        return CarrySite(n, tuple(tensors), seq, 0, "block")

    @staticmethod
    def _check_loss(loss: fx.Node, after: set[fx.Node]) -> None:
        if loss.args[_LOSS_REDUCTION] != "sum":
            raise SequenceParallelError(
                "the LM loss is a mean over the tokens it sees, i.e. over one shard: pass labels through a transformers "
                "model (it divides the sum by the global num_items_in_batch) or compute a summed loss")
        for n in after:
            if n is loss or n.op == "output":
                continue
            if not (n.op == "call_function" and n.target in _LINEAR_AFTER_LOSS) and not (n.op == "call_method" and n.target in ("to", "float")):
                raise SequenceParallelError(f"{n.name} ({_name(n)}) uses the loss other than scaling it: a shard's part of it would not add up to the global value")
            if n.op == "call_function" and n.target in (operator.mul, torch.mul, operator.truediv, torch.div):
                if sum(1 for a in n.all_input_nodes if a in after) != 1 or (n.target in (operator.truediv, torch.div) and n.args[1] in after):
                    raise SequenceParallelError(f"{n.name} ({_name(n)}) is not linear in the loss")

    # -- per site ------------------------------------------------------------------------------
    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        if match.data["what"] == "block":
            self._check_block_heads(match)
        if match.data["what"] != "attention":
            return
        P = match.data["group"].size
        node = match.anchor
        q, k = example_value(node.args[0]), example_value(node.args[1])
        hq, hkv = q.shape[1], k.shape[1]
        if not isinstance(hq, int) or not isinstance(hkv, int):
            raise SequenceParallelError(f"{node.name}: the head counts are not constants ({hq}, {hkv})")
        if hq % P:
            raise SequenceParallelError(f"{node.name}: {hq} query heads cannot be split over sequence_parallel={P} ranks (Ulysses gives each rank H/P heads)")
        if hkv % P and P % hkv:
            raise SequenceParallelError(f"{node.name}: {hkv} key/value heads are neither a multiple nor a divisor of sequence_parallel={P}")
        if any(forward_arg(node, name) is not None for name in _SEGMENTS):
            # The document ids are numbered from each rank's shard of the positions: they are
            # rebuilt for the whole sequence from the gathered inputs they are computed from.
            if match.data["layout"] is not None:
                raise SequenceParallelError(
                    f"{node.name}: packed documents (position_ids that restart) are supported with sequence_parallel on "
                    "contiguous shards only, but pipelined layers (layers.enabled) take chunk-interleaved ones: turn off "
                    "layers.enabled for this model under sequence parallelism")
            for name in _SEGMENTS:
                ids = forward_arg(node, name)
                if ids is not None and not isinstance(ids, fx.Node):
                    raise SequenceParallelError(f"{node.name}: its {name} are not a tensor of the graph ({ids!r})")
                if ids is not None:
                    _document_subgraph(ids, q.shape[2])
        for user in node.users:
            if user.args[1] != 0 and user.users:
                raise SequenceParallelError(f"{node.name}: the attention's log-sum-exp is used ({user.name}); only its output is exchanged back")
        match.data["replicate"] = P // hkv if hkv < P else 1

    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        what, group = match.data["what"], match.data["group"]
        if what == "attention":
            return self._ulysses(gm, match.anchor, group, match.data["replicate"], match.data["layout"], match.data["built"])
        if what == "block":
            return self._sharded_block(match.anchor, group)
        if what == "positions":
            return self._offset(gm, match.anchor, group, match.data["layout"])
        if what == "scan":
            return self._time_sharded_scan(gm, match.anchor, group)
        if what == "halo":
            return self._halo(gm, match.anchor, group)
        return self._scale_before_cast(gm, match.anchor)

    def _time_sharded_scan(self, gm: fx.GraphModule, scan: fx.Node, group: Any) -> list[fx.Node]:
        """The scan on shard ``r`` starts from the state the whole sequence has at its first
        token. With ``s_j`` shard ``j``'s final state from a zero start and
        ``P_j = exp(A · Σ_t Δ_t)`` its decay over the shard (``h ↦ P_j ⊙ h + s_j`` is what
        shard ``j`` does to a state), that state is ``h_r = P_{r−1} ⊙ (… (P_0 ⊙ h₀ + s_0) …) + s_{r−1}``.
        Every rank computes its ``(P_j, s_j)``, one all-gather shares them (its gradient, an
        all-reduce, carries the adjoint back to the ranks that made them), and the scan runs
        again from ``h_r``: ``O(B·D·N)`` communication per scan, whatever ``T``."""
        graph, name, rank = gm.graph, group.name, group.rank
        a = ScanArgs.of(scan)
        created: list[fx.Node] = []

        def call(target, *args, **kwargs):
            created.append(self._call(graph, target, args, kwargs))
            return created[-1]

        with graph.inserting_before(scan):
            first = call(SCAN_OP, *a._replace(h0=None))
            final = call(operator.getitem, first, FINAL_STATE)
            # In the scan's own compute dtype (its state's), as the scan computes its decays.
            dtype = example_value(final).dtype
            delta = call(torch.Tensor.to, a.delta, dtype)
            if a.delta_bias is not None:
                delta = call(operator.add, delta, call(torch.unsqueeze, call(torch.Tensor.to, a.delta_bias, dtype), -1))
            if a.delta_softplus:
                delta = call(torch.nn.functional.softplus, delta)
            # [B, D] -> [B, D, 1] · A [D, N]: the log-decay of the whole shard
            A = call(torch.Tensor.to, a.A, dtype)
            decay = call(torch.exp, call(operator.mul, call(torch.unsqueeze, call(torch.sum, delta, -1), -1), A))
            both = call(GATHER, call(torch.stack, [decay, final]), name)
            # Every rank reads the gathered states, rank 0 too (an empty slice of them): the
            # all-gather and its gradient's all-reduce are collectives every rank must join.
            h = call(operator.add, a.h0 if a.h0 is not None else call(torch.zeros_like, final),
                     call(torch.sum, call(torch.narrow, both, 0, 0, 0)))
            for j in range(rank):
                pj = call(operator.getitem, both, (j, 0))
                sj = call(operator.getitem, both, (j, 1))
                h = call(operator.add, call(operator.mul, pj, h), sj)
        scan.args, scan.kwargs = tuple(a._replace(h0=h)), {}
        return created

    def _halo(self, gm: fx.GraphModule, pad: fx.Node, group: Any) -> list[fx.Node]:
        """``pad(x, (…, p, r))`` along the sequence → ``pad(cat([halo(x, p), x]), (…, 0, r))``:
        the ``p`` zeros stood for the tokens before the sequence; on a shard they are the
        previous shard's last ``p`` tokens."""
        graph = gm.graph
        x = pad.args[0]
        xv = example_value(x)
        pads = list(arg(pad, 1, "pad"))
        dim = next(d for d, size in enumerate(xv.shape) if isinstance(size, torch.SymInt))
        k = xv.dim() - 1 - dim
        with graph.inserting_before(pad):
            halo = self._call(graph, HALO, (x, dim, pads[2 * k], group.name))
            joined = self._call(graph, torch.cat, ([halo, x], dim))
        pads[2 * k] = 0
        pad.args = (joined, pads, *pad.args[2:])
        propagate_example_value(pad)
        return [halo, joined]

    @staticmethod
    def _scale_before_cast(gm: fx.GraphModule, loss: fx.Node) -> list[fx.Node]:
        """The shard's summed loss is divided by the global count after the op's value is cast
        down to the original's dtype (transformers' float32); divide first and cast the result,
        so that the gradient ``1 / N`` reaching the op is not rounded to float32 (one process,
        with a mean computed inside the op, has no such rounding)."""
        graph = gm.graph
        casts = [n for n in _downstream([loss]) if n.op == "call_method" and n.target == "to" and n.args[0].target is operator.getitem]
        out = next(n for n in graph.nodes if n.op == "output")
        created = []
        for cast in casts:
            value, dtype = cast.args[0], cast.args[1]
            cast.replace_all_uses_with(value)
            graph.erase_node(cast)
            chain = _downstream([value])
            for leaving in [a for a in out.all_input_nodes if a in chain]:
                with graph.inserting_before(out):
                    down = graph.call_method("to", (leaving, dtype))
                    propagate_example_value(down)
                out.args = fx.node.map_arg(out.args, lambda a: down if a is leaving else a)
                created.append(down)
        for n in _downstream([loss]):
            if n.op != "output":
                propagate_example_value(n)
        return created

    @staticmethod
    def _call(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        n = graph.call_function(target, args, kwargs or {})
        if target in (operator.add, operator.sub, operator.mul):
            # Size arithmetic: the example values are symbolic ints, computed as they are.
            a, b = (example_value(x) if isinstance(x, fx.Node) else x for x in args)
            n.meta["example_value"] = target(a, b)
        else:
            propagate_example_value(n)
        return n

    @staticmethod
    def _check_block_heads(match: Match) -> None:
        """The head counts of each attention inside a pipelined layer (checked again when it
        runs), so a plan that cannot be split fails at compile time, naming the numbers."""
        P = match.data["group"].size
        for n in get_plan(match.anchor.args[2]).body.graph.nodes:
            if n.op == "call_function" and getattr(n.target, "__name__", "") == "attention_in_window":
                q, k = example_value(n.args[0]), example_value(n.args[1])
                if q is None or k is None:
                    continue
                hq, hkv = q.shape[1], k.shape[1]
                if hq % P or (hkv % P and P % hkv):
                    raise SequenceParallelError(f"{match.anchor.name}: {hq} query / {hkv} key-value heads cannot be split over sequence_parallel={P} ranks (Ulysses gives each rank H/P heads)")

    @staticmethod
    def _sharded_block(node: fx.Node, group: Any) -> list[fx.Node]:
        """The same layer, its plan told the group: each attention exchanges its chunks."""
        plan = dataclasses.replace(get_plan(node.args[2]), sequence_group=group.name)
        node.args = (*node.args[:2], register_plan(plan))
        return []

    def _ulysses(self, gm: fx.GraphModule, node: fx.Node, group: Any, replicate: int, layout: int | None,
                 built: dict[fx.Node, fx.Node]) -> list[fx.Node]:
        graph, name, P = gm.graph, group.name, group.size
        q, k, v = node.args[:3]
        with graph.inserting_before(node):
            if replicate > 1:
                k = self._call(graph, torch.repeat_interleave, (k, replicate), {"dim": 1})
                v = self._call(graph, torch.repeat_interleave, (v, replicate), {"dim": 1})
            # heads scattered (dim 1), the sequence gathered (dim 2)
            exchanged = [self._call(graph, A2A, (t, 1, 2, name)) for t in (q, k, v)]
            if layout is not None:
                # interleaved shards gathered in rank order: put them in sequence order
                exchanged += [self._call(graph, interleaved_to_sequence, (t, 2, layout, P)) for t in exchanged]
        args = [*exchanged[-3:], *node.args[3:]]
        kwargs = dict(node.kwargs)
        for which in _SEGMENTS:
            ids = forward_arg(node, which)
            if isinstance(ids, fx.Node):
                whole = self._whole_sequence_documents(gm, ids, group, example_value(q).shape[2], built, exchanged)
                index = FORWARD_ARGS.index(which)
                if len(args) > index:
                    args[index] = whole
                else:
                    kwargs[which] = whole
        if len(args) > _SINKS and args[_SINKS] is not None:
            # one sink logit per query head: this rank's heads are the r-th P-th of them
            hq = example_value(q).shape[1]
            with graph.inserting_before(node):
                args[_SINKS] = self._call(graph, torch.narrow, (args[_SINKS], 0, group.rank * (hq // P), hq // P))
            exchanged.append(args[_SINKS])
        node.args, node.kwargs = tuple(args), kwargs
        propagate_example_value(node)
        created = list(exchanged)
        for user in list(node.users):
            propagate_example_value(user)
            if user.args[1] != 0:
                continue
            with graph.inserting_after(user):
                out = user
                if layout is not None:
                    out = self._call(graph, sequence_to_interleaved, (user, 2, layout, P))
                    created.append(out)
            with graph.inserting_after(out):
                back = self._call(graph, A2A, (out, 2, 1, name))
            user.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back and u is not out)
            created.append(back)
        return created

    def _whole_sequence_documents(self, gm: fx.GraphModule, ids: fx.Node, group: Any, length: Any,
                                  memo: dict[fx.Node, fx.Node], created: list[fx.Node]) -> fx.Node:
        """The document ids ``ids`` for the whole sequence, in sequence order: the graph inputs
        they are computed from (:func:`mask_inputs`: transformers' ``position_ids``) gathered
        along the sequence from every rank's contiguous shard, and the nodes that compute them
        (checked by :func:`_document_subgraph`) copied onto the gathered inputs. Each rank
        numbers its shard of the positions from its own start: a document crossing a shard
        boundary, or one starting at a shard's start, is only told apart on the whole
        sequence. Built once per graph: attentions that read the same ids, or ids computed
        from the same inputs, share what ``memo`` holds from an earlier one."""
        graph = gm.graph
        body = _document_subgraph(ids, length)
        symbols = _sequence_symbols(length)
        order = {n: i for i, n in enumerate(graph.nodes)}

        def built(n: fx.Node) -> fx.Node | None:
            """``n``'s whole-sequence version, built for an earlier attention before ``ids``."""
            c = memo.get(n)
            return c if isinstance(c, fx.Node) and c in order and order[c] < order[ids] else None

        if built(ids) is not None:
            return built(ids)
        env: dict[fx.Node, fx.Node] = {}
        # After the ids (every input and node they read is before them), in order.
        with graph.inserting_before(ids.next):
            for p in mask_inputs(ids):
                if built(p) is not None:
                    env[p] = built(p)
                    continue
                shape = example_value(p).shape
                dims = [d for d, size in enumerate(shape) if isinstance(size, torch.SymInt) and set(size.node.expr.free_symbols) & symbols]
                if not dims:
                    continue  # not sharded: the same on every rank
                if len(dims) > 1 or shape[dims[0]].node.expr != length.node.expr:
                    raise SequenceParallelError(
                        f"{ids.name}: the document ids read {p.name} of shape {tuple(shape)}, not one shard of the sequence along one dim")
                d = dims[0]
                # [P, ..., L, ...] in rank order = sequence order (contiguous shards) -> [..., P·L, ...]
                gathered = self._call(graph, GATHER, (p, group.name))
                moved = self._call(graph, torch.movedim, (gathered, 0, d))
                env[p] = self._call(graph, torch.flatten, (moved, d, d + 1))
                created += [gathered, moved, env[p]]
            for n in body:
                if built(n) is not None:
                    env[n] = built(n)
                    continue
                copy = graph.node_copy(n, lambda a: env.get(a, a))
                propagate_example_value(copy)
                env[n] = copy
                created.append(copy)
        memo.update(env)
        return env[ids]

    def _offset(self, gm: fx.GraphModule, node: fx.Node, group: Any, layout: int | None) -> list[fx.Node]:
        """``arange`` over the shard → the shard's global positions (:func:`shard_positions`)."""
        graph = gm.graph
        start, end = (0, node.args[0]) if len(node.args) == 1 else node.args[:2]
        if layout is None:
            with graph.inserting_before(node):
                length = end if start == 0 else self._call(graph, operator.sub, (end, start))
                off = self._call(graph, operator.mul, (length, group.rank))
                new = [self._call(graph, operator.add, (start, off)), self._call(graph, operator.add, (end, off))]
            node.args = (*new, *node.args[2:])
            propagate_example_value(node)
            return [*new, off] + ([] if length is end else [length])
        with graph.inserting_after(node):
            length = end if start == 0 else self._call(graph, operator.sub, (end, start))
        with graph.inserting_after(length if isinstance(length, fx.Node) and length is not end else node):
            local = node if start == 0 else self._call(graph, operator.sub, (node, start))
        with graph.inserting_after(local):
            moved = self._call(graph, shard_positions, (local, length, layout, group.size, group.rank))
        with graph.inserting_after(moved):
            placed = moved if start == 0 else self._call(graph, operator.add, (moved, start))
        created = [n for n in {moved, placed, local, length} if isinstance(n, fx.Node) and n not in (node, end)]
        node.replace_all_uses_with(placed, delete_user_cb=lambda u: u not in created)
        return created

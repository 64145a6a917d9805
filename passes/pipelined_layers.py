"""Run each Transformer decoder layer chunk by chunk along the sequence (FPDT's layer pipeline).

After :mod:`attention` has turned a layer's attention core into
``longctx::chunked_attention_fwd(_offload)``, only the attention core is memory-bounded: the
layer's projections, norms, MLP intermediates (``[T, intermediate]``), q/k/v and RoPE tensors
are still whole-sequence activations saved for backward. This pass runs the whole layer one
chunk of ``Q`` tokens at a time::

    before:  x ─ norm ─ q/k/v proj ─ RoPE(cos, sin) ─ chunked_attention ─ o_proj ─ (+x) ─ norm ─ MLP ─ (+) ─ out
    after:   out, handle = longctx.sequence_block_fwd([x, cos, sin, *params], sizes, plan)

Forward, chunk ``c``: its own q/k/v; ``k_c, v_c`` appended to the layer's K/V history in the
host pool; attention of its queries over the history (non-causal) and its own keys (causal),
merged by the online softmax; then o_proj, residual, norm, MLP for its tokens only. Saved
for backward: the weights, and in the host pool the layer's sequence inputs (``x``, the
RoPE tables) and the K/V history — nothing ``O(T)`` on the device. Backward walks the chunks
in reverse, recomputes each and takes its vector-Jacobian product; the history's adjoint is a
pair of ``dK, dV`` accumulators in the host pool that every later chunk adds into, and that
flow back through chunk ``c``'s k/v projections when the walk reaches it. Exact. The runtime
is the one SSM blocks use (``kernels/sequence_block/``): the K/V history is its second kind
of carry.

What makes it exact, proved from the graph by :mod:`sequence_window` (refused otherwise,
with the reason in the report): the layer is token-wise local along the sequence except
through its attention (no reduction, shift, ``cumsum`` or look-ahead along T; the length
used only as a length); the attention is causal, its q/k/v and every output read the
attention's output at their own position only; positions come in as sequence inputs
(``cos``/``sin`` computed from ``position_ids`` outside the layer), so a chunk's slice of
them is the global offsets. The region rules are :mod:`block_region`'s (no random numbers,
no in-place updates, no other long-context op, no interleaving with outside work).

Configuration: ``Config.layers`` when the configuration has it (``enabled``, ``chunk_size``,
``offload``); otherwise the arguments of :class:`PipelinedLayersPass`, whose defaults are
off, ``attention.chunk_size`` tokens per chunk (:data:`DEFAULT_CHUNK` when that is chosen at
run time) and ``attention.offload`` for the host tier.
Give ``extra_passes=(PipelinedLayersPass(enabled=True),)`` to turn it on.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from longctx_compiler.kernels.attention.op import FORWARD_ARGS, forward_arg
from longctx_compiler.kernels.sequence_block import BLOCK_OP, attention_in_window, scan_in_window
from longctx_compiler.passes.adjoint_sharded_blocks import scan_site, sequence_block_plan
from longctx_compiler.passes.adjoint_sharded_scan import SCAN_OP
from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext
from longctx_compiler.passes.block_region import check_region, find_blocks, replace_region
from longctx_compiler.passes.analysis.fx_utils import example_value
from longctx_compiler.passes.analysis.sequence_window import ATTENTION, SCAN, CarrySite, analyse_window

__all__ = ["PipelinedLayersPass", "ATTENTION_OPS", "configured_chunk", "attention_variant"]

ATTENTION_OPS = (
    torch.ops.longctx.chunked_attention_fwd.default,
    torch.ops.longctx.chunked_attention_fwd_offload.default,
)
#: Tokens per layer chunk when neither the pass, ``Config.layers`` nor ``attention.chunk_size``
#: names one (the attention's chunk may be chosen at run time; a layer's chunk is a plan constant).
DEFAULT_CHUNK = 1024
# q, k, v of the attention ops run along dim 2 ([B, H, T, D]); document ids along dim 1.
_QKV = {0: 2, 1: 2, 2: 2}
ROWS_SEE_KEYS = torch.ops.longctx.attention_rows_see_keys.default
_CAUSAL = 3


def configured_chunk(config: Any) -> int:
    """Tokens per layer chunk the configuration asks for: ``layers.chunk_size``, else
    ``attention.chunk_size``, else :data:`DEFAULT_CHUNK`."""
    layers = getattr(config, "layers", None)
    return getattr(layers, "chunk_size", None) or config.attention.chunk_size or DEFAULT_CHUNK


def attention_variant(n: fx.Node) -> str | None:
    """What an attention op call adds to plain causal attention (a sliding window, soft-capped
    scores, sink logits, document or padding ids — its arguments after the pool budget), in
    words; None if nothing."""
    window, softcap, sinks, documents, keys = (forward_arg(n, a) for a in ("window", "softcap", "sinks", "segment_ids", "key_segment_ids"))
    found = [f"a sliding window of {window}" if window else None, f"soft-capped scores ({softcap})" if softcap else None,
             "attention sinks" if sinks is not None else None,
             ("padded keys" if keys is not None else "packed documents") if documents is not None else None]
    return ", ".join(f for f in found if f) or None


def _is_attention(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in ATTENTION_OPS


def _is_carry(n: fx.Node) -> bool:
    return n.op == "call_function" and (n.target in ATTENTION_OPS or n.target is SCAN_OP)


class PipelinedLayersPass(Pass):
    """Each layer around one causal attention → one op that runs it chunk by chunk.

    Args:
        enabled: run the pass (None: ``Config.layers.enabled`` if the config has it, else off).
        chunk_size: tokens per chunk (None: ``Config.layers.chunk_size`` if set, else
            ``attention.chunk_size``).
        offload: keep the layer's sequence inputs in the host pool between forward and
            backward (None: ``Config.layers.offload`` if set, else ``attention.offload``). The
            K/V history is always in the host pool.
    """

    name = "pipelined_layers"
    kind = "decoder layer -> chunked along T (K/V history fwd, dK/dV bwd)"

    def __init__(self, enabled: bool | None = None, chunk_size: int | None = None, offload: bool | None = None):
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"PipelinedLayersPass: enabled must be a bool or None, got {enabled!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"PipelinedLayersPass: chunk_size must be a positive number of tokens or None, got {chunk_size!r}")
        if offload is not None and not isinstance(offload, bool):
            raise TypeError(f"PipelinedLayersPass: offload must be a bool or None, got {offload!r}")
        self._enabled, self._chunk, self._offload = enabled, chunk_size, offload

    # -- settings -----------------------------------------------------------------------------
    def _setting(self, ctx: PassContext, name: str, own: Any, fallback: Any) -> Any:
        if own is not None:
            return own
        layers = getattr(ctx.config, "layers", None)
        value = getattr(layers, name, None) if layers is not None else None
        return fallback if value is None else value

    def enabled(self, ctx: PassContext) -> bool:
        return bool(self._setting(ctx, "enabled", self._enabled, False)) and ctx.config.attention.enabled

    def chunk(self, ctx: PassContext, window: Any = None) -> int:
        q = self._chunk or configured_chunk(ctx.config)
        return q if window is None else max(q, window.min_length)

    def offload(self, ctx: PassContext) -> bool:
        return bool(self._setting(ctx, "offload", self._offload, ctx.config.attention.offload))

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        window = match.data.get("window")
        return {
            "layer": match.data["path"], "nodes": len(match.nodes), "chunk_size": self.chunk(ctx, window),
            "halo": None if window is None else window.halo, "offload": self.offload(ctx),
            "saved": "weights; host pool: layer inputs + K/V history",
        }

    # -- match / check / apply ----------------------------------------------------------------
    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        # The layer: the outermost module with one attention and no block already made into
        # a sequence-block op (a Mamba layer beside it). A scan in the same module is the
        # layer's second carry (a hybrid layer), not another layer.
        attentions = [n for n in gm.graph.nodes if _is_attention(n)]
        counted = lambda n: _is_attention(n) or (n.op == "call_function" and n.target is BLOCK_OP)  # noqa: E731
        return find_blocks(gm, attentions, counted)

    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        attention = match.data["anchor_node"]
        if match.data["path"] is None:
            raise CantApply("the attention is not inside a module of its own (no enclosing layer to pipeline)")
        for n in match.nodes:
            keys = forward_arg(n, "key_segment_ids") if _is_attention(n) else None
            if isinstance(keys, fx.Node) and keys.target is ROWS_SEE_KEYS:
                # The check that every query row sees a key reads whole rows of ids; a
                # chunk's window holds part of a row.
                raise CantApply("the attention checks at run time that every query sees a key (padding with transformers' "
                                "eager spelling), which reads whole rows: not chunked yet")
        check_region(gm, match, _is_carry)
        carries = []
        for n in match.nodes:
            if _is_attention(n):
                if n.args[_CAUSAL] is not True:
                    raise CantApply("the attention is not causal: every token reads the whole sequence, which no chunk holds")
                # Windows, soft-caps, sinks and document ids are applied chunk by chunk
                # (HistoryAttention; the keys' ids go into the K/V history), not yet under
                # sequence parallelism.
                if ctx.config.distributed.active and attention_variant(n):
                    raise CantApply(f"the attention has {attention_variant(n)}, which the layer's K/V history does not apply "
                                    "under sequence parallelism yet")
                seq = dict(_QKV)
                seq.update({FORWARD_ARGS.index(a): 1 for a in ("segment_ids", "key_segment_ids") if forward_arg(n, a) is not None})
                carries.append(CarrySite(n, tuple(n.args), seq, 0, ATTENTION))
            elif n.op == "call_function" and n.target is SCAN_OP:
                if ctx.config.ssm.mode != "exact":
                    raise CantApply(f"the layer's scan adjoint is {ctx.config.ssm.mode!r}: a truncated adjoint is defined per scan, not across chunks")
                carries.append(scan_site(n))
        assert any(c.node is attention for c in carries)
        window = analyse_window(match.nodes, match.data["inputs"], match.data["outputs"], carries)
        for a in match.data["inputs"]:
            v = example_value(a)
            if not isinstance(v, (torch.Tensor, torch.SymInt, int)):
                raise CantApply(f"layer input {a.name} is a {type(v).__name__}")
        match.data["window"] = window
        match.data["carries"] = carries

    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        window = match.data["window"]
        key, tensors, sizes = sequence_block_plan(
            gm, match, window, match.data["carries"], {ATTENTION: attention_in_window, SCAN: scan_in_window},
            self.chunk(ctx, window), host_inputs=self.offload(ctx), host_budget=ctx.config.attention.host_pool_bytes,
        )
        call, results = replace_region(gm, match, BLOCK_OP, (list(tensors), list(sizes), key), {})
        return [call, *results]

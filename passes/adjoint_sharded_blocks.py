"""Run each block around an adjoint-sharded scan (Mamba's selective scan, Mamba-2's SSD scan)
chunk by chunk along the sequence.

The scan's own saved state is already ``M·B·D·N`` boundary states. What a Mamba-style block
still needs in backward is its token-wise work: the input projection ``[T, 2·D_inner]``,
the convolution, ``x_proj``/``dt_proj``, the gate — about ten ``[T, D_inner]`` tensors,
saved, or (with :mod:`recompute_ssm_blocks`) recomputed all at once in backward. This pass
takes the adjoint sharding from the scan up to the whole block::

    before:  x ─ norm ─ in_proj ─ conv ─ silu ─ x_proj ─ dt_proj ─ scan ─ gate ─ out_proj ─ (+x) ─ out
    after:   out, states = longctx.ssm_block_fwd([x, *params], sizes, plan)

A Mamba-2 block (``in_proj → (z, xBC, Δ) → conv → SSD scan → norm(y · silu(z)) → out_proj``)
becomes the same op, its carry the SSD state ``[B, H, P, N]``.

The op runs the block one chunk of ``Q`` tokens at a time (the chunk's window also reads the
``H`` tokens before it, the convolution's reach), carrying the scan's state forward and
keeping the state entering each chunk. Its backward walks the chunks in reverse: recompute
the chunk, take its vector-Jacobian product with the output gradient and the state adjoint
``λ`` from the chunk after, pass ``λ`` on. Exact; saved: the block's inputs and ``M``
states; working memory: one chunk's activations instead of the whole sequence's.
(``kernels/sequence_block/chunked.py`` has the schedule.)

Which nodes form "the block" and what disqualifies it are as in :mod:`recompute_ssm_blocks`
(which handles any block this pass refuses). On top, the block must be provably local
along the sequence (:mod:`sequence_window`: every operation has a rule; no look-ahead; the
outputs pointwise in the scan's output), and a selective scan exact (a truncated adjoint is
defined per scan, not across the block's chunks). A scan (selective or SSD) with documents
(``seq_idx``) also reads the token before each chunk: a document starting at a chunk's
first token resets the carried state.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from longctx_compiler.kernels.selective_scan import schema as scan_schema
from longctx_compiler.kernels.sequence_block import BLOCK_OP, BlockPlan, register_plan, scan_in_window, ssd_in_window
from longctx_compiler.kernels.ssd import schema as ssd_schema
from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext
from longctx_compiler.passes.block_region import check_region, copy_body, replace_region
from longctx_compiler.passes.analysis.fx_utils import example_value
from longctx_compiler.passes.recompute_ssm_blocks import find_scan_blocks, is_scan, is_ssd
from longctx_compiler.passes.analysis.sequence_window import SCAN, SSD, STATE_CARRIES, CarrySite, WindowAnalysis, analyse_window
from longctx_compiler.runtime.autocast import current_autocast

__all__ = ["AdjointShardedBlocksPass", "BLOCK_OP", "sequence_block_plan"]

#: Each scan kind's windowed form.
WINDOWED = {SCAN: scan_in_window, SSD: ssd_in_window}


def scan_site(scan: fx.Node) -> CarrySite:
    """A scan (selective or SSD) as a carry of the sequence-window analysis: its arguments,
    those that run along the sequence (by position, with their dim), its per-token result
    and, for a scan with documents, the one token before each chunk that a reset reads."""
    if is_ssd(scan):
        what, schema, args, output = SSD, ssd_schema, ssd_schema.SSDArgs.of(scan), ssd_schema.OUT
    else:
        what, schema, args, output = SCAN, scan_schema, scan_schema.ScanArgs.of(scan), scan_schema.Y
    seq = {args._fields.index(name): d for name, d in schema.SEQUENCE_DIMS.items() if getattr(args, name) is not None}
    reach = 1 if args.seq_idx is not None else 0
    return CarrySite(scan, tuple(args), seq, output, what, reach)


def sequence_block_plan(gm: fx.GraphModule, match: Match, window: WindowAnalysis, carries: list[CarrySite],
                        windowed: dict[str, Any], chunk: int, host_inputs: bool = False,
                        host_budget: int | None = None) -> tuple[str, list[fx.Node], list[fx.Node]]:
    """Build and register the plan of a block: its body with each carry node replaced by the
    windowed form for its kind (``windowed[site.what](*site.args, slot, carry)``).

    Returns ``(plan name, tensor inputs, integer inputs)``: the op's arguments.
    """
    inputs: list[fx.Node] = match.data["inputs"]
    outputs: list[fx.Node] = match.data["outputs"]
    tensors = [a for a in inputs if isinstance(example_value(a), torch.Tensor)]
    sizes = [a for a in inputs if not isinstance(example_value(a), torch.Tensor)]
    slots: dict[fx.Node, tuple[CarrySite, int]] = {}
    counts: dict[str, int] = {}
    for site in carries:
        # State carries (selective and SSD scans) share one numbering: the runtime keeps a
        # state per slot, whatever the scan.
        kind = SCAN if site.what in STATE_CARRIES else site.what
        slots[site.node] = (site, counts.get(kind, 0))
        counts[kind] = counts.get(kind, 0) + 1

    def replace(n, env, extra):
        if n not in slots:
            return None
        site, slot = slots[n]
        args = tuple(env[x] if isinstance(x, fx.Node) else x for x in site.args)
        return extra[0].graph.call_function(windowed[site.what], (*args, slot, extra[0]))

    body, _, env = copy_body(match, [*tensors, *sizes], ["carry"], replace)
    body.output(tuple(env[o] for o in outputs))
    plan = BlockPlan(
        body=fx.GraphModule(gm, body, class_name="SequenceBlock"),
        tensor_dims=tuple(window.input_dims.get(a) for a in tensors),
        size_exprs=tuple(window.size_inputs.get(a) for a in sizes),
        length=window.length,
        output_dims=tuple(window.output_dims),
        halo=window.halo,
        min_length=window.min_length,
        chunk=chunk,
        scans=counts.get(SCAN, 0),
        attentions=sum(v for k, v in counts.items() if k != SCAN),
        host_inputs=tuple(example_value(a).dim() if host_inputs and a in window.input_dims else 0 for a in tensors),
        host_budget=host_budget,
        autocast=current_autocast(),
    )
    return register_plan(plan), tensors, sizes


class AdjointShardedBlocksPass(Pass):
    """Each block around a scan → one op that runs it chunk by chunk, forward and backward."""

    name = "adjoint_sharded_blocks"
    kind = "ssm block -> chunked along T (state fwd, adjoint bwd)"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.config.ssm.enabled and ctx.config.ssm.shard_blocks and not ctx.config.distributed.active

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        window = match.data.get("window")
        ssd = is_ssd(match.data["scan"])
        return {
            "block": match.data["path"], "nodes": len(match.nodes), "chunk_size": self.chunk(window, ctx),
            "halo": None if window is None else window.halo, "scan": "ssd" if ssd else "selective_scan",
            "saved": f"block inputs + {'M·B·H·P·N' if ssd else 'M·B·D·N'} boundary states",
        }

    @staticmethod
    def chunk(window: Any, ctx: PassContext) -> int:
        """Q: the configured block chunk, or the shortest exact window if that is longer."""
        q = ctx.config.ssm.block_chunk_size
        return q if window is None else max(q, window.min_length)

    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        return find_scan_blocks(gm)

    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        if match.data["path"] is None:
            raise CantApply("the scan is not inside a module of its own (no enclosing block to recompute)")
        check_region(gm, match, is_scan)
        site = scan_site(match.data["scan"])
        cfg = ctx.config.ssm
        if site.what == SCAN and cfg.mode != "exact":
            raise CantApply(f"the scan's adjoint is {cfg.mode!r}: a truncated adjoint is defined per scan, not across the block's chunks")
        window = analyse_window(match.nodes, match.data["inputs"], match.data["outputs"], [site])
        for a in match.data["inputs"]:
            v = example_value(a)
            if not isinstance(v, (torch.Tensor, torch.SymInt, int)):
                raise CantApply(f"block input {a.name} is a {type(v).__name__}")
        match.data["window"] = window
        match.data["carries"] = [site]

    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        window = match.data["window"]
        key, tensors, sizes = sequence_block_plan(gm, match, window, match.data["carries"], WINDOWED, self.chunk(window, ctx))
        call, results = replace_region(gm, match, BLOCK_OP, (list(tensors), list(sizes), key), {})
        return [call, *results]

"""Captured Mamba-2 SSD scan → planned SSD scan with an adjoint-sharded backward.

:mod:`longctx_compiler.capture` substitutes the library's SSD chunk-scan functions
(``transformers``' ``mamba2_chunk_scan`` in the Mamba2, Zamba2, Bamba, FalconH1,
GraniteMoeHybrid and NemotronH model files; ``mamba_ssm``'s ``mamba_chunk_scan_combined``) by
the canonical op ``longctx::ssd_fwd`` with ``chunk_size = 0`` ("not planned yet"), and records
the ``chunk_size`` the model passed. This pass plans it::

    before:  res = longctx.ssd_fwd(x, dt, A, B, C, D, z, dt_bias, sp, lo, hi, h0, seq_idx, 0)
    after:   res = longctx.ssd_fwd(x, dt, A, B, C, D, z, dt_bias, sp, lo, hi, h0, seq_idx, Q)

with ``Q`` the model's ``chunk_size`` when it is a positive int (the chunk the model was
trained and tuned with), else the op's default (:data:`~longctx_compiler.kernels.ssd.DEFAULT_CHUNK`).
The op's registered autograd saves the inputs and the ``[B, H, M, P, N]`` chunk-boundary
states only (``M = ⌈T/Q⌉``): ``M·B·H·P·N`` numbers instead of the torch path's per-chunk
states, ``[B, H, C, Q, Q]`` decay matrices and other O(T) intermediates. The adjoint is exact
(``ssm.mode = "truncated"`` applies to selective scans only; the report says so).

The report's ``kind`` names the source (``"transformers bamba chunk scan -> ssd(adjoint-sharded)"``);
``details["precision"]`` says where the op computes more precisely than the library function
(transformers' torch path rounds x, B, C and Δ to float32 and runs the chunk form in float32).

A recognised call the op cannot reproduce exactly ran the library's own function inside the
graph (see :func:`longctx_compiler.capture.refusal_of`); this pass records it as a refusal
with the capture's reason, one per call.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from longctx_compiler.capture import WRAPPER_NAME, model_chunk_of, precision_of, refusal_of, source_of
from longctx_compiler.kernels.ssd import DEFAULT_CHUNK
from longctx_compiler.kernels.ssd.schema import SSDArgs
from longctx_compiler.passes.adjoint_sharded_scan import _drop_wrapper_frames, _refresh_getitems
from longctx_compiler.passes.analysis.fx_utils import example_value, propagate_example_value
from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext

__all__ = ["SSDScanPass", "SSD_OP"]

SSD_OP = torch.ops.longctx.ssd_fwd.default



class SSDScanPass(Pass):
    """Plan every captured SSD scan node (chunk size); report the captures left to the library."""

    name = "ssd_scan"
    kind = "ssd -> ssd(adjoint-sharded)"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.config.ssm.enabled

    def kind_of(self, match: Match) -> str:
        return f"{match.data['source']} -> ssd(adjoint-sharded)"

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        d = match.data
        details = {
            "chunk_size": d["chunk"],
            "chunk_size_from": d["chunk_from"],
            "mode": "exact",
            "source": d["source"],
            "dims": d.get("dims"),
            "saved_state": "M·B·H·P·N, M = ceil(T / chunk_size)",
            "saved_state_numbers": d.get("saved"),
        }
        if ctx.config.ssm.mode != "exact":
            details["mode_note"] = f"ssm.mode={ctx.config.ssm.mode!r} applies to selective scans; the SSD adjoint is exact"
        if d.get("precision"):
            details["precision"] = d["precision"]
        return details

    # -- match ------------------------------------------------------------------------------
    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        refused: dict[tuple, fx.Node] = {}
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target is SSD_OP:
                source = source_of(node) or "ssd"
                _drop_wrapper_frames(node)
                yield Match(anchor=node, nodes=[node], data={"source": source, "precision": precision_of(node)})
                continue
            why = refusal_of(node)
            # One refusal per call of the library's function: its nodes share the reason and
            # the stack up to the captured call.
            if why and why[0] == "ssd":
                trace = node.meta.get("stack_trace") or ""
                refused.setdefault((why, trace[: trace.find(f"in {WRAPPER_NAME}")]), node)
        for (why, _), node in refused.items():
            _drop_wrapper_frames(node)
            yield Match(anchor=node, nodes=[node], data={"source": why[1], "refused": why[2]})

    # -- check ------------------------------------------------------------------------------
    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        d = match.data
        if "refused" in d:
            raise CantApply(f"{d['source']} left to the library: {d['refused']}")
        node = match.anchor
        args = SSDArgs.of(node)
        chunk = args.chunk_size
        if not isinstance(chunk, int) or chunk != 0:
            raise CantApply(f"already planned (chunk_size={chunk!r}); a hand-planned node keeps its plan")
        model_chunk = model_chunk_of(node)
        if isinstance(model_chunk, int):
            d["chunk"], d["chunk_from"] = model_chunk, "model"
        else:
            why = "not recorded" if model_chunk is None else f"{model_chunk}, not a positive int"
            d["chunk"], d["chunk_from"] = DEFAULT_CHUNK, f"op default (the model's chunk_size: {why})"
        x, b = example_value(args.x), example_value(args.B)
        if isinstance(x, torch.Tensor) and isinstance(b, torch.Tensor):
            bsz, seqlen, heads, headdim = x.shape
            groups, dstate = b.shape[2:]
            d["dims"] = {"B": str(bsz), "T": str(seqlen), "H": str(heads), "P": str(headdim), "G": str(groups), "N": str(dstate)}
            m = (seqlen + d["chunk"] - 1) // d["chunk"]
            d["saved"] = str(m * bsz * heads * headdim * dstate)

    # -- apply ------------------------------------------------------------------------------
    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        node = match.anchor
        args = SSDArgs.of(node)._replace(chunk_size=match.data["chunk"])
        graph = gm.graph
        with graph.inserting_before(node):
            new = graph.call_function(SSD_OP, tuple(args), {})
        new.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        # The boundary states' length M·P·N depends on Q: recompute the fake values.
        propagate_example_value(new)
        node.replace_all_uses_with(new)
        _refresh_getitems(new)
        graph.erase_node(node)
        return [new]


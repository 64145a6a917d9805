"""Canonical selective scan → adjoint-sharded (chunked) selective scan, planned from the config.

The canonical node is ``longctx::selective_scan_fwd`` with ``chunk_size = 0`` ("not planned
yet"). It gets there three ways: :func:`longctx_compiler.nn.selective_scan_fn` emits it,
:mod:`longctx_compiler.capture` emits it for library scan functions (``transformers``'
Mamba family, ``mamba_ssm``), and :mod:`longctx_compiler.passes.scan_to_selective_scan`
raises linear ``scan`` bodies into it. This pass plans it::

    before:  res = longctx.selective_scan_fwd(u, Δ, A, B, C, D, z, bias, sp, h0, 0, "exact", 0, seq_idx)
    after:   res = longctx.selective_scan_fwd(u, Δ, A, B, C, D, z, bias, sp, h0, Q, mode, T̄, seq_idx)

with ``Q = config.ssm.chunk_size`` and ``mode``/``T̄`` from :class:`SSMConfig`: ``"exact"``
unless the user named ``mode="truncated", window=T̄``. The document index ``seq_idx`` (None
without packed documents) is kept as it is. The op's registered autograd saves
the inputs and the ``[B, D, M, N]`` chunk-boundary states only (``M = ⌈T/Q⌉``), so the
scan's saved state is ``M·B·D·N`` numbers instead of ``T·B·D·N``.

What makes the rewrite exact (refused otherwise, with the reason): the operands are real
floating-point tensors in a combination the op computes at least as precisely as its
reference (activations u/Δ/B/C/z in one dtype; A/D/bias/h0 in any float dtype: the op computes
in the promotion of all of them and at least float32), and the node is still unplanned (``chunk_size == 0``; a node a
user planned by hand keeps the user's plan).

The report's ``kind`` says where the node came from: ``"transformers mamba scan ->
selective_scan(adjoint-sharded)"`` for a captured library function (read from the node's
provenance, see :func:`longctx_compiler.capture.source_of`), ``"scan -> ..."`` for a raised
``scan`` higher-order op, ``"selective_scan -> ..."`` for a node emitted by a model. Where the
op computes more precisely than what it replaced (the library function's ``.float()`` or
16-bit steps, a raised body's rounded readout), ``details["precision"]`` says so (from
:func:`longctx_compiler.capture.precision_of` or the raising pass).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

# Importing the op module registers torch.ops.longctx.selective_scan_fwd/_bwd.
from longctx_compiler.capture import WRAPPER_NAME, precision_of, source_of
from longctx_compiler.kernels.selective_scan import op as _op  # noqa: F401
from longctx_compiler.kernels.selective_scan.schema import UNPLANNED, ScanArgs
from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext
from longctx_compiler.passes.analysis.fx_utils import example_value

__all__ = ["AdjointShardedScanPass", "SCAN_OP", "RAISED_KEY", "PRECISION_META"]

SCAN_OP = torch.ops.longctx.selective_scan_fwd.default
#: ``node.meta`` key the scan-raising pass sets on the nodes it creates (value: the HOP name).
RAISED_KEY = "longctx_raised_from"
#: ``node.meta`` key of a precision note set by the pass that created the node (the raising pass).
PRECISION_META = "longctx_precision"

#: The op's tensor arguments, which must be real floating-point tensors.
_TENSORS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AdjointShardedScanPass(Pass):
    """Plan every canonical selective-scan node: chunk size, exact or truncated adjoint."""

    name = "adjoint_sharded_scan"
    kind = "selective_scan -> selective_scan(adjoint-sharded)"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.config.ssm.enabled

    def kind_of(self, match: Match) -> str:
        return f"{match.data['source']} -> selective_scan(adjoint-sharded)"

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        cfg = ctx.config.ssm
        d = match.data
        return {
            "chunk_size": cfg.chunk_size,
            "mode": cfg.mode,
            "window": cfg.window,
            "source": d["source"],
            "dims": d.get("dims"),
            "saved_state": "M·B·D·N, M = ceil(T / chunk_size)",
            "saved_state_numbers": d.get("saved"),
            **({"precision": d["precision"]} if d.get("precision") else {}),
        }

    # -- match ------------------------------------------------------------------------------
    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is SCAN_OP:
                source = _source(node)
                _drop_wrapper_frames(node)
                # Where the scan is more precise than what it replaced (a captured library
                # function's casts, a raised scan body's narrowing readout): for the report.
                precision = node.meta.get(PRECISION_META) or precision_of(node)
                yield Match(anchor=node, nodes=[node], data={"source": source, "precision": precision})

    # -- check ------------------------------------------------------------------------------
    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        node = match.anchor
        args = ScanArgs.of(node)
        chunk = args.chunk_size
        if not isinstance(chunk, int) or chunk != UNPLANNED:
            raise CantApply(f"already planned (chunk_size={chunk!r}); a hand-planned node keeps its plan")
        if args.mode != "exact":
            raise CantApply(f"an unplanned node must have mode 'exact', got {args.mode!r}")
        if not isinstance(args.delta_softplus, bool):
            raise CantApply("delta_softplus is only known at run time")
        vals = {}
        for name in _TENSORS:
            arg = getattr(args, name)
            if arg is None:
                continue
            v = example_value(arg)
            if not isinstance(v, torch.Tensor):
                raise CantApply(f"unknown value for {name}")
            if v.dtype not in _FLOATS:
                raise CantApply(f"{name} has dtype {v.dtype}; the scan is defined for real float16/bfloat16/float32/float64")
            vals[name] = v
        act = vals["u"].dtype
        for name in ("delta", "B", "C", "z"):
            if name in vals and vals[name].dtype != act:
                raise CantApply(f"{name} is {vals[name].dtype} but u is {act}: mixed activation dtypes have no exact counterpart")
        u = vals["u"]
        bsz, dim, seqlen = u.shape
        dstate = vals["A"].shape[1]
        cfg = ctx.config.ssm
        match.data["dims"] = {"B": str(bsz), "D": str(dim), "T": str(seqlen), "N": str(dstate)}
        m = (seqlen + cfg.chunk_size - 1) // cfg.chunk_size
        match.data["saved"] = str(m * bsz * dim * dstate)

    # -- apply ------------------------------------------------------------------------------
    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        node = match.anchor
        cfg = ctx.config.ssm
        args = ScanArgs.of(node)._replace(chunk_size=cfg.chunk_size, mode=cfg.mode, window=cfg.window if cfg.mode == "truncated" else 0)
        graph = gm.graph
        with graph.inserting_before(node):
            new = graph.call_function(SCAN_OP, tuple(args), {})
        new.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        # The boundary-state output's length M depends on Q: recompute the fake values.
        from longctx_compiler.passes.analysis.fx_utils import propagate_example_value

        propagate_example_value(new)
        node.replace_all_uses_with(new)
        _refresh_getitems(new)
        graph.erase_node(node)
        return [new]


def _refresh_getitems(node: fx.Node) -> None:
    val = node.meta.get("example_value")
    if not isinstance(val, (tuple, list)):
        return
    for user in node.users:
        if user.op == "call_function" and user.target.__name__ == "getitem" and isinstance(user.args[1], int):
            user.meta["example_value"] = val[user.args[1]]


def _drop_wrapper_frames(node: fx.Node) -> None:
    # A captured node's innermost frame is the capture wrapper; the report's site should be
    # the model's line that called the library function, so trailing wrapper frames go.
    trace = node.meta.get("stack_trace")
    if not trace or WRAPPER_NAME not in trace:
        return
    lines = trace.rstrip("\n").split("\n")
    cut = next((i for i, line in enumerate(lines) if line.strip().startswith("File ") and f"in {WRAPPER_NAME}" in line), None)
    if cut is not None and cut > 0:
        node.meta["stack_trace"] = "\n".join(lines[:cut]) + "\n"


def _source(node: fx.Node) -> str:
    raised = node.meta.get(RAISED_KEY)
    if raised:
        return raised
    return source_of(node) or "selective_scan"

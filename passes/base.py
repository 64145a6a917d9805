"""Pass infrastructure: the base class every graph pass derives from, and the runner.

A pass is four small steps over the Dynamo FX graph (torch-level IR)::

    for match in pass.match(gm):          # find candidate sites, in graph order
        try:
            pass.check(gm, match)         # prove the rewrite exact, or raise CantApply(reason)
        except CantApply as why:
            record refusal(site, why)     # the graph is left untouched at that site
            continue
        added = pass.apply(gm, match)     # rewrite; returns the nodes it created
        record rewrite(site, replaced, added)

After each pass the runner stamps provenance (``node.meta["longctx_pass"]``) on every node
the pass created, runs ``graph.lint()`` and recompiles the module. An exception other than
:class:`CantApply` is a bug in the pass: the runner raises it as :class:`PassError`, naming the
pass and the site, and the backend then falls back to the un-rewritten graph (or raises, with
``strict=True``).

Activation-checkpoint regions (``torch.utils.checkpoint``, Hugging Face's
``gradient_checkpointing_enable()``) are opened before the passes run and closed after, so
passes see inside them as if there were none (:mod:`longctx_compiler.passes.checkpoint_regions`);
sites a pass would match inside bodies of other higher-order ops are reported as refusals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch.fx as fx

from longctx_compiler.passes.analysis.fx_utils import writes_in_place
from longctx_compiler.passes import checkpoint_regions as regions
from longctx_compiler.passes.checkpoint_regions import REGION_KEY
from longctx_compiler.report import PROVENANCE_KEY, GraphRecord, Refusal, Rewrite, node_site

if TYPE_CHECKING:
    from longctx_compiler.config import Config

__all__ = ["CantApply", "Match", "Pass", "PassContext", "PassError", "run_passes"]

log = logging.getLogger("longctx_compiler")


class CantApply(Exception):
    """Raised by :meth:`Pass.check` when a rewrite cannot be proven exact; carries the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PassError(RuntimeError):
    """A pass failed with an unexpected error (a bug, not a refusal).

    Attributes:
        pass_name: the pass that failed (``"checkpoint_regions"`` for the region handling).
        site: where it was working when it failed, or None (e.g. while matching).
        error: the original exception (also the ``__cause__``).
    """

    def __init__(self, pass_name: str, site: str | None, error: BaseException) -> None:
        self.pass_name = pass_name
        self.site = site
        self.error = error
        where = f" at {site}" if site else ""
        # The first line of the message only: some errors (fake-tensor propagation) carry
        # pages of context, which belong in the traceback (``__cause__``), not in a warning.
        first = (str(error).strip().splitlines() or [""])[0]
        super().__init__(f"pass {pass_name!r} failed{where}: {type(error).__name__}: {first}")


@dataclass
class Match:
    """A candidate site found by :meth:`Pass.match`.

    Attributes:
        anchor: the node that names the site (its module path and source line are the site).
        nodes: every node of the matched pattern; those the rewrite removes.
        data: whatever the pass learned while matching (operands, flags) for check/apply.
    """

    anchor: fx.Node
    nodes: list[fx.Node]
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may read while it works: the config and the example inputs of the graph."""

    config: "Config"
    example_inputs: Sequence[Any] = ()


class Pass:
    """Base class of graph passes.

    Subclasses set ``name`` (unique, used in reports and provenance) and ``kind`` (the
    rewrite's description, e.g. ``"sdpa -> chunked_attention"``) and implement
    :meth:`match`, :meth:`check`, :meth:`apply`. :meth:`enabled` lets a pass switch itself
    off from the config.
    """

    name: str = "unnamed"
    kind: str = "rewrite"

    def enabled(self, ctx: PassContext) -> bool:
        return True

    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        raise NotImplementedError(f"{type(self).__name__}.match")

    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        """Raise :class:`CantApply` unless the rewrite of ``match`` is exact."""

    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        """Rewrite ``match``; return the created nodes. Must leave the graph valid."""
        raise NotImplementedError(f"{type(self).__name__}.apply")

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        """Facts for the report (chunk size, mode, ...)."""
        return {}

    def kind_of(self, match: Match) -> str:
        """The report's ``kind`` for this match (override when one pass rewrites several spellings)."""
        return self.kind

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], ctx: PassContext, record: GraphRecord) -> fx.GraphModule:
    """Run ``passes`` in order over ``gm`` in place, recording into ``record``.

    Raises:
        PassError: a pass (or the checkpoint-region handling) failed unexpectedly; ``gm`` is
            then in an unspecified state (the backend rewrites a copy).
    """
    try:
        opened = regions.open_regions(gm, record)
    except Exception as exc:
        raise PassError(regions.PASS_NAME, None, exc) from exc
    for p in passes:
        if not p.enabled(ctx):
            continue
        _run_one(gm, p, ctx, record)
    try:
        regions.refuse_hidden_sites(gm, passes, ctx, record)
        regions.close_regions(gm, opened, record)
    except Exception as exc:
        raise PassError(regions.PASS_NAME, None, exc) from exc
    return gm


def _run_one(gm: fx.GraphModule, p: Pass, ctx: PassContext, record: GraphRecord) -> None:
    site: str | None = None
    try:
        # Dynamo hands over a graph without dead code, so a node nobody reads is there for its
        # side effect (``h.mul_(2)`` as a statement): dead-code elimination after the rewrite
        # may only remove what the rewrite itself orphaned.
        unread = {n for n in gm.graph.nodes if not n.users}
        # Matches are collected before any rewrite so a pass never sees its own output.
        matches = list(p.match(gm, ctx))
        for m in matches:
            site = node_site(m.anchor)
            if any(n.graph is not gm.graph or _erased(n) for n in m.nodes):
                # An earlier rewrite in this pass consumed part of this match.
                continue
            try:
                p.check(gm, m, ctx)
            except CantApply as why:
                log.debug("%s refused at %s: %s", p.name, site, why.reason)
                record.refusals.append(Refusal(p.name, site, why.reason, [n.name for n in m.nodes], record.index))
                continue
            replaced = [n.name for n in m.nodes]
            before = set(gm.graph.nodes)
            p.apply(gm, m, ctx)
            created = [n for n in gm.graph.nodes if n not in before]
            for n in created:
                n.meta[PROVENANCE_KEY] = p.name
                _inherit_source(n, m.anchor)
            record.rewrites.append(
                Rewrite(p.name, p.kind_of(m), site, replaced, [n.name for n in created], p.describe(m, ctx), record.index)
            )
            log.debug("%s rewrote %s (%d nodes -> %d nodes)", p.name, site, len(replaced), len(created))
        site = None
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: n in unread or _keep_impure(n))
        gm.graph.lint()
        gm.recompile()
    except Exception as exc:
        raise PassError(p.name, site, exc) from exc


def _keep_impure(node: fx.Node) -> bool:
    # Nodes with side effects stay even when a rewrite orphaned them: what torch.fx knows
    # to be impure (RNG, asserts, mutating ops by schema) and in-place writes, which fx does
    # not flag (``Node.is_impure`` is False for every ``call_method``).
    return writes_in_place(node) or node.is_impure()


def _erased(node: fx.Node) -> bool:
    return getattr(node, "_erased", False)


def _inherit_source(node: fx.Node, anchor: fx.Node) -> None:
    # New nodes keep the user's source location and module path, so reports, drawings and
    # Inductor's own provenance still point at the model code that produced them.
    # The checkpoint region too: what a rewrite inside a region creates belongs to it.
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack", REGION_KEY):
        if key not in node.meta and key in anchor.meta:
            node.meta[key] = anchor.meta[key]

"""What the compiler did to a model: every rewrite and every refusal, with where and why.

A :class:`RewriteReport` covers one compilation of a model or function. Dynamo may cut a
program into several graphs (graph breaks); the report keeps one :class:`GraphRecord` per
graph, each with a snapshot of the graph before and after our passes (for drawing) and the
records the passes left.

The snapshots (:class:`GraphSnapshot`) are plain data: node names, ops, readable targets,
inputs, source sites and provenance, with higher-order-op bodies (scan bodies, ...) nested.
They hold no tensors, so a report can be kept, printed, turned into JSON and drawn long after
the compiled graph is gone.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx

from longctx_compiler.dynamo_names import module_path

__all__ = [
    "Rewrite",
    "Refusal",
    "NodeInfo",
    "GraphSnapshot",
    "GraphRecord",
    "RewriteReport",
    "node_site",
    "snapshot",
    "PROVENANCE_KEY",
]

#: ``node.meta`` key naming the pass that created a node.
PROVENANCE_KEY = "longctx_pass"


@dataclass
class Rewrite:
    """One applied rewrite.

    Attributes:
        pass_name: the pass that did it.
        kind: what was rewritten into what, e.g. ``"sdpa -> chunked_attention"``.
        site: readable location, ``"model.layers.0.self_attn (modeling_llama.py:123)"``.
        nodes_replaced: names of graph nodes that the rewrite removed.
        nodes_added: names of graph nodes it created.
        details: pass-specific facts (chunk size, offload, mode, ...).
        graph_index: which graph of the compilation (see :class:`RewriteReport`).
    """

    pass_name: str
    kind: str
    site: str
    nodes_replaced: list[str]
    nodes_added: list[str]
    details: dict[str, Any] = field(default_factory=dict)
    graph_index: int = 0


@dataclass
class Refusal:
    """A match a pass did not rewrite, and the reason (the graph was left as it was)."""

    pass_name: str
    site: str
    reason: str
    nodes: list[str] = field(default_factory=list)
    graph_index: int = 0


@dataclass
class NodeInfo:
    """One FX node, as data."""

    name: str
    op: str
    target: str
    inputs: list[str]
    module_path: str
    source: str
    pass_name: str | None
    shape: str
    subgraph: "GraphSnapshot | None" = None


@dataclass
class GraphSnapshot:
    """The nodes of an FX graph in order, as data (see :func:`snapshot`)."""

    nodes: list[NodeInfo]

    def node(self, name: str) -> NodeInfo:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


@dataclass
class GraphRecord:
    """One graph of a compilation: before/after snapshots and what the passes left."""

    index: int
    before: GraphSnapshot
    after: GraphSnapshot | None = None
    rewrites: list[Rewrite] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    #: set when a pass failed and the graph was compiled without our rewrites
    fallback_reason: str | None = None


class RewriteReport:
    """Everything our passes did during one compilation.

    ``print(report)`` shows a table; :meth:`to_json` gives a dict with ``"rewrites"`` and
    ``"refusals"``; :func:`longctx_compiler.viz.render` draws it.
    """

    def __init__(self) -> None:
        self.graphs: list[GraphRecord] = []

    # -- building (used by the backend) ------------------------------------------------
    def new_graph(self, gm: fx.GraphModule) -> GraphRecord:
        rec = GraphRecord(index=len(self.graphs), before=snapshot(gm))
        self.graphs.append(rec)
        return rec

    # -- reading -----------------------------------------------------------------------
    @property
    def rewrites(self) -> list[Rewrite]:
        return [r for g in self.graphs for r in g.rewrites]

    @property
    def refusals(self) -> list[Refusal]:
        return [r for g in self.graphs for r in g.refusals]

    @property
    def fallbacks(self) -> list[str]:
        return [g.fallback_reason for g in self.graphs if g.fallback_reason]

    def count(self, pass_name: str | None = None, kind: str | None = None) -> int:
        """How many rewrites fired (optionally of one pass and/or one kind)."""
        return sum(1 for r in self.rewrites if (pass_name is None or r.pass_name == pass_name) and (kind is None or r.kind == kind))

    def to_json(self) -> dict[str, Any]:
        def rw(r: Rewrite) -> dict[str, Any]:
            return {
                "pass": r.pass_name,
                "kind": r.kind,
                "site": r.site,
                "nodes_replaced": list(r.nodes_replaced),
                "nodes_added": list(r.nodes_added),
                "details": _jsonable(r.details),
                "graph": r.graph_index,
            }

        def rf(r: Refusal) -> dict[str, Any]:
            return {"pass": r.pass_name, "site": r.site, "reason": r.reason, "nodes": list(r.nodes), "graph": r.graph_index}

        return {
            "graphs": len(self.graphs),
            "rewrites": [rw(r) for r in self.rewrites],
            "refusals": [rf(r) for r in self.refusals],
            "fallbacks": self.fallbacks,
        }

    def __str__(self) -> str:
        return format_table(self)

    def __repr__(self) -> str:
        return f"RewriteReport(graphs={len(self.graphs)}, rewrites={len(self.rewrites)}, refusals={len(self.refusals)}, fallbacks={len(self.fallbacks)})"


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return str(value)


def format_table(report: RewriteReport) -> str:
    """The report as a text table (what ``print(report)`` shows).

    Columns: pass, site, nodes removed/added, and what happened last, so that a refusal's
    reason is printed in full rather than clipped to a column.
    """
    lines = [f"longctx_compiler rewrite report: {len(report.graphs)} graph(s), {len(report.rewrites)} rewrite(s), {len(report.refusals)} refusal(s)"]
    rows = [("pass", "site", "nodes", "what")]
    for r in report.rewrites:
        # A rewrite more precise than the original (a lossy cast it does not reproduce) says so,
        # and one that changes what the model returns (logits None in training).
        notes = [r.details[k] for k in ("precision", "logits") if isinstance(r.details, dict) and r.details.get(k)]
        note = "; ".join(notes)
        rows.append((r.pass_name, r.site, f"-{len(r.nodes_replaced)} +{len(r.nodes_added)}", f"{r.kind} [{note}]" if note else r.kind))
    for r in report.refusals:
        rows.append((r.pass_name, r.site, "", f"REFUSED: {r.reason}"))
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for i, row in enumerate(rows):
            lines.append("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[3]]).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in [*widths, max(len(r[3]) for r in rows)]))
    else:
        lines.append("(nothing matched: the graphs were compiled unchanged)")
    for reason in report.fallbacks:
        lines.append(f"FALLBACK: a graph was compiled without rewrites: {reason}")
    return "\n".join(lines)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def node_site(node: fx.Node) -> str:
    """A readable location of a node: module path and the user's source line."""
    module_path = _module_path(node)
    source = _source_line(node)
    if module_path and source:
        return f"{module_path} ({source})"
    return module_path or source or node.name


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    # Values are (source spelling of the module, type, ...); the last entry is the innermost.
    entry = list(stack.values())[-1]
    source = entry[0] if isinstance(entry, (tuple, list)) else entry
    return module_path(str(source)) or "<root>"


def _source_line(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    if not frames:
        return ""
    filename, line, _func = frames[-1]
    return f"{filename.rsplit('/', 1)[-1]}:{line}"


def _target_name(node: fx.Node) -> str:
    t = node.target
    if node.op in ("placeholder", "output", "get_attr"):
        return str(t)
    if node.op == "call_method":
        return f".{t}()"
    if isinstance(t, torch._ops.OpOverload) or isinstance(t, torch._ops.OpOverloadPacket):
        return str(t)
    if isinstance(t, torch._ops.HigherOrderOperator):
        return f"higher_order.{t.name()}"
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch"):
        return f"torch.{name}" if not mod.startswith("torch._C") else f"{mod.replace('torch._C._', 'torch.')}.{name}"
    return f"{mod}.{name}" if mod else name


def _shape_of(node: fx.Node) -> str:
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, torch.Tensor):
        return f"{str(val.dtype).replace('torch.', '')}[{', '.join(str(s) for s in val.shape)}]"
    return ""


def snapshot(gm: fx.GraphModule) -> GraphSnapshot:
    """Copy a graph's structure into plain data (higher-order-op bodies nested)."""
    nodes = []
    for n in gm.graph.nodes:
        sub = None
        if n.op == "get_attr":
            attr = _resolve_attr(gm, str(n.target))
            if isinstance(attr, fx.GraphModule):
                sub = snapshot(attr)
        nodes.append(
            NodeInfo(
                name=n.name,
                op=n.op,
                target=_target_name(n),
                inputs=[a.name for a in n.all_input_nodes],
                module_path=_module_path(n),
                source=_source_line(n),
                pass_name=n.meta.get(PROVENANCE_KEY),
                shape=_shape_of(n),
                subgraph=sub,
            )
        )
    return GraphSnapshot(nodes)


def _resolve_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def snapshot_to_dict(s: GraphSnapshot) -> dict[str, Any]:
    """JSON-able form of a snapshot."""
    return {"nodes": [{**{k: v for k, v in dataclasses.asdict(n).items() if k != "subgraph"}, "subgraph": snapshot_to_dict(n.subgraph) if n.subgraph else None} for n in s.nodes]}


def iter_nodes(s: GraphSnapshot) -> Iterable[NodeInfo]:
    """All nodes of a snapshot, nested bodies included."""
    for n in s.nodes:
        yield n
        if n.subgraph is not None:
            yield from iter_nodes(n.subgraph)

"""Drawings of what the compiler did: before/after graphs with rewritten regions highlighted.

The drawing of a :class:`~longctx_compiler.report.RewriteReport` has, for every graph of the
compilation, two clusters side by side:

* **before** — the graph Dynamo gave us. Nodes a rewrite removed
  (:attr:`Rewrite.nodes_replaced`) are filled with the colour of the pass that removed them.
* **after** — the graph after our passes. Nodes a pass created (:attr:`Rewrite.nodes_added`,
  or carrying provenance :attr:`NodeInfo.pass_name`) are filled with that pass's colour, with
  a bold outline.

Each rewrite's nodes sit in a sub-cluster labelled ``pass: kind`` and the site. Refusals are
drawn as dashed outlines in a dashed sub-cluster whose label gives the reason. A legend maps
colours to passes and shows the node styles. Bodies of higher-order ops (``NodeInfo.subgraph``
on ``get_attr`` nodes, e.g. scan bodies) are nested clusters linked to the op that runs them.

Real models have hundreds of nodes, so the default view is *focused*: it draws the rewritten
and refused nodes, their unchanged neighbours up to ``context`` hops away (in either
direction), and folds every run of other nodes (consecutive in program order) into one
``… N nodes`` box. With ``collapse_repeats`` rewrites whose sites differ only by a layer index
(``model.layers.0.self_attn`` / ``model.layers.1.self_attn``) are drawn once, labelled
``×N layers``; the repeats fold into the ``…`` boxes. ``context=None`` draws every node.

DOT text needs no binary; :func:`render` also writes SVG/PNG when the Graphviz ``dot``
program is installed, and only warns when it is not.
"""

from __future__ import annotations

import logging
import pathlib
import re
import shutil
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import graphviz

from longctx_compiler.dynamo_names import readable_input_name
from longctx_compiler.report import GraphRecord, GraphSnapshot, NodeInfo, Refusal, Rewrite, RewriteReport

__all__ = ["to_dot", "render", "draw_graph", "escape_label"]

logger = logging.getLogger("longctx_compiler")

# Fill colours for passes, in order of first appearance (ColorBrewer Set3/Pastel, readable
# with black text); outlines use the darker companion.
_PALETTE = [
    ("#8dd3c7", "#1b7f70"),
    ("#fdb462", "#b35806"),
    ("#bebada", "#54278f"),
    ("#fb8072", "#a50f15"),
    ("#80b1d3", "#08519c"),
    ("#b3de69", "#4d9221"),
    ("#fccde5", "#ae017e"),
    ("#ffed6f", "#8c6d00"),
    ("#bc80bd", "#49006a"),
    ("#ccebc5", "#238b45"),
]
_CONTEXT_FILL, _CONTEXT_LINE, _CONTEXT_FONT = "#f4f4f4", "#9a9a9a", "#555555"
_REFUSED_LINE = "#c0392b"
_FONT = "Helvetica"

#: graphs with nothing to highlight are drawn whole up to this many nodes, else folded.
_SMALL_GRAPH = 40
#: longest site / target text kept in a node label before it is clipped.
_MAX_LABEL = 48

_FORMATS = ("svg", "png", "pdf")


# ------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------


def escape_label(text: str) -> str:
    """Make ``text`` literal in a DOT label (a graphviz escString, never an HTML label).

    Backslashes are doubled (so ``\\n`` in a target stays two characters instead of a line
    break), double quotes are backslash-escaped, and the result is marked as not-HTML so a
    label like ``<lambda>`` is quoted rather than read as an HTML-like label. ``{``, ``|``,
    ``<`` and ``>`` are special only in ``record`` shapes, which this module does not use;
    inside a quoted string they are ordinary characters.
    """
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _label(*lines: str) -> str:
    # Lines are joined with the DOT line break ``\n`` *after* escaping each, so a backslash
    # in a line can never combine with our separator.
    return graphviz.nohtml("\\n".join(escape_label(line) for line in lines if line))


def _clip(text: str, width: int = _MAX_LABEL) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _short_target(n: NodeInfo) -> str:
    if n.op == "placeholder":
        return "input" if n.target == n.name else f"input {n.target}"
    if n.op == "output":
        return "output"
    if n.op == "get_attr":
        return "attr" if n.target == n.name else f"attr {n.target}"
    t = n.target
    if n.op == "call_method":
        return t
    # "torch.nn.functional.scaled_dot_product_attention" -> "scaled_dot_product_attention";
    # "aten.mm.default" -> "mm"; "higher_order.scan" -> "scan".
    parts = [p for p in re.split(r"[.:]+", t) if p]
    if parts and parts[-1] == "default" and len(parts) > 1:
        parts = parts[:-1]
    return parts[-1] if parts else t


def _display_name(n: NodeInfo) -> str:
    # Graph inputs carry Dynamo's spelling of where they came from
    # (l_args_0_modules_model_..._parameters_weight_); show the attribute path instead.
    return readable_input_name(n.name) if n.op == "placeholder" else n.name


def _node_lines(n: NodeInfo) -> list[str]:
    if n.op == "placeholder":
        return [_clip(f"input {_display_name(n)}"), *([_clip(n.shape)] if n.shape else [])]
    lines = [_clip(f"{n.name}: {_short_target(n)}" if _short_target(n) != n.name else n.name)]
    if n.shape:
        lines.append(_clip(n.shape))
    site = n.module_path or n.source
    if site and n.op not in ("placeholder", "output"):
        lines.append(_clip(site))
    return lines


# ------------------------------------------------------------------------------------------
# what to draw
# ------------------------------------------------------------------------------------------

_LAYER_INDEX = re.compile(r"\.(\d+)(?=[.\s(]|$)")


def _repeat_key(site: str) -> str:
    """A site with its layer indices wildcarded: ``layers.3.attn`` → ``layers.*.attn``."""
    return _LAYER_INDEX.sub(".*", site)


@dataclass
class _Group:
    """Rewrites (or refusals) drawn as one sub-cluster: the first is drawn, the rest counted."""

    kind: str  # "rewrite" | "refusal" | "provenance"
    pass_name: str
    title: str
    site: str
    members: list[Rewrite | Refusal | None] = field(default_factory=list)
    #: names of the drawn member's nodes, per side
    before_nodes: list[str] = field(default_factory=list)
    after_nodes: list[str] = field(default_factory=list)
    #: names of the repeats' nodes (not drawn; folded into "…" boxes)
    hidden: set[str] = field(default_factory=set)

    def label(self) -> str:
        n = len(self.members)
        head = f"{self.pass_name}: {self.title}" if self.kind != "refusal" else f"{self.pass_name} refused: {self.title}"
        if n > 1:
            head += f"  ×{n} layers"
        site = _repeat_key(self.site) if n > 1 else self.site
        return _label(_clip(head, 90), _clip(site, 90))


def _groups(rec: GraphRecord, collapse: bool) -> list[_Group]:
    groups: list[_Group] = []
    by_key: dict[tuple[str, ...], _Group] = {}

    def add(kind: str, pass_name: str, title: str, site: str, member, before: Sequence[str], after: Sequence[str]) -> None:
        key = (kind, pass_name, title, _repeat_key(site)) if collapse else (kind, str(len(groups)))
        g = by_key.get(key)
        if g is None:
            g = _Group(kind, pass_name, title, site, [member], list(before), list(after))
            by_key[key] = g
            groups.append(g)
        else:
            g.members.append(member)
            g.hidden.update(before)
            g.hidden.update(after)

    for r in rec.rewrites:
        add("rewrite", r.pass_name, r.kind, r.site, r, r.nodes_replaced, r.nodes_added)
    for r in rec.refusals:
        # A refused match leaves the graph as it was: its nodes exist on both sides.
        add("refusal", r.pass_name, r.reason, r.site, r, r.nodes, r.nodes)

    # Nodes carrying provenance that no rewrite claims (a pass that added helper nodes
    # without listing them) still deserve their pass's colour: one group per pass.
    if rec.after is not None:
        claimed = {n for r in rec.rewrites for n in r.nodes_added}
        stray: dict[str, list[str]] = {}
        for n in rec.after.nodes:
            if n.pass_name and n.name not in claimed:
                stray.setdefault(n.pass_name, []).append(n.name)
        for pass_name, names in stray.items():
            groups.append(_Group("provenance", pass_name, "nodes without a rewrite record", "", [None], [], names))
    return groups


def _neighbourhood(snap: GraphSnapshot, focus: set[str], context: int | None) -> set[str]:
    """Names to draw: ``focus`` plus nodes within ``context`` hops (inputs or users)."""
    names = [n.name for n in snap.nodes]
    if context is None or (not focus and len(names) <= _SMALL_GRAPH):
        return set(names)
    adj: dict[str, set[str]] = {n.name: set() for n in snap.nodes}
    for n in snap.nodes:
        for i in n.inputs:
            if i in adj:
                adj[n.name].add(i)
                adj[i].add(n.name)
    drawn = {f for f in focus if f in adj}
    frontier = deque((f, 0) for f in drawn)
    while frontier:
        name, d = frontier.popleft()
        if d == context:
            continue
        for m in adj[name]:
            if m not in drawn:
                drawn.add(m)
                frontier.append((m, d + 1))
    # A drawn higher-order op is unreadable without its body: always draw the get_attr
    # nodes that carry the bodies it runs.
    by_name = {n.name: n for n in snap.nodes}
    for name in list(drawn):
        for i in by_name[name].inputs:
            if i in by_name and by_name[i].subgraph is not None:
                drawn.add(i)
    return drawn


# ------------------------------------------------------------------------------------------
# the drawer
# ------------------------------------------------------------------------------------------


class _Drawer:
    """Builds one DOT digraph; hands out unique node ids and pass colours."""

    def __init__(self, name: str) -> None:
        self.dot = graphviz.Digraph(name=name)
        self.dot.attr(rankdir="TB", compound="true", fontname=_FONT, newrank="true")
        self.dot.attr("node", shape="box", fontname=_FONT, fontsize="10", style="rounded", margin="0.08,0.04")
        self.dot.attr("edge", color="#777777", arrowsize="0.6")
        self.colours: dict[str, tuple[str, str]] = {}
        self.node_count = 0
        self._ids = 0

    def colour(self, pass_name: str) -> tuple[str, str]:
        if pass_name not in self.colours:
            self.colours[pass_name] = _PALETTE[len(self.colours) % len(_PALETTE)]
        return self.colours[pass_name]

    def new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}_{self._ids}"

    def node(self, g: graphviz.Digraph, node_id: str, label: str, **attrs: str) -> None:
        self.node_count += 1
        g.node(node_id, label=label, **attrs)

    # -- one graph side ------------------------------------------------------------------
    def draw_side(
        self,
        parent: graphviz.Digraph,
        prefix: str,
        snap: GraphSnapshot,
        *,
        drawn: set[str],
        styles: Mapping[str, dict[str, str]],
        clusters: Sequence[tuple[str, str, dict[str, str], Sequence[str]]] = (),
    ) -> dict[str, str]:
        """Draw the nodes of ``snap`` named in ``drawn`` into ``parent``; fold the rest.

        Args:
            prefix: unique id prefix for this side (ids are ``prefix_<n>``).
            styles: node name → extra node attributes (highlight styles).
            clusters: ``(cluster name, label, attrs, node names)`` sub-clusters to put drawn
                nodes in (a node goes into the first cluster that lists it).
        Returns:
            node name → DOT id (folded nodes map to their ``…`` box).
        """
        ids: dict[str, str] = {}
        by_name = {n.name: n for n in snap.nodes}
        home: dict[str, graphviz.Digraph] = {}
        subs: list[tuple[graphviz.Digraph, str]] = []
        for cname, clabel, cattrs, members in clusters:
            members = [m for m in members if m in drawn and m in by_name and m not in home]
            if not members:
                continue
            sub = graphviz.Digraph(name=f"cluster_{prefix}_{cname}")
            sub.attr(label=clabel, fontname=_FONT, fontsize="10", labeljust="l", **cattrs)
            for m in members:
                home[m] = sub
            subs.append((sub, cname))

        # Nodes in program order; runs of undrawn nodes become one "…" box each.
        run: list[NodeInfo] = []

        def flush() -> None:
            if not run:
                return
            box = self.new_id(f"{prefix}_elided")
            self.node(parent, box, _label(f"… {len(run)} node{'s' if len(run) != 1 else ''}"), shape="note", style="dashed", color=_CONTEXT_LINE, fontcolor=_CONTEXT_FONT)
            for n in run:
                ids[n.name] = box
            run.clear()

        bodies: list[NodeInfo] = []
        for n in snap.nodes:
            if n.name not in drawn:
                run.append(n)
                continue
            flush()
            nid = self.new_id(prefix)
            ids[n.name] = nid
            attrs = dict(styles.get(n.name) or {"style": "rounded,filled", "fillcolor": _CONTEXT_FILL, "color": _CONTEXT_LINE, "fontcolor": _CONTEXT_FONT})
            self.node(home.get(n.name, parent), nid, _label(*_node_lines(n)), **attrs)
            if n.subgraph is not None:
                bodies.append(n)
        flush()
        for sub, _ in subs:
            parent.subgraph(sub)

        # Edges, deduplicated: folded nodes collapse onto their box, and a box's internal
        # edges are not drawn.
        seen: set[tuple[str, str]] = set()
        for n in snap.nodes:
            dst = ids[n.name]
            for i in n.inputs:
                src = ids.get(i)
                if src is None or src == dst or (src, dst) in seen:
                    continue
                seen.add((src, dst))
                parent.edge(src, dst)

        for n in bodies:
            self.draw_body(parent, f"{prefix}_{ids[n.name].rsplit('_', 1)[1]}", n, ids[n.name], [ids[u.name] for u in snap.nodes if n.name in u.inputs and u.name in drawn])
        return ids

    def draw_body(self, parent: graphviz.Digraph, prefix: str, holder: NodeInfo, holder_id: str, users: list[str]) -> None:
        """Nest a higher-order op's body as a cluster, linked to the op(s) that run it."""
        assert holder.subgraph is not None
        sub = graphviz.Digraph(name=f"cluster_{prefix}_body")
        sub.attr(label=_label(f"body {holder.target}"), style="rounded,dotted", color="#555555", fontname=_FONT, fontsize="10", labeljust="l")
        body = holder.subgraph
        drawn = _neighbourhood(body, set(), None if len(body.nodes) <= _SMALL_GRAPH else 0)
        ids = self.draw_side(sub, prefix, body, drawn=drawn, styles={})
        parent.subgraph(sub)
        anchor = next(iter(ids.values()), None)
        if anchor is None:
            return
        cluster = f"cluster_{prefix}_body"
        # The attribute node holds the body; the HOP node runs it. Edges to/from the cluster
        # border (lhead/ltail, needs compound=true) show the nesting without clutter.
        parent.edge(holder_id, anchor, lhead=cluster, style="dotted", arrowhead="none", color="#555555")
        for u in users:
            parent.edge(anchor, u, ltail=cluster, style="dotted", color="#555555", label=_label("runs"), fontsize="8")

    # -- legend -------------------------------------------------------------------------
    def legend(self, with_styles: bool = True) -> None:
        leg = graphviz.Digraph(name="cluster_legend")
        leg.attr(label="legend", fontname=_FONT, fontsize="11", style="rounded", color="#bbbbbb")
        prev = None
        items: list[tuple[str, dict[str, str]]] = []
        for pass_name, (fill, line) in self.colours.items():
            items.append((f"pass {pass_name}", {"style": "rounded,filled", "fillcolor": fill, "color": line}))
        if with_styles:
            items += [
                ("replaced (before): pass colour", {"style": "rounded,filled", "fillcolor": "#ffffff", "color": "#333333"}),
                ("added (after): pass colour, bold", {"style": "rounded,filled,bold", "fillcolor": "#ffffff", "color": "#333333", "penwidth": "2.5"}),
                ("unchanged context", {"style": "rounded,filled", "fillcolor": _CONTEXT_FILL, "color": _CONTEXT_LINE, "fontcolor": _CONTEXT_FONT}),
                ("… folded nodes", {"shape": "note", "style": "dashed", "color": _CONTEXT_LINE, "fontcolor": _CONTEXT_FONT}),
                ("refused (reason on its cluster)", {"style": "rounded,dashed", "color": _REFUSED_LINE, "penwidth": "2"}),
            ]
        for text, attrs in items:
            nid = self.new_id("legend")
            leg.node(nid, label=_label(text), **attrs)
            # Invisible edges stack the legend entries vertically.
            if prev is not None:
                leg.edge(prev, nid, style="invis")
            prev = nid
        self.dot.subgraph(leg)


def _styles_for(groups: list[_Group], drawer: _Drawer, side: str) -> dict[str, dict[str, str]]:
    styles: dict[str, dict[str, str]] = {}
    for g in groups:
        fill, line = drawer.colour(g.pass_name)
        names = g.before_nodes if side == "before" else g.after_nodes
        for name in names:
            if name in styles:
                continue
            if g.kind == "refusal":
                styles[name] = {"style": "rounded,dashed", "color": line, "penwidth": "2"}
            elif side == "before":
                styles[name] = {"style": "rounded,filled", "fillcolor": fill, "color": line}
            else:
                styles[name] = {"style": "rounded,filled,bold", "fillcolor": fill, "color": line, "penwidth": "2.5"}
    return styles


def _clusters_for(groups: list[_Group], drawer: _Drawer, side: str) -> list[tuple[str, str, dict[str, str], Sequence[str]]]:
    out = []
    for k, g in enumerate(groups):
        names = g.before_nodes if side == "before" else g.after_nodes
        if not names:
            continue
        fill, line = drawer.colour(g.pass_name)
        if g.kind == "refusal":
            attrs = {"style": "rounded,dashed", "color": _REFUSED_LINE, "fontcolor": _REFUSED_LINE}
        else:
            attrs = {"style": "rounded", "color": line, "fontcolor": line}
        out.append((f"{g.kind}{k}", g.label(), attrs, names))
    return out


def _draw_record(drawer: _Drawer, rec: GraphRecord, context: int | None, collapse: bool) -> None:
    groups = _groups(rec, collapse)
    # Nodes of repeats of a drawn group: folded even where they neighbour a drawn node.
    hidden = set().union(*(g.hidden for g in groups)) if groups else set()
    focus_before = {n for g in groups for n in g.before_nodes} - hidden
    focus_after = {n for g in groups for n in g.after_nodes} - hidden

    outer = graphviz.Digraph(name=f"cluster_g{rec.index}")
    title = f"graph {rec.index}: {len(rec.rewrites)} rewrite(s), {len(rec.refusals)} refusal(s)"
    lines = [title]
    if rec.fallback_reason:
        lines.append(_clip(f"FALLBACK: compiled without rewrites: {rec.fallback_reason}", 120))
    outer.attr(label=_label(*lines), fontname=_FONT, fontsize="12", style="rounded", color="#888888")

    sides: list[tuple[str, GraphSnapshot | None, set[str]]] = [("before", rec.before, focus_before), ("after", rec.after, focus_after)]
    firsts: list[str] = []
    for side, snap, focus in sides:
        sub = graphviz.Digraph(name=f"cluster_g{rec.index}_{side}")
        sub.attr(label=side if side == "before" else "after (our passes)", fontname=_FONT, fontsize="11", style="rounded", color="#bbbbbb")
        if snap is None:
            nid = drawer.new_id(f"g{rec.index}_{side}_none")
            drawer.node(sub, nid, _label("not recorded"), shape="plaintext")
            firsts.append(nid)
        else:
            drawn = _neighbourhood(snap, focus, context) - hidden
            ids = drawer.draw_side(
                sub,
                f"g{rec.index}{side[0]}",
                snap,
                drawn=drawn,
                styles=_styles_for(groups, drawer, side),
                clusters=_clusters_for(groups, drawer, side),
            )
            if snap.nodes:
                firsts.append(ids[snap.nodes[0].name])
        outer.subgraph(sub)
    if len(firsts) == 2:
        # Left to right: "before" then "after". dot orders disconnected clusters as it likes;
        # an invisible edge between their first nodes fixes the order (at the cost of starting
        # "after" one rank lower). rank=same would pull the nodes out of their clusters.
        outer.edge(firsts[0], firsts[1], style="invis")
    drawer.dot.subgraph(outer)


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------


def _check_context(context: int | None) -> None:
    if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 0):
        raise ValueError(f"context must be a number of hops >= 0, or None to draw every node; got {context!r}")


def _build(report: RewriteReport, graph_index: int | None, context: int | None, collapse_repeats: bool) -> _Drawer:
    if not isinstance(report, RewriteReport):
        raise TypeError(f"expected a RewriteReport (e.g. from longctx_compiler.explain), got {type(report).__name__}")
    _check_context(context)
    records = report.graphs
    if graph_index is not None:
        indices = [g.index for g in report.graphs]
        if graph_index not in indices:
            raise ValueError(f"graph_index {graph_index} is not in this report (it has graphs {indices})")
        records = [g for g in report.graphs if g.index == graph_index]
    drawer = _Drawer("rewrite_report")
    if not records:
        drawer.node(drawer.dot, "empty", _label("empty report: no graph was compiled"), shape="plaintext")
    for rec in records:
        _draw_record(drawer, rec, context, collapse_repeats)
    drawer.legend()
    return drawer


def to_dot(report: RewriteReport, *, graph_index: int | None = None, context: int | None = 2, collapse_repeats: bool = True) -> str:
    """The report as DOT text: before/after clusters per graph, highlights, a legend.

    Args:
        report: what the compiler did (:class:`~longctx_compiler.report.RewriteReport`).
        graph_index: draw only this graph of the compilation (default: all of them).
        context: how many hops of unchanged neighbours to draw around rewritten/refused
            nodes; everything further away folds into ``… N nodes`` boxes. ``None`` draws
            every node.
        collapse_repeats: draw rewrites/refusals whose sites differ only by a layer index
            once, labelled ``×N layers``.
    Raises:
        TypeError: ``report`` is not a RewriteReport.
        ValueError: unknown ``graph_index`` or a negative ``context``.
    """
    return _build(report, graph_index, context, collapse_repeats).dot.source


def render(
    report: RewriteReport,
    path: str | pathlib.Path,
    *,
    format: str = "svg",
    context: int | None = 2,
    collapse_repeats: bool = True,
) -> list[pathlib.Path]:
    """Write the drawing of ``report``: ``<path>.dot`` always, ``<path>.<format>`` if possible.

    ``path`` is a file stem; a trailing ``.dot``/``.svg``/``.png``/``.pdf`` is dropped. The image
    needs the Graphviz ``dot`` program; without it (or if it fails) a warning is logged and
    only the DOT file is written — this never raises for a missing binary.

    Returns:
        the files written, DOT first.
    """
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {', '.join(_FORMATS)}, got {format!r}")
    stem = pathlib.Path(path)
    if stem.suffix in (".dot", *(f".{f}" for f in _FORMATS)):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    source = to_dot(report, context=context, collapse_repeats=collapse_repeats)
    dot_path = stem.with_name(stem.name + ".dot")
    dot_path.write_text(source, encoding="utf-8")
    written = [dot_path]
    if shutil.which("dot") is None:
        logger.warning("Graphviz 'dot' program not found: wrote %s only (install the graphviz system package for %s)", dot_path, format.upper())
        return written
    image = stem.with_name(f"{stem.name}.{format}")
    try:
        image.write_bytes(graphviz.Source(source).pipe(format=format))
    except (graphviz.ExecutableNotFound, graphviz.CalledProcessError, OSError) as e:
        logger.warning("Graphviz could not render %s (%s): wrote %s only", image, e, dot_path)
        return written
    written.append(image)
    return written


def draw_graph(snapshot: GraphSnapshot, highlight: Mapping[str, str] | Iterable[str] | None = None, *, name: str = "graph") -> graphviz.Digraph:
    """The whole of one graph (every node, bodies nested), optionally highlighted.

    Args:
        snapshot: a :class:`~longctx_compiler.report.GraphSnapshot` (``report.snapshot(gm)``).
        highlight: node names to fill, either a mapping name → group (e.g. pass name; one
            colour per group, listed in a legend) or an iterable of names (one colour). Names
            not in the graph are ignored.
        name: the DOT graph's name.
    Returns:
        a ``graphviz.Digraph``; ``.source`` is the DOT text, ``.render(...)`` draws it.
    """
    if not isinstance(snapshot, GraphSnapshot):
        raise TypeError(f"expected a GraphSnapshot (longctx_compiler.report.snapshot(gm)), got {type(snapshot).__name__}")
    if highlight is None:
        groups: dict[str, str] = {}
    elif isinstance(highlight, Mapping):
        groups = {str(k): str(v) for k, v in highlight.items()}
    elif isinstance(highlight, str):
        raise TypeError("highlight must be a collection of node names or a mapping name -> group, not one string")
    else:
        groups = {str(k): "highlighted" for k in highlight}
    drawer = _Drawer(name)
    styles = {}
    for node_name, group in groups.items():
        fill, line = drawer.colour(group)
        styles[node_name] = {"style": "rounded,filled", "fillcolor": fill, "color": line}
    drawer.draw_side(drawer.dot, "n", snapshot, drawn={n.name for n in snapshot.nodes}, styles=styles)
    if groups:
        drawer.legend(with_styles=False)
    return drawer.dot

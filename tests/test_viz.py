"""Tests for the report drawings: DOT content, elision, repeat collapse, escaping, rendering."""

from __future__ import annotations

import copy
import logging
import re
import shutil

import graphviz
import pytest
import torch
import torch.fx as fx

from longctx_compiler import viz
from longctx_compiler.report import PROVENANCE_KEY, GraphSnapshot, NodeInfo, Refusal, Rewrite, RewriteReport, node_site, snapshot

HAVE_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAVE_DOT, reason="Graphviz 'dot' program not installed")


def _parses(dot: str) -> str:
    """Run dot on the text (raises on a syntax error); returns the SVG."""
    return graphviz.Source(dot).pipe(format="svg").decode()


def _node_lines(dot: str) -> dict[str, str]:
    """DOT node id → its statement line, for every node statement (legend excluded)."""
    out = {}
    for line in dot.splitlines():
        m = re.match(r"\s*(\w+) \[label=", line)
        if m and not m.group(1).startswith("legend"):
            out[m.group(1)] = line
    return out


def _lines_of(dot: str, name: str) -> list[str]:
    """Node statements whose label starts with the FX node ``name`` (labels are
    ``name: target`` or just ``name`` when the target reads the same, quoted or not)."""
    pat = re.compile(r'label="?' + re.escape(name) + r'(?=[:" ]|\\n)')
    return [line for line in _node_lines(dot).values() if pat.search(line)]


def _line_of(dot: str, name: str) -> str:
    hits = _lines_of(dot, name)
    assert len(hits) == 1, f"{name!r} in {len(hits)} node lines"
    return hits[0]


def _fused_add(x: torch.Tensor) -> torch.Tensor:
    return x + 1


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        y = x @ self.w
        z = y + 1
        return torch.relu(z).sum()


def _small_report() -> tuple[RewriteReport, fx.GraphModule, fx.GraphModule]:
    """``add`` replaced by ``fused_add`` (pass "fuse"), ``relu`` refused by pass "attn"."""
    gm = fx.symbolic_trace(Small())
    report = RewriteReport()
    rec = report.new_graph(gm)
    after = copy.deepcopy(gm)
    add = next(n for n in after.graph.nodes if n.name == "add")
    with after.graph.inserting_after(add):
        new = after.graph.call_function(_fused_add, (add.args[0],))
    new.name = "fused_add"
    new.meta[PROVENANCE_KEY] = "fuse"
    add.replace_all_uses_with(new)
    after.graph.erase_node(add)
    after.recompile()
    rec.after = snapshot(after)
    rec.rewrites.append(Rewrite("fuse", "add -> fused_add", "block (test_viz.py:1)", ["add"], ["fused_add"]))
    rec.refusals.append(Refusal("attn", "block.act", 'mask <unsupported> {a|b} "quoted" back\\slash', nodes=["relu"]))
    return report, gm, after


# ------------------------------------------------------------------------------- content


def test_before_after_clusters_highlights_and_legend():
    report, _, _ = _small_report()
    dot = viz.to_dot(report)
    for cluster in ("cluster_g0 ", "cluster_g0_before", "cluster_g0_after", "cluster_legend", "cluster_g0b_rewrite0", "cluster_g0a_rewrite0"):
        assert f"subgraph {cluster}" in dot
    # One colour per pass: the replaced node (before) and the added node (after) share it.
    replaced = _line_of(dot, "add")
    added = _line_of(dot, "fused_add")
    fill = re.search(r'fillcolor="(#\w+)"', replaced).group(1)
    assert f'fillcolor="{fill}"' in added and "bold" in added and "penwidth=2.5" in added
    # The legend names both passes with their colours.
    assert re.search(r'legend_\d+ \[label="pass fuse" .*fillcolor="' + fill, dot)
    assert 'label="pass attn"' in dot
    # Rewrite sub-cluster label: pass, kind, site.
    assert 'label="fuse: add -> fused_add\\nblock (test_viz.py:1)"' in dot


def test_refusal_dashed_with_escaped_reason():
    report, _, _ = _small_report()
    dot = viz.to_dot(report)
    relu_lines = _lines_of(dot, "relu")
    assert len(relu_lines) == 2  # unchanged, so on both sides
    assert all("dashed" in line for line in relu_lines)
    # Quotes and backslashes escaped; <, {, | are plain characters inside a quoted label.
    assert 'attn refused: mask <unsupported> {a|b} \\"quoted\\" back\\\\slash' in dot
    if HAVE_DOT:
        svg = _parses(dot)
        assert "mask &lt;unsupported&gt; {a|b} &quot;quoted&quot; back\\slash" in svg


def test_escape_label_edge_cases():
    assert viz.escape_label('a"b') == 'a\\"b'
    assert viz.escape_label("a\\") == "a\\\\"
    assert viz.escape_label("\\n") == "\\\\n"
    snap = GraphSnapshot(
        [
            NodeInfo("x", "placeholder", "x", [], "", "", None, "float32[2]"),
            NodeInfo("weird", "call_function", 'ns.<lambda>{a|b}"q"\\', ["x"], "m.<locals>", "f.py:1", None, ""),
            NodeInfo("html", "call_method", "<b>bold</b>", ["weird"], "", "", None, ""),
            NodeInfo("output", "output", "output", ["html"], "", "", None, ""),
        ]
    )
    dot = viz.draw_graph(snap, highlight=["weird"]).source
    # Never an HTML label: labels are always quoted strings.
    assert "label=<" not in dot
    assert 'weird: <lambda>{a|b}\\"q\\"\\\\' in dot
    if HAVE_DOT:
        svg = _parses(dot)
        assert "&lt;b&gt;bold&lt;/b&gt;" in svg


def _chain(n: int):
    def f(x):
        for _ in range(n):
            x = torch.sin(x)
        return x

    return fx.symbolic_trace(f)


def test_elision_folds_far_nodes_into_counted_boxes():
    gm = _chain(30)
    names = [n.name for n in gm.graph.nodes]  # x, sin, sin_1, ..., sin_29, output
    target = names[15]
    report = RewriteReport()
    rec = report.new_graph(gm)
    rec.after = snapshot(gm)
    rec.rewrites.append(Rewrite("p", "sin -> sin2", "s", [target], [target]))
    dot = viz.to_dot(report, context=1)
    before = dot.split("subgraph cluster_g0_after")[0]
    # Drawn: names[14..16]; folded: names[0..13] (14 nodes) and names[17..31] (15 nodes).
    assert "… 14 nodes" in before and "… 15 nodes" in before
    drawn = [line for i, line in _node_lines(before).items() if i.startswith("g0b_") and "elided" not in i]
    assert len(drawn) == 3
    # Wider context draws more; context=None draws every node and folds nothing.
    assert "… 12 nodes" in viz.to_dot(report, context=3)
    full = viz.to_dot(report, context=None)
    assert "…" not in full.split("subgraph cluster_legend")[0]
    if HAVE_DOT:
        _parses(dot)


def test_graph_without_rewrites_is_folded_when_large():
    gm = _chain(60)
    report = RewriteReport()
    report.new_graph(gm).after = snapshot(gm)
    dot = viz.to_dot(report)
    assert "… 62 nodes" in dot
    assert len([i for i in _node_lines(dot) if "elided" not in i]) == 0


def test_repeated_layers_collapse_into_one_group():
    gm = _chain(12)
    names = [n.name for n in gm.graph.nodes]
    report = RewriteReport()
    rec = report.new_graph(gm)
    rec.after = snapshot(gm)
    for layer, idx in ((0, 3), (1, 9)):
        site = f"model.layers.{layer}.mlp (modeling.py:42)"
        rec.rewrites.append(Rewrite("tile_mlp", "mlp -> tiled_mlp", site, [names[idx]], [names[idx]]))
    dot = viz.to_dot(report, context=1)
    assert dot.count("×2 layers") == 2  # once per side
    assert "model.layers.*.mlp (modeling.py:42)" in dot
    assert len(_lines_of(dot, names[3])) == 2 and not _lines_of(dot, names[9])
    apart = viz.to_dot(report, context=1, collapse_repeats=False)
    assert "×2" not in apart and len(_lines_of(apart, names[9])) == 2
    assert apart.count("subgraph cluster_g0b_rewrite") == 2


def test_graph_index_and_fallback():
    report, gm, _ = _small_report()
    rec1 = report.new_graph(gm)
    rec1.fallback_reason = "boom"
    dot_all = viz.to_dot(report)
    assert "subgraph cluster_g0 " in dot_all and "subgraph cluster_g1 " in dot_all
    dot1 = viz.to_dot(report, graph_index=1)
    assert "cluster_g0 " not in dot1 and "FALLBACK: compiled without rewrites: boom" in dot1
    assert 'label="not recorded"' in dot1  # rec1 has no after snapshot
    if HAVE_DOT:
        _parses(dot_all)


def test_bad_arguments():
    report, _, _ = _small_report()
    with pytest.raises(TypeError, match="RewriteReport"):
        viz.to_dot(object())
    with pytest.raises(ValueError, match="graph_index 7"):
        viz.to_dot(report, graph_index=7)
    with pytest.raises(ValueError, match="context"):
        viz.to_dot(report, context=-1)
    with pytest.raises(ValueError, match="format"):
        viz.render(report, "x", format="gif")
    with pytest.raises(TypeError, match="GraphSnapshot"):
        viz.draw_graph(report)
    with pytest.raises(TypeError, match="one string"):
        viz.draw_graph(report.graphs[0].before, highlight="add")
    assert "empty report" in viz.to_dot(RewriteReport())


# ---------------------------------------------------------------------------- scan bodies


def _capture_scan() -> fx.GraphModule:
    from torch._higher_order_ops.scan import scan

    gms: list[fx.GraphModule] = []

    def backend(gm, example_inputs):
        gms.append(gm)
        return gm.forward

    def f(a, b):
        def combine(h, x):
            h2 = h * x[0] + x[1]
            return h2.clone(), h2.clone()

        return scan(combine, torch.zeros_like(a[0]), (a, b))

    torch.compile(f, fullgraph=True, backend=backend)(torch.randn(5, 3), torch.randn(5, 3))
    assert len(gms) == 1
    return gms[0]


def test_scan_body_drawn_as_nested_cluster_linked_to_its_hop():
    gm = _capture_scan()
    report = RewriteReport()
    rec = report.new_graph(gm)
    rec.after = snapshot(gm)
    hop = next(n for n in gm.graph.nodes if n.op == "call_function" and "scan" in str(n.target))
    body_attr = hop.args[0].name
    rec.rewrites.append(Rewrite("adjoint_scan", "scan -> adjoint_sharded_scan", node_site(hop), [hop.name], [hop.name]))
    dot = viz.to_dot(report)
    bodies = re.findall(r"subgraph (cluster_\w+_body)", dot)
    assert len(bodies) == 2  # before and after
    assert f'label="body {body_attr}"' in dot
    # The body holder links into the cluster, the cluster links to the scan node.
    for b in bodies:
        assert f"lhead={b}" in dot and f"ltail={b}" in dot
    # The combine function's ops are drawn inside the body (mul and add of the recurrence).
    body_part = dot.split(f"subgraph {bodies[0]}")[1]
    assert _lines_of(body_part, "mul") and _lines_of(body_part, "h2")
    if HAVE_DOT:
        _parses(dot)
    # draw_graph, the full view, nests the body too.
    full = viz.draw_graph(snapshot(gm), highlight={hop.name: "adjoint_scan"}).source
    assert "_body" in full and 'label="pass adjoint_scan"' in full


# -------------------------------------------------------------------------------- render


def test_render_writes_files(tmp_path, monkeypatch, caplog):
    report, _, _ = _small_report()
    files = viz.render(report, tmp_path / "sub" / "report.svg")
    assert files[0] == tmp_path / "sub" / "report.dot" and files[0].read_text().startswith("digraph")
    if HAVE_DOT:
        assert files[1] == tmp_path / "sub" / "report.svg" and b"<svg" in files[1].read_bytes()
        png = viz.render(report, tmp_path / "r", format="png")
        assert png[1].suffix == ".png" and png[1].read_bytes()[:4] == b"\x89PNG"
    # Without the binary: DOT only, a warning, no exception.
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="longctx_compiler"):
        files = viz.render(report, tmp_path / "nodot")
    assert [f.name for f in files] == ["nodot.dot"]
    assert "not found" in caplog.text


# ------------------------------------------------------------------------ a real model


@pytest.mark.slow
def test_llama_sdpa_rewrites_collapse_to_one_small_group():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    gms: list[fx.GraphModule] = []

    def backend(gm, example_inputs):
        gms.append(gm)
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True)(input_ids=torch.randint(0, 64, (1, 8)))
    gm = gms[0]
    report = RewriteReport()
    rec = report.new_graph(gm)
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)]
    assert len(sdpa) == 2
    # Pretend a pass rewrote each SDPA in place (same node names, provenance set).
    for n in sdpa:
        n.meta[PROVENANCE_KEY] = "chunked_attention"
        rec.rewrites.append(Rewrite("chunked_attention", "sdpa -> chunked_attention", node_site(n), [n.name], [n.name]))
    rec.after = snapshot(gm)
    assert len(rec.before.nodes) > 100

    dot = viz.to_dot(report)
    assert dot.count("×2 layers") == 2  # one group, drawn once per side
    assert len(re.findall(r"subgraph cluster_g0b_rewrite", dot)) == 1
    assert "model.layers.*.self_attn" in dot
    assert len(_node_lines(dot)) < 80
    if HAVE_DOT:
        _parses(dot)

"""Let the passes see inside activation-checkpoint regions, and keep the regions.

``torch.utils.checkpoint(fn, ..., use_reentrant=False)`` — what Hugging Face's
``gradient_checkpointing_enable()`` wraps around every decoder layer — reaches the backend as
one higher-order-op node per region, its body a separate GraphModule::

    body = self.wrap_body_0
    res  = tag_activation_checkpoint(body, s0, hidden, weights..., cos, sin, mask, use_reentrant=False)
    out  = res[0]

A pass that walks the outer graph sees one opaque node per layer; one that walked the body
alone would meet placeholders where it needs producers (the causal-mask prover must see how
the mask was built, and the mask is built once, outside the layers). So the runner works on
a flat view instead:

1. :func:`open_regions` inlines every region's body into the outer graph, each inlined node
   tagged with the region it came from (``meta[REGION_KEY]``, the ids of the enclosing
   regions, outermost first; nested regions are opened too).
2. The passes run on the flat graph exactly as on a model without checkpointing: every
   match, check and proof sees the same nodes. Nodes a rewrite creates inherit the tag of
   the rewritten site (:mod:`longctx_compiler.passes.base`).
3. :func:`close_regions` outlines each region again — its surviving and created nodes
   become a new body, called by a new ``tag_activation_checkpoint`` node with the original
   keyword arguments and the original body's metadata (a selective-checkpoint policy, if the
   user gave one) — so the user's memory plan is kept: each region saves only its inputs
   and recomputes the rest in backward, our ops included.

Exactness: inlining and outlining move nodes without changing them, so the program is the
same; the recomputation in backward is what checkpointing always does, and our plain ops are
pure functions of their inputs (recomputing them gives bitwise the same values).

The host-offload attention op is not pure: it copies q/k/v/out/lse into the host pool and
returns a handle. Inside a region AOTAutograd's partitioner recomputes it in backward like
every other op of the region, so it would copy everything to the host a second time — and
the copies buy nothing there, since a region keeps no activations between forward and
backward. :func:`close_regions` therefore swaps it for the plain op and records the reason
in the rewrite's details.

A region whose nodes cannot be outlined again without changing the program (an outside node
that both reads the region and feeds it, or a value crossing the boundary that is not a
tensor or a number) is left inlined — exact, but not checkpointed — and the report gets a
refusal of ``checkpoint_regions`` saying so. Bodies of other higher-order ops (``cond``,
``invoke_subgraph``, ``flex_attention``'s score functions, autograd functions, ...) are not
entered; :func:`refuse_hidden_sites` reports every site a pass would have matched in them.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import torch.fx as fx

from longctx_compiler.passes.analysis.fx_utils import example_value, propagate_example_value, writes_in_place
from longctx_compiler.report import PROVENANCE_KEY, GraphRecord, Refusal, node_site

if TYPE_CHECKING:
    from longctx_compiler.passes.base import Pass, PassContext

__all__ = ["REGION_KEY", "PASS_NAME", "CHECKPOINT_HOP", "Region", "open_regions", "close_regions", "refuse_hidden_sites"]

log = logging.getLogger("longctx_compiler")

#: ``node.meta`` key: the ids of the checkpoint regions a node belongs to, outermost first.
REGION_KEY = "longctx_checkpoint_region"
#: The name refusals about regions carry in the report.
PASS_NAME = "checkpoint_regions"
CHECKPOINT_HOP = torch.ops.higher_order.tag_activation_checkpoint

#: Why the host-offload attention op is swapped for the plain one inside a region.
OFFLOAD_IN_REGION = (
    "inside an activation-checkpoint region: the region is recomputed in backward, so the "
    "host-offload op would copy q/k/v/out/lse to the host a second time, and a region keeps no "
    "activations between forward and backward for offloading to save; the plain chunked op is used"
)

# Values that may cross a region's boundary as operands or results of the HOP.
_OPERAND_TYPES = (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


@dataclass
class Region:
    """One opened checkpoint region: what is needed to outline it again."""

    id: int
    #: ids of the enclosing regions and this one, outermost first (the tag of its nodes)
    path: tuple[int, ...]
    kwargs: dict[str, Any]
    body_meta: dict[str, Any]
    #: metadata of the original HOP node (source line, ...), for the new one
    hop_meta: dict[str, Any]
    site: str
    #: names of the HOP nodes this region became again (empty if it stayed inlined)
    outlined_as: list[str] = field(default_factory=list)


def _offload_ops() -> tuple[Any, Any]:
    # Imported lazily: the attention kernels register their ops on import.
    import longctx_compiler.kernels.attention  # noqa: F401

    return torch.ops.longctx.chunked_attention_fwd_offload.default, torch.ops.longctx.chunked_attention_fwd.default


def _attr(module: torch.nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _body_of(gm: fx.GraphModule, node: Any) -> fx.GraphModule | None:
    """The GraphModule a ``get_attr`` node names, or None."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    obj = _attr(gm, str(node.target))
    return obj if isinstance(obj, fx.GraphModule) else None


def _free_attr(gm: fx.GraphModule, prefix: str) -> str:
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"


def _openable(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why ``node`` (a checkpoint HOP) cannot be inlined and restored, or None if it can."""
    body = _body_of(gm, node.args[0] if node.args else None)
    if body is None:
        return "its body is not a GraphModule attribute"
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(node.args) - 1:
        return f"its body takes {len(placeholders)} inputs but is called with {len(node.args) - 1}"
    out = next(n for n in body.graph.nodes if n.op == "output")
    if not isinstance(out.args[0], (tuple, list)):
        return "its body does not return a tuple"
    for u in node.users:
        if not (u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)):
            return f"its result is used as a whole ({u.name}), not element by element"
    return None


def open_regions(gm: fx.GraphModule, record: GraphRecord) -> list[Region]:
    """Inline every ``tag_activation_checkpoint`` region of ``gm`` (nested ones too), tagging
    the inlined nodes with ``REGION_KEY``; return the regions, to be closed again by
    :func:`close_regions`. A region that cannot be inlined stays a HOP and is refused with
    the reason (its sites then show up through :func:`refuse_hidden_sites`)."""
    regions: list[Region] = []
    seen: set[fx.Node] = set()
    while True:
        hop = next((n for n in gm.graph.nodes if n.op == "call_function" and n.target is CHECKPOINT_HOP and n not in seen), None)
        if hop is None:
            break
        seen.add(hop)
        why = _openable(gm, hop)
        if why is not None:
            record.refusals.append(Refusal(PASS_NAME, node_site(hop), f"checkpoint region not entered: {why}", [hop.name], record.index))
            continue
        regions.append(_inline(gm, hop, len(regions)))
    if regions:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        log.debug("opened %d checkpoint region(s)", len(regions))
    return regions


def _inline(gm: fx.GraphModule, hop: fx.Node, rid: int) -> Region:
    graph = gm.graph
    body_attr = hop.args[0]
    body = _body_of(gm, body_attr)
    assert body is not None
    parent: tuple[int, ...] = hop.meta.get(REGION_KEY, ())
    path = (*parent, rid)
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    env: dict[fx.Node, Any] = dict(zip(placeholders, hop.args[1:]))
    first_site = None
    with graph.inserting_before(hop):
        for n in body.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            if n.op == "get_attr":
                # A nested body (another region, a scan's combine function) or a constant:
                # register it on the outer module under a fresh name.
                name = _free_attr(gm, str(n.target).replace(".", "_"))
                value = _attr(body, str(n.target))
                if isinstance(value, torch.nn.Module):
                    gm.add_submodule(name, value)
                else:
                    setattr(gm, name, value)
                new = graph.get_attr(name)
                new.meta.update(n.meta)
            else:
                new = graph.node_copy(n, lambda x: env[x])
            new.meta[REGION_KEY] = path
            env[n] = new
            if first_site is None and n.meta.get("nn_module_stack"):
                first_site = node_site(n)
    out = next(n for n in body.graph.nodes if n.op == "output")
    results = [env[r] if isinstance(r, fx.Node) else r for r in out.args[0]]
    for u in list(hop.users):
        value = results[u.args[1]]
        if isinstance(value, fx.Node):
            u.replace_all_uses_with(value)
        elif u.users:
            raise RuntimeError(f"checkpoint region output {u.args[1]} is a constant ({value!r}) that is read")
        graph.erase_node(u)
    region = Region(
        id=rid,
        path=path,
        kwargs=dict(hop.kwargs),
        body_meta=dict(getattr(body, "meta", {})),
        hop_meta={k: v for k, v in hop.meta.items() if k in ("stack_trace", "source_fn_stack", "nn_module_stack")},
        site=first_site or node_site(hop),
    )
    graph.erase_node(hop)
    if isinstance(body_attr, fx.Node) and not body_attr.users:
        graph.erase_node(body_attr)
    _drop_dead(graph, [env[n] for n in body.graph.nodes if n in env and n.op != "placeholder"])
    return region


def _drop_dead(graph: fx.Graph, inlined: list[fx.Node]) -> None:
    """Erase inlined nodes nobody reads and that have no side effect.

    Dynamo leaves such nodes in checkpoint bodies (``size = x.size(); getitem = size[0]``
    from ``B, T, D = x.shape``), though never in the graph it hands over: the runner treats a
    node nobody reads as a statement kept for its side effect, and passes that analyse a
    region's nodes would have to explain them. In-place writes and impure nodes stay.
    """
    for n in reversed(inlined):
        if not n.users and n.op in ("call_function", "call_method") and not writes_in_place(n) and not n.is_impure():
            graph.erase_node(n)


def close_regions(gm: fx.GraphModule, regions: Sequence[Region], record: GraphRecord) -> None:
    """Outline every opened region again (innermost first), as a new checkpoint HOP."""
    if not regions:
        return
    _plain_attention_in_regions(gm, record)
    # Innermost first: an outlined inner region becomes one node of its parent.
    for region in sorted(regions, key=lambda r: len(r.path), reverse=True):
        members = [n for n in gm.graph.nodes if n.meta.get(REGION_KEY, ())[-1:] == (region.id,)]
        if not members:
            # Everything the region computed was rewritten away or is dead.
            continue
        why = _outline(gm, region, members)
        if why is not None:
            # The nodes stay inlined: exact, but this region is no longer recomputed.
            for n in members:
                n.meta[REGION_KEY] = region.path[:-1]
            record.refusals.append(Refusal(PASS_NAME, region.site, f"checkpoint region kept inlined (not recomputed in backward): {why}",
                                           [n.name for n in members], record.index))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _outline(gm: fx.GraphModule, region: Region, members: list[fx.Node]) -> str | None:
    """Replace ``members`` by one checkpoint HOP; the reason if that would change the program."""
    graph = gm.graph
    inside = set(members)
    inputs: list[fx.Node] = []
    outputs: list[fx.Node] = []
    for n in members:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
        if any(u not in inside for u in n.users):
            outputs.append(n)
    if not outputs:
        return "nothing computed in it is used after it, yet it has nodes with side effects"
    for v in (*inputs, *outputs):
        if v.op == "get_attr" and _body_of(gm, v) is not None:
            return f"the subgraph {v.target} crosses its boundary"
        if not isinstance(example_value(v), _OPERAND_TYPES):
            return f"{v.name} crosses its boundary as a {type(example_value(v)).__name__}, not a tensor or a number"
    order = {n: i for i, n in enumerate(graph.nodes)}
    outside_uses = [u for o in outputs for u in o.users if u not in inside]
    first_use = min(outside_uses, key=order.__getitem__)
    last_input = max((order[a] for a in inputs), default=-1)
    if last_input >= order[first_use]:
        return "a rewrite interleaved it with outside work that both reads it and feeds it"

    body_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        p = body_graph.placeholder(a.name)
        p.meta.update({k: v for k, v in a.meta.items() if k in ("example_value", "val", "tensor_meta")})
        env[a] = p
    for n in members:
        env[n] = body_graph.node_copy(n, lambda x: env[x])
        env[n].meta.pop(REGION_KEY, None)
    body_graph.output(tuple(env[o] for o in outputs))
    # The root module supplies the attributes the body's get_attr nodes name (nested bodies).
    body = fx.GraphModule(gm, body_graph, class_name="CheckpointRegion")
    body.meta.update(region.body_meta)
    name = _free_attr(gm, "checkpoint_region")
    gm.add_submodule(name, body)

    parent = region.path[:-1]
    with graph.inserting_before(first_use):
        body_node = graph.get_attr(name)
        call = graph.call_function(CHECKPOINT_HOP, (body_node, *inputs), dict(region.kwargs))
        call.meta.update(region.hop_meta)
        call.meta["example_value"] = tuple(example_value(o) for o in outputs)
        results = []
        for i, o in enumerate(outputs):
            g = graph.call_function(operator.getitem, (call, i), {})
            g.meta.update({k: v for k, v in o.meta.items() if k in ("example_value", "val", "tensor_meta", "nn_module_stack", "stack_trace")})
            results.append(g)
    for n in (body_node, call, *results):
        if parent:
            n.meta[REGION_KEY] = parent
        else:
            n.meta.pop(REGION_KEY, None)
    for o, g in zip(outputs, results):
        o.replace_all_uses_with(g, delete_user_cb=lambda u: u not in inside)
    for n in reversed(members):
        graph.erase_node(n)
    region.outlined_as.append(call.name)
    return None


def _plain_attention_in_regions(gm: fx.GraphModule, record: GraphRecord) -> None:
    """Swap the host-offload attention op for the plain one inside checkpoint regions (see
    the module docstring), and say so in the rewrite's details."""
    offload, plain = _offload_ops()
    for n in gm.graph.nodes:
        if not (n.op == "call_function" and n.target is offload and n.meta.get(REGION_KEY)):
            continue
        # The plain op returns (out, lse); the handle (index 2) exists only for the offload
        # op's own backward, so nothing in the forward graph may read it.
        if any(not (u.target is operator.getitem and u.args[1] in (0, 1)) for u in n.users):
            record.refusals.append(Refusal(PASS_NAME, node_site(n), "the host-offload attention op's handle is read in the forward graph; "
                                           "it stays the offload op inside a checkpoint region", [n.name], record.index))
            continue
        n.target = plain
        propagate_example_value(n)
        for r in record.rewrites:
            if n.name in r.nodes_added:
                r.kind = r.kind.replace("chunked_attention+offload", "chunked_attention")
                r.details["offload"] = False
                r.details["offload_refused"] = OFFLOAD_IN_REGION
        log.debug("plain chunked attention instead of the offload op at %s (checkpoint region)", node_site(n))


def refuse_hidden_sites(gm: fx.GraphModule, passes: Iterable["Pass"], ctx: "PassContext", record: GraphRecord) -> None:
    """Record a refusal for every site a pass would match inside the body of a higher-order
    op that the passes do not enter (everything but the checkpoint regions opened above).

    Bodies that our own passes built (a recomputed SSM block, ...) hold nodes the passes
    already saw, and are skipped.
    """
    passes = [p for p in passes if p.enabled(ctx)]
    for hop, body, path in _foreign_bodies(gm, ()):
        where = " > ".join(f"higher_order.{h}" for h in path)
        for p in passes:
            try:
                matches = list(p.match(body, ctx))
            except Exception as exc:  # noqa: BLE001 - a body a matcher cannot read is reported, not fatal
                record.refusals.append(Refusal(p.name, node_site(hop), f"could not look inside the body of {where} "
                                               f"({type(exc).__name__}: {exc}); sites there are not rewritten", [hop.name], record.index))
                continue
            for m in matches:
                record.refusals.append(Refusal(
                    p.name, node_site(m.anchor),
                    f"inside the body of {where}, which the passes do not enter (only activation-checkpoint regions are)",
                    [m.anchor.name], record.index,
                ))


def _foreign_bodies(gm: fx.GraphModule, path: tuple[str, ...]) -> Iterable[tuple[fx.Node, fx.GraphModule, tuple[str, ...]]]:
    for n in gm.graph.nodes:
        if not (n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)):
            continue
        if n.meta.get(PROVENANCE_KEY):
            continue
        for a in (*n.args, *n.kwargs.values()):
            for leaf in (a if isinstance(a, (tuple, list)) else (a,)):
                body = _body_of(gm, leaf)
                if body is None:
                    continue
                here = (*path, n.target.name())
                yield n, body, here
                yield from _foreign_bodies(body, here)

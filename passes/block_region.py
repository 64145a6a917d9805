"""Block regions: the nodes of one module around a long-context op, as one replaceable unit.

Shared by the passes that rewrite whole blocks (:mod:`recompute_ssm_blocks`,
:mod:`adjoint_sharded_blocks`, :mod:`pipelined_layers`):

* :func:`module_region` — the nodes of one module, as a region.
* :func:`find_blocks` — for each *anchor* (a scan, an attention), the outermost module (from
  Dynamo's ``nn_module_stack``) that holds it and no other anchor of the same kind: a
  ``MambaBlock`` in a stack of layers, a ``LlamaDecoderLayer``, the whole backbone in a
  one-layer model. Size arithmetic on the graph's size symbols stays outside (Dynamo computes
  it once and may reuse it in later blocks).
* :func:`check_region` — what makes the region one node without changing what it computes:
  no random numbers (recomputing would draw new ones), no in-place updates or side effects,
  no long-context op but the block's own, only tensors leaving it, and no outside work
  interleaved with it. Records the region's inputs and outputs.
* :func:`replace_region` — the region becomes one call whose ``i``-th result stands for the
  block's ``i``-th output.
* :func:`copy_body` — the region's nodes copied into a fresh graph, with chosen nodes
  replaced (a scan or attention by its windowed form).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from longctx_compiler.passes.base import CantApply, Match
from longctx_compiler.dynamo_names import module_path
from longctx_compiler.passes.analysis.fx_utils import example_value, propagate_example_value, writes_in_place

__all__ = ["module_stack", "long_context_op", "random_op", "find_blocks", "module_region", "check_region", "replace_region", "copy_body"]

#: Functions whose result depends on the random-number generator: recomputing them would
#: draw new numbers (and the forward/backward pair would disagree).
_RANDOM = {
    torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
    torch.bernoulli, torch.normal, torch.multinomial, torch.randperm,
}
_DROPOUT = {torch.nn.functional.dropout, torch.dropout, torch.nn.functional.dropout1d,
            torch.nn.functional.dropout2d, torch.nn.functional.alpha_dropout, torch.nn.functional.feature_alpha_dropout}


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """``[(key, path), ...]`` outermost first, from Dynamo's ``nn_module_stack``; ``path`` as
    the report writes it (``model.layers.0.mlp``, whatever Dynamo's source spelling).

    The model itself is not an entry: it is what was compiled, not a block of it (Dynamo
    lists it when the compiled callable calls the model rather than being its ``forward``,
    as ``optimize``'s is; its path is empty)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [(k, module_path(v[0])) for k, v in stack.items()]
    return [(k, p) for k, p in paths if p]


def long_context_op(node: fx.Node) -> bool:
    """Whether ``node`` calls one of our ``longctx::`` ops (attention, scan, block, loss)."""
    ns = getattr(node.target, "namespace", None) or getattr(getattr(node.target, "_schema", None), "name", "")
    return node.op == "call_function" and str(ns).startswith("longctx")


def random_op(node: fx.Node) -> str | None:
    """What ``node`` draws from the random-number generator, None if nothing."""
    if node.op == "call_function" and node.target in _RANDOM:
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_function" and node.target in _DROPOUT:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        if training and (not isinstance(p, (int, float)) or p > 0):
            return f"dropout(p={p})"
    if node.op == "call_method" and node.target in ("random_", "uniform_", "normal_", "bernoulli_", "exponential_"):
        return node.target
    return None


def find_blocks(gm: fx.GraphModule, anchors: list[fx.Node], counted: Callable[[fx.Node], bool]) -> Iterable[Match]:
    """One :class:`Match` per anchor: the outermost module holding it and no other node for
    which ``counted`` is true (``data``: ``path``, ``anchor_node``). An anchor inside no such
    module gives a match with ``path`` None (to be refused with the reason)."""
    per_module: dict[str, int] = {}
    for s in gm.graph.nodes:
        if counted(s):
            for key, _ in module_stack(s):
                per_module[key] = per_module.get(key, 0) + 1
    for s in anchors:
        block = next(((k, p) for k, p in module_stack(s) if per_module.get(k) == 1), None)
        if block is None:
            yield Match(anchor=s, nodes=[s], data={"path": None, "anchor_node": s})
            continue
        key, path = block
        nodes, first = module_region(gm, key)
        yield Match(anchor=first or s, nodes=nodes, data={"path": path, "anchor_node": s})


def module_region(gm: fx.GraphModule, key: str) -> tuple[list[fx.Node], fx.Node | None]:
    """The nodes of the module with ``nn_module_stack`` key ``key``, in graph order, and the
    node the report names it by: its first node that belongs to the module itself rather
    than to a submodule (the scan sits in the mixer), None if it has none."""
    nodes: list[fx.Node] = []
    members: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module") or all(k != key for k, _ in module_stack(n)):
            continue
        if isinstance(example_value(n), (torch.SymInt, int)) and not members.intersection(n.all_input_nodes):
            # Size arithmetic on the graph's size symbols (``T - 2``): Dynamo computes it
            # once and may reuse it in later blocks, so it stays outside, an input.
            continue
        nodes.append(n)
        members.add(n)
    return nodes, next((n for n in nodes if module_stack(n)[-1][0] == key), None)


def check_region(gm: fx.GraphModule, match: Match, own_ops: Callable[[fx.Node], bool]) -> None:
    """Refuse (:class:`CantApply`) a region that cannot become one node exactly; otherwise set
    ``match.data`` ``inputs``, ``outputs``, ``insert_before``. ``own_ops``: the long-context
    ops the block may hold (its scan, its attention)."""
    region = set(match.nodes)
    for n in match.nodes:
        why = random_op(n)
        if why:
            raise CantApply(f"the block draws random numbers ({why} at {n.name}); recomputing it would not reproduce the forward")
        if writes_in_place(n):
            what = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
            raise CantApply(f"the block updates a tensor in place ({what} at {n.name})")
        if own_ops(n):
            continue
        if n.is_impure():
            raise CantApply(f"{n.name} ({n.target}) has side effects")
        if n.op == "call_module":
            raise CantApply(f"{n.name} calls a module ({n.target}) that Dynamo did not inline")
        if long_context_op(n):
            raise CantApply(f"the block holds another long-context op ({n.target}); recomputing it is not supported")
        if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator):
            raise CantApply(f"the block holds a higher-order op ({n.target.name()})")

    inputs: list[fx.Node] = []
    outputs: list[fx.Node] = []
    for n in match.nodes:
        for a in n.all_input_nodes:
            if a not in region and a not in inputs:
                inputs.append(a)
        if any(u not in region for u in n.users):
            outputs.append(n)
    if not outputs:
        raise CantApply("nothing computed in the block is used after it")
    for o in outputs:
        if not isinstance(example_value(o), torch.Tensor):
            raise CantApply(f"{o.name} leaves the block as a {type(example_value(o)).__name__}, not a tensor")
    # The region can become one node only if no outside node both depends on the region
    # and feeds it (a cycle). Such a node, or the chain through it, reads a region output
    # and is (or feeds) a region input, so every input must be defined before the first
    # outside use of an output: that is the whole check.
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last_input = max((order[a] for a in inputs), default=-1)
    first_outside_use = min(order[u] for o in outputs for u in o.users if u not in region)
    if last_input >= first_outside_use:
        raise CantApply("the block's nodes are interleaved with outside work that depends on them")
    match.data["inputs"] = inputs
    match.data["outputs"] = outputs
    match.data["insert_before"] = min((u for o in outputs for u in o.users if u not in region), key=order.__getitem__)


def replace_region(gm: fx.GraphModule, match: Match, target: Any, args: tuple, kwargs: dict,
                   example: tuple | None = None) -> tuple[fx.Node, list[fx.Node]]:
    """Replace the block by one call ``target(*args, **kwargs)`` whose ``i``-th result stands
    for the block's ``i``-th output; ``example``: the call's example value (computed from
    its inputs' when None)."""
    graph = gm.graph
    outputs: list[fx.Node] = match.data["outputs"]
    with graph.inserting_before(match.data["insert_before"]):
        call = graph.call_function(target, args, kwargs)
        for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if k in match.anchor.meta:
                call.meta[k] = match.anchor.meta[k]
        if example is None:
            propagate_example_value(call)
        else:
            call.meta["example_value"] = example
        results = []
        for i, o in enumerate(outputs):
            g = graph.call_function(operator.getitem, (call, i), {})
            g.meta.update({k: v for k, v in o.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")})
            g.meta["example_value"] = call.meta["example_value"][i]
            results.append(g)
    region = set(match.nodes)
    for o, g in zip(outputs, results):
        o.replace_all_uses_with(g, delete_user_cb=lambda u: u not in region)
    for n in reversed(match.nodes):
        graph.erase_node(n)
    return call, results


def copy_body(match: Match, inputs: list[fx.Node], extra: list[str],
              replace: Callable[[fx.Node, dict, list[fx.Node]], fx.Node | None]) -> tuple[fx.Graph, list[fx.Node], dict]:
    """A graph with placeholders for ``inputs`` then ``extra``, and the region's nodes.

    ``replace(node, env, extra_placeholders)`` returns the body node standing for ``node``, or
    None to copy it as it is. A ``getitem`` of a replaced node whose result nobody reads is
    dropped. Returns the graph (no output yet: the caller adds it), the extra placeholders
    and the map from region nodes to body nodes.
    """
    body = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = body.placeholder(a.name)
    placeholders = [body.placeholder(name) for name in extra]
    replaced: set[fx.Node] = set()
    for n in match.nodes:
        new = replace(n, env, placeholders)
        if new is not None:
            env[n] = new
            replaced.add(n)
        elif n.op == "call_function" and n.target is operator.getitem and n.args[0] in replaced and not n.users:
            continue
        else:
            env[n] = body.node_copy(n, lambda x: env[x])
    return body, placeholders, env

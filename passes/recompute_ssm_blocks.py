"""Recompute the token-wise work of every block that holds an adjoint-sharded scan.

(The fallback for blocks that :mod:`adjoint_sharded_blocks` refuses: that pass runs a block
chunk by chunk along the sequence, which holds one chunk's activations instead of a whole
block's; this one recomputes the whole block at once.)

Once a scan is adjoint-sharded, its own saved state is tiny (``[B, D, M, N]`` boundary
states). What a Mamba-style block still keeps for backward is its *token-wise* work: the
norm, the input projection ``[T, 2·D_inner]``, the causal convolution and its activation,
``x_proj``/``dt_proj`` outputs, the gate — about ten ``[T, D_inner]`` activations per layer,
more than the scan itself ever needed. All of it is a cheap function of the block's input
``[T, hidden]``, so this pass wraps each such block in an activation-checkpoint region::

    before:  x ─ norm ─ in_proj ─ conv ─ silu ─ x_proj ─ dt_proj ─ scan ─ out_proj ─ (+x) ─ out
    after:   out = tag_activation_checkpoint(block_body, x, *params)[0]
             (block_body holds the same nodes; the scan inside is marked MUST_SAVE)

AOTAutograd's partitioner then saves the block's inputs and the scan's outputs (``y`` and
the boundary states, which the scan's backward needs anyway) and recomputes the rest in
backward. Saving the scan's outputs means the scan's forward never runs twice; the price
is one extra forward of the token-wise layers (projections and convolution).

Which nodes form "the block": the outermost module (from Dynamo's ``nn_module_stack``) that
contains exactly one scan node — a ``MambaBlock`` (norm + mixer + residual) in a stack of
layers, the whole backbone in a one-layer model. Refused, with the reason, when the block
cannot be recomputed exactly or cheaply: random ops (dropout with p > 0 in training),
in-place updates or other side effects, other ``longctx`` ops (attention offload has host
side effects), non-tensor values leaving the block, or a block whose nodes are interleaved
with outside work that depends on them.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from longctx_compiler.kernels import ssm_block as _ssm_block  # noqa: F401  (registers ssm_block_fwd)
from longctx_compiler.passes.adjoint_sharded_scan import SCAN_OP
from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext
from longctx_compiler.passes.fx_utils import example_value, propagate_example_value, writes_in_place
from longctx_compiler.passes.registry import register_pass

__all__ = ["RecomputeSSMBlocksPass", "CHECKPOINT_HOP"]

CHECKPOINT_HOP = torch.ops.higher_order.tag_activation_checkpoint
BLOCK_OP = torch.ops.longctx.ssm_block_fwd.default

#: Functions whose result depends on the random-number generator: recomputing them would
#: draw new numbers (and the forward/backward pair would disagree).
_RANDOM = {
    torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
    torch.bernoulli, torch.normal, torch.multinomial, torch.randperm,
}
_DROPOUT = {torch.nn.functional.dropout, torch.dropout, torch.nn.functional.dropout1d,
            torch.nn.functional.dropout2d, torch.nn.functional.alpha_dropout, torch.nn.functional.feature_alpha_dropout}


def _scan_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    # The scan's outputs are saved (its backward reads y's inputs and the boundary states
    # anyway, and recomputing the scan would double its cost); everything else is recomputed.
    if op is SCAN_OP:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """``[(key, path), ...]`` outermost first, from Dynamo's ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(k, v[0]) for k, v in stack.items()]


def _random(node: fx.Node) -> str | None:
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


@register_pass("rewrite", order=90)
class RecomputeSSMBlocksPass(Pass):
    """Wrap each block around an adjoint-sharded scan in an activation-checkpoint region."""

    name = "recompute_ssm_blocks"
    kind = "ssm block -> recomputed in backward"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.config.ssm.enabled and ctx.config.ssm.recompute_blocks

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        d = match.data
        return {"block": d["path"], "nodes": len(match.nodes), "inputs": len(d.get("inputs", ())), "saved": "block inputs + scan outputs"}

    # -- match ------------------------------------------------------------------------------
    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        scans = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SCAN_OP]
        if not scans:
            return
        # How many scans each module (by nn_module_stack key) contains; a block that
        # adjoint_sharded_blocks already turned into one op still holds its scan.
        per_module: dict[str, int] = {}
        for s in gm.graph.nodes:
            if s.op == "call_function" and s.target in (SCAN_OP, BLOCK_OP):
                for key, _ in _module_stack(s):
                    per_module[key] = per_module.get(key, 0) + 1
        for s in scans:
            block = next(((k, p) for k, p in _module_stack(s) if per_module[k] == 1), None)
            if block is None:
                # Reported as a refusal: the scan is not inside a module of its own.
                yield Match(anchor=s, nodes=[s], data={"path": None, "scan": s})
                continue
            key, path = block
            nodes: list[fx.Node] = []
            members: set[fx.Node] = set()
            for n in gm.graph.nodes:
                if n.op not in ("call_function", "call_method", "call_module") or all(k != key for k, _ in _module_stack(n)):
                    continue
                if isinstance(example_value(n), (torch.SymInt, int)) and not members.intersection(n.all_input_nodes):
                    # Size arithmetic on the graph's size symbols (``T - 2``): Dynamo computes
                    # it once and may reuse it in later blocks, so it stays outside, an input.
                    continue
                nodes.append(n)
                members.add(n)
            # The report names the block: anchor on its first node that belongs to the block
            # itself rather than to a submodule (the scan sits in the mixer).
            anchor = next((n for n in nodes if _module_stack(n)[-1][0] == key), s)
            yield Match(anchor=anchor, nodes=nodes, data={"path": path, "scan": s})

    # -- check ------------------------------------------------------------------------------
    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        if match.data["path"] is None:
            raise CantApply("the scan is not inside a module of its own (no enclosing block to recompute)")
        region = set(match.nodes)
        for n in match.nodes:
            why = _random(n)
            if why:
                raise CantApply(f"the block draws random numbers ({why} at {n.name}); recomputing it would not reproduce the forward")
            if writes_in_place(n):
                what = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
                raise CantApply(f"the block updates a tensor in place ({what} at {n.name})")
            if n.is_impure() and n.target is not SCAN_OP:
                raise CantApply(f"{n.name} ({n.target}) has side effects")
            if n.op == "call_module":
                raise CantApply(f"{n.name} calls a module ({n.target}) that Dynamo did not inline")
            ns = getattr(n.target, "namespace", None) or getattr(getattr(n.target, "_schema", None), "name", "")
            if n.op == "call_function" and n.target is not SCAN_OP and str(ns).startswith("longctx"):
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

    # -- apply ------------------------------------------------------------------------------
    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        inputs: list[fx.Node] = match.data["inputs"]
        outputs: list[fx.Node] = match.data["outputs"]
        body_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for a in inputs:
            p = body_graph.placeholder(a.name)
            p.meta.update({k: v for k, v in a.meta.items() if k in ("example_value", "val", "tensor_meta")})
            env[a] = p
        for n in match.nodes:
            env[n] = body_graph.node_copy(n, lambda x: env[x])
        body_graph.output(tuple(env[o] for o in outputs))
        body = fx.GraphModule(gm, body_graph, class_name="RecomputedBlock")
        body.meta["_checkpoint_context_fn"] = functools.partial(create_selective_checkpoint_contexts, _scan_policy)
        name = _free_attr(gm, "recompute_block")
        gm.add_submodule(name, body)

        with gm.graph.inserting_before(match.data["insert_before"]):
            body_node = gm.graph.get_attr(name)
        call, results = self.replace_region(gm, match, CHECKPOINT_HOP, (body_node, *inputs), {"use_reentrant": False},
                                            example=tuple(example_value(o) for o in outputs))
        return [body_node, call, *results]

    def replace_region(self, gm: fx.GraphModule, match: Match, target: Any, args: tuple, kwargs: dict,
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

def _free_attr(gm: fx.GraphModule, prefix: str) -> str:
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"

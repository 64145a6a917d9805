"""Small helpers shared by passes: reading node values, keeping metadata correct."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.node import map_aggregate

__all__ = ["example_value", "propagate_example_value", "arg", "is_call", "strip_repeat_kv", "insert_call", "writes_in_place"]

#: Python operators that write into their first operand (``x[i] = v``, ``x += y``, ...).
_INPLACE_OPERATORS = frozenset({
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
})
# Functions whose names end in "_" only to avoid a keyword (``a & b`` is ``operator.and_``):
# they return a new value and write nothing.
_FUNCTIONAL_UNDERSCORE = frozenset({operator.and_, operator.or_, operator.not_, operator.is_})


def example_value(node: Any) -> Any:
    """The (fake) value Dynamo recorded for ``node``; non-nodes are returned as they are."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def writes_in_place(node: fx.Node, value: fx.Node | None = None) -> bool:
    """``node`` writes into a tensor: its first argument (``x.mul_(2)``, ``torch.relu_(x)``,
    ``x[i] = v``, ``x += y``) or its ``out=`` tensor. With ``value``: writes into ``value``.

    ``torch.fx`` does not know this (``Node.is_impure`` is False for every ``call_method``),
    so passes ask here before dropping, moving or recomputing a node.
    """
    out = node.kwargs.get("out")
    if out is not None and (value is None or out is value):
        return True
    if value is not None and (not node.args or node.args[0] is not value):
        return False
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        if node.target in _FUNCTIONAL_UNDERSCORE:
            return False
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return name.endswith("_") and not name.startswith("__")


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call node, given positionally at ``index`` or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


#: Calls that only reshape, index or cast a tensor, by name (``operator.getitem`` included).
VIEW_LIKE = frozenset({"reshape", "view", "flatten", "contiguous", "to", "float", "getitem"})


def is_view_like(node: fx.Node) -> bool:
    """``node`` calls one of :data:`VIEW_LIKE` on a tensor it reads."""
    return node.op in ("call_function", "call_method") and bool(node.all_input_nodes) and \
        getattr(node.target, "__name__", node.target) in VIEW_LIKE


def is_call(node: Any, *targets: Any) -> bool:
    """``node`` is a ``call_function`` of one of ``targets`` (or ``call_method`` named so)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in [t for t in targets if isinstance(t, str)]
    return False


def propagate_example_value(node: fx.Node) -> None:
    """Compute ``node.meta["example_value"]`` by running its target on its inputs' fake values.

    Keeps the Dynamo graph's metadata true after a rewrite (drawings, later passes and
    Inductor's checks read it). Nothing is computed on real data.
    """
    args = map_aggregate(node.args, example_value)
    kwargs = map_aggregate(node.kwargs, example_value)
    fakes = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
    # The inputs' own fake mode, not the ambient one: the backend runs inside a tracing
    # context whose mode may differ from the one Dynamo recorded the values in.
    mode = next((t.fake_mode for t in fakes if hasattr(t, "fake_mode")), None)
    if mode is None:
        return
    # The Python dispatcher, as Dynamo uses while tracing: composite ops (pad, ...) then run
    # their symbolic decompositions instead of C++ kernels that read concrete sizes, which
    # would pin a dynamic sequence length to the example's value.
    with mode, enable_python_dispatcher():
        if node.op == "call_function":
            value = node.target(*args, **kwargs)
        elif node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            return
    node.meta["example_value"] = value


def insert_call(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """Create a ``call_function`` node at the graph's insertion point, with its example value."""
    node = graph.call_function(target, args, kwargs or {})
    propagate_example_value(node)
    return node


def getitem(graph: fx.Graph, node: fx.Node, index: int) -> fx.Node:
    """``node[index]`` as a graph node, with its example value."""
    return insert_call(graph, operator.getitem, (node, index))


def strip_repeat_kv(node: fx.Node) -> fx.Node:
    """The un-repeated key/value behind a ``repeat_kv`` spelling, or ``node`` itself.

    ``transformers``' ``repeat_kv`` turns ``[B, Hkv, S, D]`` into ``[B, Hkv·G, S, D]`` as
    ``x[:, :, None, :, :].expand(B, Hkv, G, S, D).reshape(B, Hkv·G, S, D)``. Our attention
    handles grouped-query heads by index, so the copy is not needed: attention over the
    repeated heads equals grouped attention over the original ones (query head h reads
    key head h // G in both).
    """
    if not is_call(node, "reshape", torch.reshape):
        return node
    expanded = node.args[0]
    if not is_call(expanded, "expand"):
        return node
    indexed = expanded.args[0]
    if not is_call(indexed, operator.getitem):
        return node
    base, index = indexed.args
    if not (isinstance(index, tuple) and len(index) == 5 and index[2] is None and all(_full_slice(i) for k, i in enumerate(index) if k != 2)):
        return node
    base_val, out_val = example_value(base), example_value(node)
    if not isinstance(base_val, torch.Tensor) or not isinstance(out_val, torch.Tensor) or base_val.dim() != 4 or out_val.dim() != 4:
        return node
    b, hkv, s, d = base_val.shape
    if out_val.shape[0] != b or out_val.shape[2] != s or out_val.shape[3] != d:
        return node
    groups = out_val.shape[1] // hkv
    if groups * hkv != out_val.shape[1]:
        return node
    return base


def _full_slice(x: Any) -> bool:
    return isinstance(x, slice) and x == slice(None, None, None)

"""Sequence-window analysis: may a region be run on a window of the sequence?

A block of a sequence model (norm → projections → causal convolution → scan → gate →
projection → residual) is, apart from its scan, a *local* function of its input along the
sequence: output token ``t`` depends on input tokens ``t - H .. t`` only, for a small halo
``H`` (the convolution's width minus one), through the same arithmetic at every position.
Then running the region on the window ``x[a:b]`` (the sequence length ``T`` becoming the
window's length ``L`` wherever the graph uses it) gives, at every window index ``i >= H``
(every ``i`` when ``a = 0``), exactly what the whole sequence gives at ``a + i``. That is
what lets :mod:`longctx_compiler.passes.adjoint_sharded_blocks` run a block chunk by chunk.

This module proves it from the captured graph and its symbolic shapes, node by node, or
refuses with the reason (:class:`~longctx_compiler.passes.base.CantApply`):

* The sequence length is one symbol ``T`` (the graph is dynamic in it). A tensor's
  *sequence dim* is its one dim of size ``T + c`` (``c`` a constant: padded intermediates);
  a size mixing ``T`` any other way (``T·k``, two such dims) is refused.
* Compare the window run with the whole-sequence run, index ``i`` against ``a + i``. They
  agree everywhere on the inputs. They can disagree only near the window's edges, where
  the window run pads with zeros what the whole sequence has as real tokens. So every
  sequence tensor carries ``left`` and ``right``: how many of its leading and trailing
  indices may disagree. A constant pad by ``(p, r)`` adds ``p`` and ``r``; a slice
  ``[k : stop]`` removes ``k`` leading and ``c_in - k - c_out`` trailing indices (its stop
  may be ``T``-relative: the window run's stop is then ``L``-relative); pointwise
  operations take the largest of their operands'; operations that do not move data along
  the sequence (layout, projections, norms over features, channel splits) keep them.
  Anything that reads along the sequence — reductions, ``cumsum``, ``flip``, tensor
  indexing, a slice from the end — has no rule and is refused.
* ``left`` is tracked per source: the region's inputs, and the scan's output, which the
  caller computes for the window's own tokens only (its state carried across windows) and
  pads with ``hc`` leading zeros; its ``left`` counts on top of ``hc``.
* The sequence length may be used as a value only as the end of a slice along the sequence
  or a size in a reshape that keeps the sequence dim. In arithmetic on tensors
  (``x * T``, ``arange(T)``) the window would see another value, so it is refused.

The scan's sequence inputs and the region's outputs must agree at their last index
(``right = 0``: no look-ahead), the outputs must be pointwise in the scan's output (its
``left`` adds nothing to ``hc``), and the halo is the largest input ``left`` among them.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from longctx_compiler.passes.base import CantApply
from longctx_compiler.passes.analysis.fx_utils import arg as _arg
from longctx_compiler.passes.analysis.fx_utils import example_value

__all__ = ["SeqValue", "WindowAnalysis", "CarrySite", "analyse_window", "INPUT", "SCAN", "SSD", "ATTENTION", "STATE_CARRIES"]

INPUT = "input"
#: Carry kinds: a selective scan's state, an SSD (Mamba-2) scan's state, an attention's K/V history.
SCAN = "scan"
SSD = "ssd"
ATTENTION = "attention"
#: The kinds whose carry is a fixed-size state (the runtime numbers their slots together).
STATE_CARRIES = (SCAN, SSD)

@dataclass(frozen=True)
class SeqValue:
    """A tensor with a sequence dim: which dim, and how many of its leading (per source) and
    trailing indices may differ between a window run and the whole-sequence run."""

    dim: int
    left: tuple[tuple[str, int], ...]  # (source, count), sorted by source
    right: int = 0

    def on(self, dim: int) -> "SeqValue":
        return SeqValue(dim, self.left, self.right)

    def left_of(self, source: str) -> int | None:
        return next((n for s, n in self.left if s == source), None)

    def moved(self, dim: int, add_left: int, add_right: int) -> "SeqValue":
        """Pad (positive) or cut (negative) leading/trailing indices. Input disagreement
        cannot go below zero; the scan's counts on top of ``hc`` and may."""
        left = tuple((s, max(0, n + add_left) if s == INPUT else n + add_left) for s, n in self.left)
        return SeqValue(dim, left, max(0, self.right + add_right))


@dataclass(frozen=True)
class _Group:
    """A tuple/list of values along the sequence (``split``/``chunk`` results)."""

    left: tuple[tuple[str, int], ...]
    right: int


class _Size:
    """A symbolic integer that depends on the sequence length."""


_SIZE = _Size()


@dataclass
class WindowAnalysis:
    """What a windowed run of the region needs.

    Attributes:
        length: the sequence-length symbol ``T``.
        halo: H, the number of tokens before a window's first output it must also read.
        min_length: the shortest window for which every sequence size ``L + c`` is at least
            1. Shorter, a slice such as ``x[:, :-2]`` would clamp (to an empty tensor)
            instead of keeping ``L + c`` positions, and the window would not be the
            sequence's restriction.
        input_dims: sequence dim of each region input that has one.
        size_inputs: each integer region input that depends on ``T``, as an expression in it.
        output_dims: sequence dim of each region output, in order.
        positions: the ``arange`` nodes over the sequence (with ``global_positions``).
        halos: the zero paddings of a sequence's start that the caller replaces by the tokens
            before the window (with ``global_positions``).
    """

    length: sympy.Symbol
    halo: int
    min_length: int
    input_dims: dict[fx.Node, int] = field(default_factory=dict)
    size_inputs: dict[fx.Node, sympy.Expr] = field(default_factory=dict)
    output_dims: list[int] = field(default_factory=list)
    positions: list[fx.Node] = field(default_factory=list)
    halos: list[fx.Node] = field(default_factory=list)


def _union(values: list["SeqValue | _Group"], dim: int) -> SeqValue:
    left: dict[str, int] = {}
    for v in values:
        for src, n in v.left:
            left[src] = max(left.get(src, n), n)
    return SeqValue(dim, tuple(sorted(left.items())), max(v.right for v in values))


# -- operation tables ---------------------------------------------------------------------
_POINTWISE = {
    "add", "sub", "rsub", "mul", "div", "truediv", "true_divide", "floordiv", "floor_divide", "neg", "pos", "pow",
    "float_power", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "rsqrt", "sqrt", "square", "reciprocal",
    "sigmoid", "tanh", "silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "softplus", "softsign",
    "mish", "hardswish", "hardsigmoid", "hardtanh", "logsigmoid", "tanhshrink", "abs", "clamp", "clip", "clamp_min",
    "clamp_max", "where", "maximum", "minimum", "erf", "erfc", "sin", "cos", "sinh", "cosh", "atan", "atan2",
    "sign", "masked_fill", "lerp", "addcmul", "addcdiv", "mod", "remainder", "fmod", "floor", "ceil", "round",
    "trunc", "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and", "logical_or", "bitwise_not",
    "to", "float", "double", "half", "bfloat16", "type", "type_as", "contiguous", "clone", "detach", "dropout",
    # a constant of the input's shape (a padding mask's query ids): taking the input's edges is conservative
    "zeros_like", "ones_like", "full_like",
}
#: Layout operations that keep every element's index along the sequence dim.
_PERMUTE = {"transpose", "permute", "movedim", "swapaxes", "swapdims", "unsqueeze", "squeeze", "expand", "expand_as", "t"}
#: Row-major reshapes: index-preserving when the elements before the sequence dim stay as many.
_RESHAPE = {"view", "reshape", "view_as", "reshape_as", "flatten", "unflatten"}
#: Operations along one dim (``dim`` argument or keyword) that must not be the sequence dim.
_ALONG_DIM = {
    "mean": 1, "sum": 1, "amax": 1, "amin": 1, "max": 1, "min": 1, "var": 1, "std": 1, "norm": 2, "logsumexp": 1,
    "softmax": 1, "log_softmax": 1, "normalize": 2, "cumsum": 1, "cumprod": 1, "prod": 1, "all": 1, "any": 1,
    "argmax": 1, "argmin": 1,
}
#: Position of the ``dim`` argument (the tensor is argument 0, for methods too).
_SPLIT = {"split": 2, "chunk": 2, "unbind": 1, "tensor_split": 2, "split_with_sizes": 2}
_CONCAT = {"cat", "concat", "concatenate", "stack"}
_MATMUL = {"matmul", "mm", "bmm", "__matmul__"}
_SIZE_ARITH = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.neg, operator.mod}
#: Comparisons of sizes (an op's argument checks, ``tuple(x.shape) != want``, leave them in the
#: graph): a boolean that depends on the length is a size like any other, refused where a
#: tensor reads it.
_SIZE_TESTS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_, operator.not_}
_QUIET = {torch._C._log_api_usage_once}


def _function_name(target: Any) -> str | None:
    """The name of a torch/functional/operator function, None for anything else."""
    name = getattr(target, "__name__", None)
    if name is None:
        return None
    for mod in (torch, F, operator, torch.special, torch._C._nn, torch._C._VariableFunctions):
        if getattr(mod, name, None) is target:
            return name.strip("_") if name.startswith("__") and name not in ("__matmul__",) else name
    return None


def _op_name(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        if node.target in (operator.getitem,):
            return "getitem"
        if node.target in (torch.ops.aten.sym_size.int,):
            return "sym_size"
        return _function_name(node.target)
    return None


def _flat(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in _flat(v)]
    if isinstance(x, dict):
        return [y for v in x.values() for y in _flat(v)]
    if isinstance(x, slice):
        return _flat([x.start, x.stop, x.step])
    return [x]


class _Analysis:
    def __init__(self, length: sympy.Symbol, global_positions: bool = False) -> None:
        self.T = length
        self.info: dict[fx.Node, Any] = {}
        self.shortest = 0  # the smallest c among sequence sizes T + c
        self.global_positions = global_positions
        self.positions: list[fx.Node] = []
        self.halos: list[fx.Node] = []

    # -- sizes ----------------------------------------------------------------------------
    def offset(self, size: Any, where: str) -> int | None:
        """``c`` if ``size == T + c``; None if it does not involve ``T``; refuses otherwise."""
        if not isinstance(size, torch.SymInt):
            return None
        expr = sympy.expand(size.node.expr)
        if self.T not in expr.free_symbols:
            return None
        c = sympy.simplify(expr - self.T)
        if not c.is_Integer:
            raise CantApply(f"{where} has a size {expr} that is not the sequence length plus a constant")
        return int(c)

    def seq_dim(self, value: Any, where: str) -> int | None:
        if not isinstance(value, torch.Tensor):
            return None
        dims = [d for d, s in enumerate(value.shape) if self.offset(s, where) is not None]
        if len(dims) > 1:
            raise CantApply(f"{where} has {len(dims)} dims along the sequence ({tuple(value.shape)})")
        if dims:
            self.shortest = min(self.shortest, self.offset(value.shape[dims[0]], where))
        return dims[0] if dims else None

    # -- nodes ----------------------------------------------------------------------------
    def input(self, node: fx.Node) -> None:
        v = example_value(node)
        if isinstance(v, torch.Tensor):
            d = self.seq_dim(v, node.name)
            if d is not None and self.offset(v.shape[d], node.name) != 0:
                raise CantApply(f"block input {node.name} has sequence length {v.shape[d]}, not the scan's {self.T}")
            self.info[node] = None if d is None else SeqValue(d, ((INPUT, 0),))
        elif isinstance(v, torch.SymInt):
            self.info[node] = _SIZE if self.T in v.node.expr.free_symbols else None
        elif isinstance(v, (int, float, bool)) or v is None:
            self.info[node] = None
        else:
            raise CantApply(f"block input {node.name} is a {type(v).__name__}")

    def node(self, node: fx.Node) -> None:
        name = _op_name(node)
        args = [a for a in _flat((node.args, node.kwargs)) if isinstance(a, fx.Node)]
        seq = [a for a in args if isinstance(self.info.get(a), (SeqValue, _Group))]
        sizes = [a for a in args if self.info.get(a) is _SIZE]
        out = example_value(node)
        if node.op == "call_function" and node.target in _QUIET:
            self.info[node] = None
            return
        if not seq and not sizes:
            # Nothing along the sequence reaches this node: the same value in every window.
            if self.seq_dim(out, node.name) is not None:
                raise CantApply(f"{node.name} creates a sequence-long tensor from nothing along the sequence")
            self.info[node] = None
            return
        if name is None:
            raise CantApply(f"{node.name} ({node.target}) has no sequence-window rule")
        if name == "getitem":
            self.info[node] = self.getitem(node, out)
            return
        if node.op == "call_function" and node.target in _SIZE_TESTS and isinstance(out, (torch.SymBool, bool)) and not seq:
            self.info[node] = _SIZE if isinstance(out, torch.SymBool) and self.T in out.node.expr.free_symbols else None
            return
        size_arith = node.op == "call_function" and node.target in _SIZE_ARITH and not isinstance(out, torch.Tensor)
        if name == "arange" and self.global_positions and not seq:
            self.info[node] = self.positions_along(node, out)
            return
        if sizes and name not in _RESHAPE and name != "expand" and not size_arith:
            raise CantApply(f"{node.name} ({name}) uses the sequence length as a value")
        if name in ("sym_size", "size") or size_arith:
            if not isinstance(out, torch.SymInt):
                raise CantApply(f"{node.name} ({name}) has no sequence-window rule for a {type(out).__name__}")
            self.info[node] = _SIZE if self.T in out.node.expr.free_symbols else None
            return
        if not seq:
            raise CantApply(f"{node.name} ({name}) makes a tensor from the sequence length")
        out_dim = self.seq_dim(out, node.name)
        if name in _SPLIT:
            self.info[node] = self.split(node, name, seq)
            return
        if not isinstance(out, torch.Tensor) or out_dim is None:
            raise CantApply(f"{node.name} ({name}) reduces or leaves the sequence dim")
        for a in seq:
            if isinstance(self.info[a], _Group):
                raise CantApply(f"{node.name} ({name}) takes a whole group of split tensors")
        vals: list[SeqValue] = [self.info[a] for a in seq]
        if name in _POINTWISE:
            for a, v in zip(seq, vals):
                av = example_value(a)
                if av.dim() - v.dim != out.dim() - out_dim:
                    raise CantApply(f"{node.name} ({name}) broadcasts {a.name}'s sequence dim onto another dim")
            self.info[node] = _union(vals, out_dim)
        elif name in _PERMUTE:
            self.info[node] = vals[0].on(out_dim)
        elif name in _RESHAPE:
            self.info[node] = self.reshape(node, name, seq[0], out, out_dim)
        elif name in _ALONG_DIM or name in ("layer_norm", "rms_norm", "group_norm"):
            self.along_dim(node, name, seq[0])
            self.info[node] = vals[0].on(out_dim)
        elif name == "embedding":
            # A table lookup per token: the token's row, wherever it stands.
            if seq[0] is not node.args[0] or len(seq) > 1:
                raise CantApply(f"{node.name} (embedding) has a sequence-long table")
            self.info[node] = vals[0].on(out_dim)
        elif name == "linear":
            x = example_value(node.args[0])
            if seq[0] is not node.args[0] or len(seq) > 1:
                raise CantApply(f"{node.name} (linear) has a sequence-long weight or bias")
            if vals[0].dim == x.dim() - 1:
                raise CantApply(f"{node.name} (linear) contracts over the sequence dim")
            self.info[node] = vals[0].on(out_dim)
        elif name in _MATMUL:
            a, b = node.args[0], node.args[1]
            for operand, contracted in ((a, lambda t: t.dim() - 1), (b, lambda t: 0 if t.dim() == 1 else t.dim() - 2)):
                v = self.info.get(operand)
                if isinstance(v, SeqValue) and v.dim == contracted(example_value(operand)):
                    raise CantApply(f"{node.name} ({name}) contracts over the sequence dim")
            self.info[node] = _union(vals, out_dim)
        elif name in _CONCAT:
            dim = _arg(node, 1, "dim", 0)
            ref = example_value(seq[0])
            nd = ref.dim() + (1 if name == "stack" else 0)
            if dim % nd == out_dim:
                # Joining an empty history with the new tokens (a key/value cache filled for
                # the first time: ``cat([tensor([]), k], dim=-2)``) is the new tokens as they are.
                others = [a for a in _flat(node.args[0]) if isinstance(a, fx.Node) and a not in seq]
                if name == "stack" or len(seq) != 1 or any(
                    not isinstance(example_value(a), torch.Tensor) or example_value(a).numel() != 0 for a in others
                ):
                    raise CantApply(f"{node.name} ({name}) joins along the sequence dim")
            self.info[node] = _union(vals, out_dim)
        elif name in ("constant_pad_nd", "pad"):
            self.info[node] = self.pad(node, name, seq[0], out_dim)
        else:
            raise CantApply(f"{node.name} ({name}) has no sequence-window rule")

    def positions_along(self, node: fx.Node, out: Any) -> SeqValue:
        """``arange(a, a + T)`` when the caller gives each window its global positions (it
        rewrites the range to start at the window's first token): a sequence input."""
        start, end = (0, node.args[0]) if len(node.args) == 1 else node.args[:2]
        step = node.args[2] if len(node.args) > 2 else node.kwargs.get("step", 1)
        if step != 1 or "start" in node.kwargs or "end" in node.kwargs:
            raise CantApply(f"{node.name} (arange) is not a range of consecutive positions")
        d = self.seq_dim(out, node.name)
        length = example_value(end) - (example_value(start) if isinstance(start, fx.Node) else start)
        if d is None or not isinstance(length, torch.SymInt) or sympy.simplify(length.node.expr - self.T) != 0:
            raise CantApply(f"{node.name} (arange) does not span exactly the sequence ({out.shape if isinstance(out, torch.Tensor) else out})")
        self.positions.append(node)
        return SeqValue(d, ((INPUT, 0),))

    def along_dim(self, node: fx.Node, name: str, x: fx.Node) -> None:
        xv = example_value(x)
        d = self.info[x].dim
        if name in ("layer_norm", "rms_norm"):
            shape = _arg(node, 1, "normalized_shape")
            k = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
            dims = list(range(xv.dim() - k, xv.dim()))
        elif name == "group_norm":
            raise CantApply(f"{node.name} (group_norm) normalises over the sequence")
        else:
            dim = _arg(node, _ALONG_DIM[name], "dim")
            if dim is None:
                raise CantApply(f"{node.name} ({name}) reduces over every dim, the sequence included")
            dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
            if not all(isinstance(x_, int) for x_ in dims):
                raise CantApply(f"{node.name} ({name}) has a dim that is not a constant")
            dims = [x_ % xv.dim() for x_ in dims]
        if d in dims:
            raise CantApply(f"{node.name} ({name}) works along the sequence dim")

    def reshape(self, node: fx.Node, name: str, x: fx.Node, out: torch.Tensor, out_dim: int) -> SeqValue:
        xv = example_value(x)
        d = self.info[x].dim
        if self.offset(out.shape[out_dim], node.name) != self.offset(xv.shape[d], node.name):
            raise CantApply(f"{node.name} ({name}) changes the sequence dim's size")
        before_in = sympy.expand(math.prod(s.node.expr if isinstance(s, torch.SymInt) else s for s in xv.shape[:d]))
        before_out = sympy.expand(math.prod(s.node.expr if isinstance(s, torch.SymInt) else s for s in out.shape[:out_dim]))
        if sympy.simplify(before_in - before_out) != 0:
            raise CantApply(f"{node.name} ({name}) moves elements across the sequence dim")
        return self.info[x].on(out_dim)

    def split(self, node: fx.Node, name: str, seq: list[fx.Node]) -> _Group:
        x = seq[0]
        if x is not node.args[0]:
            raise CantApply(f"{node.name} ({name}) splits by sequence-long sizes")
        xv = example_value(x)
        dim = _arg(node, _SPLIT[name], "dim", 0)
        if not isinstance(dim, int) or dim % xv.dim() == self.info[x].dim:
            raise CantApply(f"{node.name} ({name}) splits along the sequence dim")
        return _Group(self.info[x].left, self.info[x].right)

    def pad(self, node: fx.Node, name: str, x: fx.Node, out_dim: int) -> SeqValue:
        if name == "pad" and _arg(node, 2, "mode", "constant") != "constant":
            raise CantApply(f"{node.name} pads with mode {_arg(node, 2, 'mode')!r}: only constant padding keeps the window exact")
        pads = list(_arg(node, 1, "pad"))
        xv = example_value(x)
        k = xv.dim() - 1 - self.info[x].dim
        left = pads[2 * k] if 2 * k < len(pads) else 0
        right = pads[2 * k + 1] if 2 * k + 1 < len(pads) else 0
        if not isinstance(left, int) or not isinstance(right, int):
            raise CantApply(f"{node.name} pads the sequence by a non-constant amount")
        if left > 0 and self.global_positions:
            # The window gets the tokens before it in place of the zeros (a halo exchange by
            # the caller): a zero padding at the sequence's start, exact at every window.
            value = _arg(node, 2 if name == "constant_pad_nd" else 3, "value", 0)
            if value not in (0, 0.0, None):
                raise CantApply(f"{node.name} pads the sequence's start with {value}, not zeros")
            self.halos.append(node)
            left = 0
        return self.info[x].moved(out_dim, left, right)

    def getitem(self, node: fx.Node, out: Any) -> Any:
        base, index = node.args
        src = self.info.get(base)
        if isinstance(src, _Group):
            d = self.seq_dim(out, node.name)
            if d is None:
                raise CantApply(f"{node.name} takes a piece without the sequence dim from a split")
            return SeqValue(d, src.left, src.right)
        if src is _SIZE or isinstance(example_value(base), (tuple, list, torch.Size)):
            raise CantApply(f"{node.name} indexes a size or tuple along the sequence")
        if not isinstance(src, SeqValue):
            raise CantApply(f"{node.name} uses the sequence length to index a tensor without the sequence dim")
        return self.index(node, base, index, src, out)

    def index(self, node: fx.Node, base: fx.Node, index: Any, src: SeqValue, out: Any) -> SeqValue:
        items = list(index) if isinstance(index, tuple) else [index]
        ndim = example_value(base).dim()
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in items:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (ndim - used))
            else:
                expanded.append(i)
        dim = 0
        shift = 0
        for i in expanded:
            if i is None:
                continue
            if isinstance(i, fx.Node) or not isinstance(i, (int, slice)):
                raise CantApply(f"{node.name} indexes with a tensor or a computed index")
            if dim == src.dim:
                if isinstance(i, int):
                    raise CantApply(f"{node.name} picks one position along the sequence")
                start, step = i.start, i.step
                if step not in (None, 1):
                    raise CantApply(f"{node.name} slices the sequence with step {step}")
                if isinstance(start, fx.Node) or (start is not None and not isinstance(start, int)):
                    raise CantApply(f"{node.name} slices the sequence from a computed start")
                if start is not None and start < 0:
                    raise CantApply(f"{node.name} slices the sequence from its end")
                if isinstance(i.stop, fx.Node) and self.info.get(i.stop) is not _SIZE and self.info.get(i.stop) is not None:
                    raise CantApply(f"{node.name} slices the sequence to a computed end")
                shift = start or 0
            else:
                for b in (i.start, i.stop, i.step) if isinstance(i, slice) else ():
                    if isinstance(b, fx.Node) and self.info.get(b) is _SIZE:
                        raise CantApply(f"{node.name} uses the sequence length to slice another dim")
            dim += 1
        out_dim = self.seq_dim(out, node.name)
        if out_dim is None:
            raise CantApply(f"{node.name} drops the sequence dim")
        # Leading indices cut: ``start``; trailing: what the length lost beyond that.
        cut_end = self.offset(example_value(base).shape[src.dim], node.name) - shift - self.offset(out.shape[out_dim], node.name)
        return src.moved(out_dim, -shift, -cut_end)


@dataclass(frozen=True)
class CarrySite:
    """A node of the region whose output at ``t`` summarises the sequence up to ``t`` through a
    carry the caller runs chunk by chunk (a scan's state, an attention's K/V history).

    Attributes:
        node: the node.
        args: its positional arguments.
        seq_args: the arguments that run along the sequence, by position, with the dim they
            run along (as the op reads them).
        output: which result of the node runs along the sequence (the others must be unused).
        what: the node's kind (``"scan"``, ``"ssd"``, ``"attention"``): which windowed form
            runs it, and for messages.
        reach: tokens before a chunk that the windowed form itself reads (an SSD with
            documents compares the chunk's first document index with the one before it); the
            halo is at least this.
    """

    node: fx.Node
    args: tuple
    seq_args: dict[int, int]
    output: int = 0
    what: str = SCAN
    reach: int = 0


def analyse_window(nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node], carries: list[CarrySite],
                   global_positions: bool = False) -> WindowAnalysis:
    """Prove the region ``nodes`` (topological order) can run window by window, or refuse.

    Args:
        nodes, inputs, outputs: the region, the values it reads, the values used after it.
        global_positions: the caller gives each window its global positions: ``arange`` over
            the sequence is a sequence input (listed in ``positions``, for the caller to
            offset), a zero padding of a sequence's start is filled by the caller with the
            tokens before the window (listed in ``halos``), and outputs that do not depend on
            the sequence may leave the region.
        carries: the region's carry nodes (none: a purely token-wise region, whose sequence
            length is the one dynamic size of its inputs). The caller computes each one's output for the
            window's own tokens only (its carry bringing in the earlier ones) and pads it with
            ``hc`` leading zeros; that output is the source ``"<what><i>"``, and every carry
            input and region output must read it at its own position only.
    """
    if carries:
        first = carries[0]
        pos0 = min(first.seq_args)
        u = example_value(first.args[pos0])
        length = u.shape[first.seq_args[pos0]]
        if not isinstance(length, torch.SymInt) or not isinstance(length.node.expr, sympy.Symbol):
            raise CantApply(f"the sequence length is not a symbol of the captured graph ({length}); the graph is not dynamic in it")
    else:
        # A purely token-wise region: the sequence is the one dynamic size of its inputs.
        symbols = {d.node.expr: d for a in inputs if isinstance(v := example_value(a), torch.Tensor)
                   for d in v.shape if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol)}
        if len(symbols) != 1:
            raise CantApply(f"the region's inputs have {len(symbols)} dynamic sizes, not one sequence length")
        length = next(iter(symbols.values()))
    an = _Analysis(length.node.expr, global_positions)
    for a in inputs:
        an.input(a)
    if not any(isinstance(an.info[a], SeqValue) for a in inputs):
        raise CantApply("no block input runs along the sequence")
    sites = {c.node: (i, c) for i, c in enumerate(carries)}
    sources = [f"{c.what}{i}" for i, c in enumerate(carries)]
    carry_inputs: list[tuple[CarrySite, SeqValue]] = []
    for n in nodes:
        if n in sites:
            i, site = sites[n]
            for pos, arg in enumerate(site.args):
                v = an.info.get(arg) if isinstance(arg, fx.Node) else None
                if pos in site.seq_args:
                    ev = example_value(arg)
                    if not isinstance(v, SeqValue) or v.dim != site.seq_args[pos] % ev.dim():
                        raise CantApply(f"{site.what} argument {pos} ({getattr(arg, 'name', arg)}) is not along the sequence where the {site.what} reads it")
                    if an.offset(ev.shape[v.dim], n.name) != 0:
                        raise CantApply(f"{site.what} argument {pos} has length {ev.shape[v.dim]}, not {length}")
                    carry_inputs.append((site, v))
                elif isinstance(v, (SeqValue, _Group)) or v is _SIZE:
                    raise CantApply(f"{site.what} argument {pos} ({arg.name}) depends on the sequence")
            for user in n.users:
                if not (user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int)):
                    raise CantApply(f"{user.name} uses the {site.what}'s result other than by index")
                if user.args[1] != site.output and user.users:
                    raise CantApply(f"the {site.what}'s output {user.args[1]} (not its per-token output) is used")
            an.info[n] = ("carry", i)
            continue
        src = an.info.get(n.args[0]) if n.op == "call_function" and n.target is operator.getitem and n.args else None
        if isinstance(src, tuple) and src[0] == "carry":
            site = carries[src[1]]
            out = example_value(n)
            an.info[n] = SeqValue(an.seq_dim(out, n.name), ((sources[src[1]], 0),)) if n.args[1] == site.output else None
            continue
        an.node(n)
    halo = max((c.reach for c in carries), default=0)
    for site, v in carry_inputs:
        if v.right > 0:
            raise CantApply(f"the {site.what}'s inputs look up to {v.right} tokens ahead")
        for src in sources:
            if (v.left_of(src) or 0) > 0:
                raise CantApply(f"the {site.what}'s inputs read {src}'s output at {v.left_of(src)} earlier positions, which a window does not hold")
        halo = max(halo, v.left_of(INPUT) or 0)
    output_dims: list[int] = []
    for o in outputs:
        v = an.info.get(o)
        if v is None and global_positions:
            continue  # the same value in every window
        if not isinstance(v, SeqValue):
            raise CantApply(f"{o.name} leaves the block without a sequence dim")
        if an.offset(example_value(o).shape[v.dim], o.name) != 0:
            raise CantApply(f"{o.name} leaves the block with length {example_value(o).shape[v.dim]}, not {length}")
        if v.right > 0:
            raise CantApply(f"{o.name} looks up to {v.right} tokens ahead of its position")
        halo = max(halo, v.left_of(INPUT) or 0)
        for i, src in enumerate(sources):
            if (v.left_of(src) or 0) > 0:
                raise CantApply(f"{o.name} mixes the {carries[i].what}'s output across positions (it reads {v.left_of(src)} earlier outputs)")
        output_dims.append(v.dim)
    return WindowAnalysis(
        length=length.node.expr,
        halo=halo,
        min_length=max(1, 1 - an.shortest),
        input_dims={a: an.info[a].dim for a in inputs if isinstance(an.info[a], SeqValue)},
        size_inputs={a: sympy.sympify(example_value(a).node.expr) for a in inputs if an.info[a] is _SIZE},
        output_dims=output_dims,
        positions=an.positions,
        halos=an.halos,
    )

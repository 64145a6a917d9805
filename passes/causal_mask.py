"""Prove that a mask computed in the graph is the causal mask, for every sequence length.

Models rarely pass ``is_causal=True``; they build a mask from index comparisons —
``transformers`` spells it as::

    q_idx  = arange(T) + 0                     # [T]
    kv_idx = arange(S) + 0                     # [S]
    keep   = kv_idx[None, None, None, :] <= q_idx[None, None, :, None]   # [1, 1, T, S]
    mask   = where(keep.expand(B, -1, T, S), 0.0, finfo.min)             # additive

A chunked attention op can only replace such a mask if it is *exactly* causal: not a sliding
window, not a padding mask, not shifted by a cache offset. We prove it by abstract
interpretation of the subgraph that computes the mask: every tensor becomes a symbolic
function of its element indices (sympy expressions in integer index symbols). Index-valued
tensors come from ``arange``; comparisons give boolean formulas; ``where``/``masked_fill``
give piecewise values. The mask then is a formula ``keep(i, j)`` in the query index ``i`` and
key index ``j``. Writing ``j = i + d``, the formula must not depend on ``i`` (or on batch/
head indices) at all, and as a predicate in ``d`` built from affine atoms its truth value
can change only at the atoms' thresholds; checking it on every integer between (and around)
the thresholds decides ``keep ⇔ d ≤ 0`` for all integers. That is a proof for every ``T``,
not a test at one size.

Anything outside the modelled ops (a mask read from a tensor input, e.g. a padding mask;
``vmap``-built masks; arithmetic we do not model) makes :func:`prove_causal` raise
:class:`NotProvable` with the reason, and the pass refuses.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx

from longctx_compiler.passes.fx_utils import example_value

__all__ = ["NotProvable", "prove_causal", "MASKED_THRESHOLD"]

#: An additive mask value at or below this removes a score exactly: softmax's
#: ``exp(score + m - rowmax)`` underflows to 0 in every float dtype for any score of
#: magnitude below 1e29 (transformers uses ``finfo(dtype).min``; others use ``-inf``).
MASKED_THRESHOLD = -1e30


class NotProvable(Exception):
    """The mask could not be proven causal; the message says why."""


@dataclass
class _Sym:
    """A tensor as a function of its indices.

    ``rank`` is the tensor's rank; ``fn`` maps a list of ``rank`` sympy index expressions to
    the element (a sympy number/expression, or a sympy boolean). ``size_one`` marks dims of
    size 1, whose index the function ignores (so broadcasting is just re-indexing).
    """

    rank: int
    fn: Callable[[list], Any]
    size_one: tuple[bool, ...]


def _const(value: Any) -> _Sym:
    v = sympy.true if value is True else sympy.false if value is False else sympy.sympify(value)
    return _Sym(0, lambda idx: v, ())


def _broadcast(a: _Sym, b: _Sym) -> tuple[int, Callable, Callable, tuple[bool, ...]]:
    rank = max(a.rank, b.rank)

    def view(s: _Sym) -> Callable:
        pad = rank - s.rank
        return lambda idx: s.fn(idx[pad:])

    ones_a = (True,) * (rank - a.rank) + a.size_one
    ones_b = (True,) * (rank - b.rank) + b.size_one
    return rank, view(a), view(b), tuple(x and y for x, y in zip(ones_a, ones_b))


def _binary(a: _Sym, b: _Sym, op: Callable[[Any, Any], Any]) -> _Sym:
    rank, fa, fb, ones = _broadcast(a, b)
    return _Sym(rank, lambda idx: op(fa(idx), fb(idx)), ones)


def _shape_of(node: Any) -> tuple | None:
    val = example_value(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _is_one(size: Any) -> bool:
    return isinstance(size, int) and size == 1


_REL = {
    operator.le: sympy.Le, torch.le: sympy.Le, "le": sympy.Le,
    operator.lt: sympy.Lt, torch.lt: sympy.Lt, "lt": sympy.Lt,
    operator.ge: sympy.Ge, torch.ge: sympy.Ge, "ge": sympy.Ge,
    operator.gt: sympy.Gt, torch.gt: sympy.Gt, "gt": sympy.Gt,
    operator.eq: sympy.Eq, torch.eq: sympy.Eq, "eq": sympy.Eq,
    operator.ne: sympy.Ne, torch.ne: sympy.Ne, "ne": sympy.Ne,
}
_ARITH = {
    operator.add: operator.add, torch.add: operator.add, "add": operator.add,
    operator.sub: operator.sub, torch.sub: operator.sub, "sub": operator.sub,
}
_LOGIC = {
    operator.and_: sympy.And, torch.logical_and: sympy.And, "logical_and": sympy.And, "__and__": sympy.And,
    operator.or_: sympy.Or, torch.logical_or: sympy.Or, "logical_or": sympy.Or, "__or__": sympy.Or,
}


class _Interpreter:
    def __init__(self) -> None:
        self.memo: dict[fx.Node, _Sym] = {}

    def value(self, x: Any) -> _Sym:
        if isinstance(x, fx.Node):
            if x not in self.memo:
                self.memo[x] = self.node(x)
            return self.memo[x]
        if isinstance(x, (bool, int, float)):
            return _const(x)
        raise NotProvable(f"mask uses a constant of type {type(x).__name__}")

    def node(self, n: fx.Node) -> _Sym:
        if n.op == "placeholder":
            raise NotProvable(f"the mask reads the input tensor {n.name!r} (a padding or document mask?)")
        if n.op not in ("call_function", "call_method"):
            raise NotProvable(f"the mask is computed by {n.op} {n.target}")
        t = n.target
        key = t if n.op == "call_function" else t
        if key is torch.arange:
            return self.arange(n)
        if key in (torch.zeros, torch.ones, torch.full, torch.tensor, torch.scalar_tensor):
            return self.filled(n)
        if key in _REL:
            return _binary(self.value(n.args[0]), self.value(n.args[1]), lambda a, b, r=_REL[key]: r(a, b))
        if key in _ARITH:
            if n.kwargs.get("alpha", 1) != 1:
                raise NotProvable("arithmetic with alpha in the mask")
            return _binary(self.value(n.args[0]), self.value(n.args[1]), _ARITH[key])
        if key in _LOGIC:
            return _binary(self.value(n.args[0]), self.value(n.args[1]), lambda a, b, f=_LOGIC[key]: f(a, b))
        if key in (operator.invert, torch.logical_not, torch.bitwise_not, "logical_not", "__invert__", "bitwise_not"):
            a = self.value(n.args[0])
            return _Sym(a.rank, lambda idx: sympy.Not(a.fn(idx)), a.size_one)
        if key is operator.getitem:
            return self.getitem(n)
        if key in ("unsqueeze", torch.unsqueeze):
            return self.unsqueeze(n)
        if key in ("expand", "expand_as", "contiguous", "clone", torch.clone):
            a = self.value(n.args[0])
            shape = _shape_of(n)
            if shape is None:
                raise NotProvable("unknown shape in the mask")
            pad = len(shape) - a.rank
            ones = tuple(_is_one(s) for s in shape)
            return _Sym(len(shape), lambda idx: a.fn(idx[pad:]), ones)
        if key in (torch.where, "where"):
            return self.where(n)
        if key in ("masked_fill", torch.masked_fill):
            x, cond, fill = (self.value(a) for a in n.args[:3])
            return self.where_values(cond, fill, x)
        if key in ("to", "float", "double", "half", "bfloat16", "bool", "type_as"):
            return self.cast(n)
        raise NotProvable(f"the mask is built with {getattr(t, '__name__', t)}, which the causal-mask prover does not model")

    def arange(self, n: fx.Node) -> _Sym:
        args = [a for a in n.args]
        if len(args) == 1:
            start, step = 0, 1
        elif len(args) == 2:
            start, step = args[0], 1
        else:
            start, step = args[0], args[2]
        start = n.kwargs.get("start", start)
        step = n.kwargs.get("step", step)
        if not isinstance(start, int) or not isinstance(step, int):
            raise NotProvable("arange with a start or step only known at run time (a cache offset?)")
        return _Sym(1, lambda idx: start + step * idx[0], (False,))

    def filled(self, n: fx.Node) -> _Sym:
        val = example_value(n)
        if n.target is torch.full:
            fill = n.args[1] if len(n.args) > 1 else n.kwargs.get("fill_value")
        elif n.target is torch.zeros:
            fill = 0
        elif n.target is torch.ones:
            fill = 1
        else:
            data = n.args[0] if n.args else None
            if not isinstance(data, (int, float, bool)):
                raise NotProvable("a tensor literal with several values in the mask")
            fill = data
        if not isinstance(fill, (int, float, bool)):
            raise NotProvable("a fill value only known at run time in the mask")
        rank = val.dim() if isinstance(val, torch.Tensor) else 0
        ones = tuple(_is_one(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()
        c = _const(fill)
        return _Sym(rank, lambda idx: c.fn([]), ones)

    def getitem(self, n: fx.Node) -> _Sym:
        a = self.value(n.args[0])
        index = n.args[1]
        index = index if isinstance(index, tuple) else (index,)
        # Expand an Ellipsis into full slices.
        if any(i is Ellipsis for i in index):
            k = index.index(Ellipsis)
            consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
            index = index[:k] + (slice(None),) * (a.rank - consumed) + index[k + 1 :]
        mapping: list[int | None] = []  # output dim -> input dim (None: new size-1 dim)
        in_dim = 0
        for i in index:
            if i is None:
                mapping.append(None)
            elif isinstance(i, slice) and i == slice(None, None, None):
                mapping.append(in_dim)
                in_dim += 1
            else:
                raise NotProvable(f"indexing the mask with {i!r}")
        while in_dim < a.rank:
            mapping.append(in_dim)
            in_dim += 1

        def fn(idx, mapping=mapping):
            src = [sympy.Integer(0)] * a.rank
            for out_d, in_d in enumerate(mapping):
                if in_d is not None:
                    src[in_d] = idx[out_d]
            return a.fn(src)

        ones = tuple(True if m is None else a.size_one[m] for m in mapping)
        return _Sym(len(mapping), fn, ones)

    def unsqueeze(self, n: fx.Node) -> _Sym:
        a = self.value(n.args[0])
        d = n.args[1] if len(n.args) > 1 else n.kwargs["dim"]
        d = d if d >= 0 else d + a.rank + 1
        ones = a.size_one[:d] + (True,) + a.size_one[d:]
        return _Sym(a.rank + 1, lambda idx: a.fn(list(idx[:d]) + list(idx[d + 1 :])), ones)

    def where(self, n: fx.Node) -> _Sym:
        if len(n.args) < 3:
            raise NotProvable("torch.where with one argument in the mask")
        cond, x, y = (self.value(a) for a in n.args[:3])
        return self.where_values(cond, x, y)

    def where_values(self, cond: _Sym, x: _Sym, y: _Sym) -> _Sym:
        rank, fc, fx_, ones = _broadcast(cond, x)
        c2 = _Sym(rank, fc, ones)
        x2 = _Sym(rank, fx_, ones)
        rank, fcx, fy, ones = _broadcast(c2, y)
        _, fxx, _, _ = _broadcast(x2, y)
        return _Sym(rank, lambda idx: sympy.Piecewise((fxx(idx), fcx(idx)), (fy(idx), True)), ones)

    def cast(self, n: fx.Node) -> _Sym:
        a = self.value(n.args[0])
        out = example_value(n)
        if isinstance(out, torch.Tensor) and out.dtype == torch.bool:
            return _Sym(a.rank, lambda idx: sympy.Ne(a.fn(idx), 0), a.size_one)
        if isinstance(out, torch.Tensor) and out.dtype.is_floating_point:

            def fn(idx):
                v = a.fn(idx)
                return sympy.Piecewise((1, v), (0, True)) if isinstance(v, sympy.logic.boolalg.Boolean) else v

            return _Sym(a.rank, fn, a.size_one)
        return a


def prove_causal(mask: fx.Node, *, additive: bool) -> None:
    """Prove that ``mask`` (``[..., T, S]``) is the top-left-aligned causal mask.

    Args:
        mask: the node computing the mask.
        additive: True for a float mask added to the scores (kept: 0, removed: a value at
            or below :data:`MASKED_THRESHOLD`), False for a boolean mask (True = keep).
    Raises:
        NotProvable: with the reason, when the mask is not (provably) causal.
    """
    sym = _Interpreter().value(mask)
    if sym.rank < 2:
        raise NotProvable("the mask has fewer than 2 dims")
    idx = [sympy.Symbol(f"x{k}", integer=True, nonnegative=True) for k in range(sym.rank)]
    i, j = idx[-2], idx[-1]
    d = sympy.Symbol("d", integer=True)
    expr = sympy.simplify(sym.fn(idx).subs(j, i + d))
    extra = expr.free_symbols - {d}
    if extra:
        raise NotProvable("the mask depends on more than the query-key distance (a window, batch- or head-dependent mask)")
    thresholds = _thresholds(expr, d)
    lo, hi = min(thresholds + [0]) - 2, max(thresholds + [0]) + 2
    for dv in range(lo, hi + 1):
        value = expr.subs(d, dv)
        keep_expected = dv <= 0
        if additive:
            v = float(value) if value.is_number else None
            if v is None:
                raise NotProvable("the mask value is not a number")
            kept = v == 0.0
            removed = v <= MASKED_THRESHOLD or v == -math.inf
            if not (kept or removed):
                raise NotProvable(f"the mask adds {v} to some scores (only 0 and -inf-like values are exact masking)")
            ok = kept == keep_expected
        else:
            if value not in (sympy.true, sympy.false):
                raise NotProvable("the boolean mask does not reduce to True/False")
            ok = (value == sympy.true) == keep_expected
        if not ok:
            raise NotProvable(f"the mask is not causal (differs at key - query = {dv})")


def _thresholds(expr: Any, d: sympy.Symbol) -> list[int]:
    # Every relational atom is affine in d (we only model +, -, comparisons of aranges):
    # its truth value flips at one point, so the predicate is constant between thresholds.
    points = []
    for atom in expr.atoms(sympy.core.relational.Relational):
        diff = sympy.expand(atom.lhs - atom.rhs)
        poly = sympy.Poly(diff, d) if diff.has(d) else None
        if poly is None:
            continue
        if poly.degree() != 1:
            raise NotProvable("the mask compares non-affine index expressions")
        a, c = poly.all_coeffs()
        points.append(math.floor(-c / a))
    return [int(p) for p in points]

"""Prove that a mask computed in the graph is the causal mask, for every sequence length.

Models rarely pass ``is_causal=True``; they build a mask from index comparisons.
``transformers`` (5.x) spells it two ways. With a KV cache (``use_cache=True``)::

    q_idx  = arange(T) + 0                     # [T]
    kv_idx = arange(S) + 0                     # [S]
    keep   = kv_idx[None, None, None, :] <= q_idx[None, None, :, None]   # [1, 1, T, S]
    mask   = where(keep.expand(B, -1, T, S), 0.0, finfo.min)             # additive

Without one (``use_cache=False``: HF ``Trainer``, TRL, gradient checkpointing) it first looks
for packed sequences in the positions and then combines per-element predicates::

    pos    = (arange(T) + 0)[None].expand(B, -1)                          # position_ids
    packed = (diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)  # document ids
    b, q, kv = arange(B)[:, None, None, None], q_idx[None, None, :, None], kv_idx[None, None, None, :]
    keep   = q.new_ones((), dtype=bool) & (pos[b, kv] <= pos[b, q]).to(dev) & (packed[b, q] == packed[b, kv]).to(dev)
    keep   = keep.expand(B, -1, T, S)

A chunked attention op can only replace such a mask if it is *exactly* causal: not a sliding
window, not a padding mask, not shifted by a cache offset. We prove it by abstract
interpretation of the subgraph that computes the mask: every tensor becomes a symbolic
function of its element indices (sympy expressions in integer index symbols), with its shape
and dtype taken from the values Dynamo recorded.

* **Shapes are exact.** A dim of size 1 is read at index 0, whatever index the consumer
  asks for (broadcasting, ``expand``, an ``arange(1)`` put where the queries go); a dim is
  re-indexed only where its size is provably equal to the consumer's, otherwise the proof
  stops. Indexing is modelled as torch does it: slices (start + step·k), ``None``, integers,
  and advanced indexing by integer index tensors (a gather by their values, which must be
  provably non-negative).
* **Values are exact.** Index arithmetic (from ``arange``) stays symbolic only where it is
  exact: integer or float64 tensors with integer values. Everything else is computed on
  concrete numbers by the real torch op on tensors of the same dtypes and ranks, so type
  promotion and rounding (``finfo.min`` in float16 is ``-inf``, ``x.bfloat16()``) are
  torch's own. ``where``/``masked_fill``/``tril``/``triu`` give piecewise values; casts to
  bool compare with 0; ``diff`` (with ``prepend``/``append``) is piecewise along its dim;
  ``cumsum`` is modelled only where it can be proven: a summand that is 0 for every index
  (the packed-sequence ids of plain ``arange`` positions) or the same constant for every
  index (integer dtypes).
* **In-place writes** into a tensor of the mask (``mask.masked_fill_(...)``, the older
  ``transformers`` spelling) are folded in graph order when every read comes after them;
  writes through views, or reads before a write, stop the proof.

The mask then is a formula ``keep(i, j)`` in the query index ``i`` and key index ``j``.
Writing ``j = i + d``, the formula must not depend on ``i`` (or on batch/head indices) at
all; its relational atoms must be affine in ``d``, so their truth values change only next
to their thresholds. The integers split into finitely many intervals on which every atom is
constant; on each we check ``keep ⇔ d ≤ 0`` (a value that varies inside an interval stops
the proof). That is a proof for every ``T``, not a test at one size.

**Graph inputs** (:func:`prove_mask`). An integer ``[B, T]`` input is read as unknown values
(one uninterpreted function per input) in two roles only:

* *packed positions*: a cumsum over it must be transformers' document numbering (a break
  wherever a position is not its predecessor + 1), the mask must keep a pair only if the two
  document ids agree, and inside one document (where ``pos[t] − t`` is constant) the rest
  must be causal or a band for every ``T``;
* *key padding*: read only at the key, only as "nonzero", and every pair with a padded key
  removed.

The result (:class:`MaskProof`) names the document-id node and the padding input for the op.
Anything outside the modelled ops (``vmap``-built masks, arithmetic we do not model) raises
:class:`NotProvable` with the reason, and the pass refuses; a mask that reads an input some
other way is refused with the input named by what it is (the ``attention_mask``, the
caller's ``position_ids``, the token ids, a module buffer).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, Iterable, Sequence

import sympy
import torch
import torch.fx as fx
from sympy.core.relational import Relational
from torch.fx.experimental.symbolic_shapes import statically_known_true

from longctx_compiler.dynamo_names import readable_input_name
from longctx_compiler.passes.analysis.fx_utils import example_value, writes_in_place

__all__ = ["NotProvable", "MaskProof", "prove_causal", "prove_band", "prove_mask", "mask_inputs", "MASKED_THRESHOLD"]

#: An additive mask value at or below this removes a score exactly: softmax's
#: ``exp(score + m - rowmax)`` underflows to 0 in every float dtype for any score of
#: magnitude below 1e29 (transformers uses ``finfo(dtype).min``; others use ``-inf``).
MASKED_THRESHOLD = -1e30


class NotProvable(Exception):
    """The mask could not be proven causal; the message says why."""


@dataclasses.dataclass(frozen=True)
class MaskProof:
    """What a proven mask keeps: ``j ≤ i`` (``window`` None) or ``i − window < j ≤ i``, and,
    with ``documents``, only pairs of one document.

    ``documents`` is the graph node computing the document ids ``[B' , T]`` (transformers'
    packed-sequence numbering of the caller's positions); ``document_row`` is None when row
    ``b`` of the batch reads row ``b`` of it, or the one row every batch row reads.
    """

    window: int | None = None
    documents: fx.Node | None = None
    document_row: int | None = None
    #: The input marking real keys (nonzero) and padded ones (0), ``[B', S]``, and its one row
    #: read by every batch row (None: row ``b`` for batch row ``b``).
    key_padding: fx.Node | None = None
    key_padding_row: int | None = None


class _InputRead(sympy.Function):
    """``input[r, t]``: an element of an integer graph input (a position the caller passed,
    an ``attention_mask`` entry), value unknown. Each input gets its own subclass."""

    is_integer = True
    is_number = False  # not a constant even at constant indices (sympy's default for numeric args)


def _reads(expr: Any, cls: type | None = None) -> set:
    """The input elements ``expr`` reads (of input class ``cls`` only, if given)."""
    if not isinstance(expr, sympy.Basic):
        return set()
    found = {a for a in expr.atoms(sympy.Function) if isinstance(a, _InputRead)}
    return found if cls is None else {a for a in found if a.func is cls}


class _Document(sympy.Function):
    """``documents[r, t]``: the number of position breaks (steps other than +1) in
    ``positions[r, 1..t]``, transformers' packed-sequence id of token ``t`` in row ``r``."""

    is_integer = True
    is_number = False


# -- values ------------------------------------------------------------------------------------
#
# An element value is a sympy object: a Boolean (bool tensors) or a number/expression
# (integer and float tensors). Numbers are exact images of the dtype's values (a float16
# tensor's elements are float16 values); symbolic expressions are integer-valued polynomials
# in the index symbols, kept only in dtypes where they are exact. Piecewise/ITE select among
# such leaves by conditions on the indices.

_TRUE, _FALSE = sympy.true, sympy.false
_ZERO = sympy.Integer(0)
#: dtypes in which integer index arithmetic is exact for any realistic length.
_EXACT_INDEX_DTYPES = (torch.int64, torch.int32, torch.float64)
_INT_LIMIT = 2**40  # index offsets beyond this are refused (int64 overflow is not modelled)


def _is_bool(v: Any) -> bool:
    return isinstance(v, sympy.logic.boolalg.Boolean) and not isinstance(v, sympy.Expr)


def _num(x: Any) -> Any:
    """A Python scalar as an exact sympy value."""
    if isinstance(x, bool):
        return _TRUE if x else _FALSE
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, float):
        if math.isnan(x):
            return sympy.nan
        if math.isinf(x):
            return sympy.oo if x > 0 else -sympy.oo
        if x == int(x) and abs(x) < 2**53:
            return sympy.Integer(int(x))
        return sympy.Float(x)  # the exact binary value (53-bit precision)
    raise NotProvable(f"the mask uses a constant of type {type(x).__name__}")


def _py(v: Any) -> Any:
    """A numeric sympy leaf as a Python scalar (exactly)."""
    if v is _TRUE or v is _FALSE:
        return bool(v)
    if v is sympy.nan:
        return math.nan
    if v is sympy.oo:
        return math.inf
    if v is -sympy.oo:
        return -math.inf
    if isinstance(v, sympy.Integer):
        return int(v)
    if isinstance(v, sympy.Float):
        return float(v)
    raise NotProvable(f"the mask computes the non-representable value {v}")


def _is_number(v: Any) -> bool:
    return v is _TRUE or v is _FALSE or (isinstance(v, sympy.Expr) and v.is_number)


def _select(pairs: Sequence[tuple[Any, Any]]) -> Any:
    """The first value whose condition holds (the last condition must be True)."""
    pairs = [(v, c) for v, c in pairs if c is not _FALSE]
    if not pairs:
        raise NotProvable("internal: an empty case split")
    if pairs[0][1] is _TRUE or all(v == pairs[0][0] for v, _ in pairs):
        return pairs[0][0]
    if all(_is_bool(v) for v, _ in pairs):
        out = pairs[-1][0]
        for v, c in reversed(pairs[:-1]):
            out = sympy.ITE(c, v, out)
        return out
    if any(_is_bool(v) for v, _ in pairs):
        raise NotProvable("internal: a case split mixing booleans and numbers")
    return sympy.Piecewise(*pairs)


def _lift(f: Callable[..., Any], *vals: Any) -> Any:
    """Apply ``f`` to the leaves of ``vals``, distributing over Piecewise values."""
    for k, v in enumerate(vals):
        if isinstance(v, sympy.Expr) and v.has(sympy.Piecewise):
            v = sympy.piecewise_fold(v)
            if isinstance(v, sympy.Piecewise):
                return _select([(_lift(f, *vals[:k], e, *vals[k + 1 :]), c) for e, c in v.args])
            raise NotProvable("internal: a nested case split the prover cannot lift")
    return f(*vals)


def _normalize(v: Any) -> Any:
    """Rewrite every relation ``a op b`` as ``expand(a - b) op 0`` (so equal index
    expressions cancel: ``i + d <= i`` becomes ``d <= 0``) and let sympy re-evaluate."""
    if not isinstance(v, sympy.Basic):
        return v
    rels = v.atoms(Relational)
    if not rels:
        return v
    return v.xreplace({r: r.func(sympy.expand(r.lhs - r.rhs), 0) for r in rels})


# -- shapes ------------------------------------------------------------------------------------


def _is_one(size: Any) -> bool:
    if isinstance(size, int):
        return size == 1
    if isinstance(size, torch.SymInt):
        return statically_known_true(size == 1)
    return False


def _same_size(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def _size_expr(size: Any) -> Any:
    if isinstance(size, int):
        return sympy.Integer(size)
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    raise NotProvable(f"a size of type {type(size).__name__}")


class _Sym:
    """A tensor as a function of its indices.

    ``shape``/``dtype`` are the tensor's (Python scalars: shape ``()`` and their Python type,
    which takes part in type promotion as torch's "weak" scalars do). ``fn`` maps a list of
    ``rank`` sympy index expressions to the element. Call :meth:`at`, never ``fn``: it reads
    every dim of size 1 (``size_one``) at index 0, whatever index the consumer passes: that
    is what broadcasting and ``expand`` do.
    """

    __slots__ = ("shape", "dtype", "fn", "size_one", "_memo")

    def __init__(self, shape: Sequence[Any], dtype: Any, fn: Callable[[list], Any]) -> None:
        self.shape = tuple(shape)
        self.dtype = dtype
        self.fn = fn
        self.size_one = tuple(_is_one(s) for s in self.shape)
        self._memo: dict[tuple, Any] = {}

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.dtype, torch.dtype)

    def at(self, idx: Sequence[Any]) -> Any:
        if len(idx) != self.rank:
            raise NotProvable(f"internal: indexing a {self.rank}-D value with {len(idx)} indices")
        key = tuple(_ZERO if one else sympy.sympify(x) for x, one in zip(idx, self.size_one))
        if key not in self._memo:
            self._memo[key] = self.fn(list(key))
        return self._memo[key]


def _scalar(value: Any) -> _Sym:
    v = _num(value)
    return _Sym((), type(value), lambda idx: v)


def _dummy(s: _Sym, value: Any = 0) -> Any:
    """A concrete stand-in with ``s``'s dtype and rank (what type promotion looks at)."""
    if s.is_tensor:
        return torch.full((1,) * s.rank, value, dtype=s.dtype)
    return s.dtype(value)


def _concrete(v: Any, s: _Sym) -> Any:
    pv = _py(v)
    if s.is_tensor:
        return torch.full((1,) * s.rank, pv, dtype=s.dtype)
    return s.dtype(pv)  # a Python scalar keeps its type: promotion treats int and float apart


def _from_torch(r: Any) -> Any:
    if isinstance(r, torch.Tensor):
        r = r.reshape(-1)[0].item()
    return _num(r)


def _torch_leaf(op: Callable, vals: Sequence[Any], syms: Sequence[_Sym]) -> Any:
    try:
        return _from_torch(op(*(_concrete(v, s) for v, s in zip(vals, syms))))
    except NotProvable:
        raise
    except Exception as e:  # the op rejects these dtypes: the trace would not have run either
        raise NotProvable(f"cannot evaluate {getattr(op, '__name__', op)} on the mask's values ({e})") from None


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else dtype.__name__


def _check_exact_symbolic(vals: Iterable[Any], dtype: Any, what: str) -> None:
    """Index-valued (symbolic) leaves are exact only in int64/int32/float64 with integer
    values; refuse anything else (``arange(T).bfloat16()`` rounds positions above 256)."""
    if dtype not in _EXACT_INDEX_DTYPES:
        raise NotProvable(f"{what} on index values in {_dtype_name(dtype)} (not exact for every length)")
    limit = _INT_LIMIT if dtype != torch.int32 else 2**20  # int32 wraps at 2**31
    for v in vals:
        if v is sympy.nan or (v.is_number and not v.is_finite):
            raise NotProvable(f"{what} mixes index values with {v}")
        if not v.is_integer:
            raise NotProvable(f"{what} on non-integer index values ({v})")
        if v.is_number and abs(int(v)) > limit:
            raise NotProvable(f"{what} with the constant {v} (overflow is not modelled)")


def _cast_leaf(v: Any, src: _Sym, dtype: torch.dtype) -> Any:
    """Convert one leaf from ``src``'s dtype to ``dtype`` exactly as ``Tensor.to`` does."""
    if src.dtype == dtype:
        return v
    if dtype == torch.bool:
        if _is_bool(v):
            return v
        if _is_number(v):
            return _torch_leaf(lambda x: x.to(torch.bool) if isinstance(x, torch.Tensor) else bool(x), [v], [src])
        return _normalize(sympy.Ne(v, 0))
    if _is_bool(v):
        if v is _TRUE or v is _FALSE:
            return sympy.Integer(1 if v is _TRUE else 0)
        return sympy.Piecewise((sympy.Integer(1), v), (_ZERO, True))
    if _is_number(v):
        if not dtype.is_floating_point and not (v.is_finite and abs(v) < 2**62):
            # float -> integer of inf/nan/huge values is undefined (differs by device)
            raise NotProvable(f"a cast of {v} to {_dtype_name(dtype)}")
        return _torch_leaf(lambda x: torch.as_tensor(x, dtype=None if isinstance(x, torch.Tensor) else _py_default(x)).to(dtype), [v], [src])
    _check_exact_symbolic([v], dtype, "a cast")
    return v


def _py_default(x: Any) -> torch.dtype:
    return torch.bool if isinstance(x, bool) else torch.int64 if isinstance(x, int) else torch.float64


def _cast(v: Any, src: _Sym, dtype: torch.dtype) -> Any:
    if src.dtype == dtype:
        return v
    if _is_bool(v):
        return _cast_leaf(v, src, dtype)
    return _lift(lambda x: _cast_leaf(x, src, dtype), v)


def _as_numbers(v: Any) -> Any:
    """A bool value as 0/1 (arithmetic and order comparisons on bools)."""
    if _is_bool(v):
        if v is _TRUE or v is _FALSE:
            return sympy.Integer(1 if v is _TRUE else 0)
        return sympy.Piecewise((sympy.Integer(1), v), (_ZERO, True))
    return v


# -- which graph inputs a mask reads -----------------------------------------------------------

#: Arguments that a op reads for their dtype/device/shape only, never for their values.
_SHAPE_ONLY_SELF = {"new_ones", "new_zeros", "new_full", "new_empty", "new_tensor", "size", "dim", "numel", "stride"}
_SHAPE_ONLY_FN = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like}
_SHAPE_ONLY_OTHER = {"type_as", "expand_as", "view_as", "reshape_as", "to"}


def _value_args(n: fx.Node) -> list[fx.Node]:
    """The nodes whose *values* ``n`` reads (not those it reads a shape or dtype from)."""
    if n.op == "call_method" and n.target in _SHAPE_ONLY_SELF:
        return [a for a in n.all_input_nodes if a is not n.args[0]]
    if n.op == "call_function" and n.target in _SHAPE_ONLY_FN:
        return [a for a in n.all_input_nodes if a is not n.args[0]]
    if n.op == "call_method" and n.target in _SHAPE_ONLY_OTHER and len(n.args) > 1 and isinstance(n.args[1], fx.Node):
        if isinstance(example_value(n.args[1]), torch.Tensor):
            return [a for a in n.all_input_nodes if a is not n.args[1]]
    return list(n.all_input_nodes)


def _is_tensor_node(n: fx.Node) -> bool:
    v = example_value(n)
    return isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v))


def mask_inputs(mask: fx.Node) -> list[fx.Node]:
    """The tensor inputs of the graph (placeholders) whose values ``mask`` depends on."""
    seen: set[fx.Node] = set()
    found: list[fx.Node] = []
    stack = [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if not _is_tensor_node(n):
            continue  # sizes (SymInts) and other metadata: the mask's shape, not its values
        if n.op == "placeholder":
            found.append(n)
            continue
        stack.extend(_value_args(n))
    return sorted(found, key=lambda n: n.name)


def _source_name(n: fx.Node) -> str:
    ga = n.meta.get("grapharg")
    src = getattr(ga, "source", None)
    try:
        return src.name() if callable(getattr(src, "name", None)) else str(src or "")
    except Exception:
        return ""


def _user_name(n: fx.Node) -> str:
    """The input's name as the user wrote it (``attention_mask``, ``model.causal_bias``)."""
    src, target = _source_name(n), str(n.target)
    if src.startswith("G[") and src.endswith("]"):
        return src[2:-1].strip("'\"")  # a global: G['CAUSAL_MASK']
    if target.startswith("G_"):
        return target[2:].rstrip("_")  # the same, as the placeholder's target spells it
    name = readable_input_name(n.name)
    for prefix in ("kwargs_", "args_"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name or n.name


#: Op names whose use of an input marks it as positions, token ids or a keep/padding mask.
_POSITION_USES = {"diff", "cumsum", "cos", "sin"}
_TOKEN_USES = {"embedding", "cross_entropy", "nll_loss"}
_MASK_USES = {"bool", "logical_not", "logical_and", "logical_or", "where", "masked_fill", "masked_fill_"}
_PASS_THROUGH = {"getitem", "unsqueeze", "expand", "view", "reshape", "to", "float", "long", "int", "contiguous", "clone",
                 "double", "half", "bfloat16", "squeeze", "flatten", "mul", "cat", "detach", "type_as", "__getitem__",
                 "matmul", "__matmul__", "transpose", "permute"}


def _op_name(n: fx.Node) -> str:
    if n.op == "call_method":
        return str(n.target)
    return getattr(n.target, "__name__", str(n.target))


def _input_role(n: fx.Node) -> str:
    """What a graph input is, from how it is used (its name is only a hint)."""
    val = example_value(n)
    src = _source_name(n)
    name = n.name.lower()
    if isinstance(val, torch.nn.Parameter):
        return "parameter"
    if "_buffers" in src or "buffers_" in name:
        return "buffer"
    if src.startswith("G[") or str(n.target).startswith("G_"):
        return "global"  # a module-level tensor of the user's code
    score = {"attention_mask": 0, "position_ids": 0, "input_ids": 0}
    # How it is used, a few ops downstream (through views and casts).
    frontier, seen = [(n, 0)], {n}
    while frontier:
        x, depth = frontier.pop()
        for u in x.users:
            op = _op_name(u)
            if op in _POSITION_USES:
                score["position_ids"] += 2
            if op in _TOKEN_USES and u.args and u.args[0] is x:
                score["input_ids"] += 2
            is_bool_cast = op in ("to", "bool") and isinstance(example_value(u), torch.Tensor) and example_value(u).dtype == torch.bool
            if op in _MASK_USES or is_bool_cast:
                score["attention_mask"] += 2
            if u not in seen and depth < 8 and (op in _PASS_THROUGH or op in _POSITION_USES):
                seen.add(u)
                frontier.append((u, depth + 1))
    if isinstance(val, torch.Tensor) and (val.dtype == torch.bool or (val.is_floating_point() and val.dim() == 4)):
        score["attention_mask"] += 1
    if "position" in name:
        score["position_ids"] += 1
    if "mask" in name or "padding" in name:
        score["attention_mask"] += 1
    if "input_ids" in name:
        score["input_ids"] += 1
    role, best = max(score.items(), key=lambda kv: kv[1])
    if best == 0 or list(score.values()).count(best) > 1:
        return "tensor"
    return role


def _describe_inputs(inputs: Sequence[fx.Node]) -> str:
    roles = {}
    for n in inputs:
        roles.setdefault(_input_role(n), []).append(n)
    parts = []
    if "attention_mask" in roles:
        parts.append("the mask depends on the attention_mask input (padding), and is not proven to be a causal mask over the real keys")
    if "position_ids" in roles:
        parts.append("the mask depends on position_ids passed by the caller, and is not proven to be a causal mask within the packed documents they number")
    if "input_ids" in roles:
        parts.append("the mask depends on the token ids (a padding mask computed from input_ids): chunked attention does not support padding masks yet")
    for role, what, why in (
        ("buffer", "the module buffer", "a stored mask: its values are only known at run time"),
        ("global", "the stored tensor", "a global: its values are only known at run time"),
        ("parameter", "the parameter", "its values are only known at run time"),
        ("tensor", "the input tensor", "a padding or document mask?"),
    ):
        for n in roles.get(role, []):
            parts.append(f"the mask reads {what} {_user_name(n)!r} ({why})")
    return "; ".join(parts)


# -- in-place writes ---------------------------------------------------------------------------

#: Ops whose result is a fresh tensor (never a view of an argument). Anything else may alias.
_FRESH_FN = {
    operator.add, operator.sub, operator.mul, operator.neg, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne, operator.and_, operator.or_,
    operator.xor, operator.invert, torch.add, torch.sub, torch.mul, torch.neg, torch.le, torch.lt, torch.ge, torch.gt,
    torch.eq, torch.ne, torch.where, torch.masked_fill, torch.logical_and, torch.logical_or, torch.logical_xor,
    torch.logical_not, torch.bitwise_and, torch.bitwise_or, torch.bitwise_xor, torch.bitwise_not, torch.tril, torch.triu,
    torch.cumsum, torch.diff, torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor,
    torch.scalar_tensor, torch.zeros_like, torch.ones_like, torch.full_like, torch.clone, torch.cat, torch.matmul,
    operator.matmul, torch.softmax, torch.nn.functional.softmax, torch.nn.functional.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention, torch._C._nn.linear, torch.nn.functional.linear,
}
_FRESH_METHOD = {
    "add", "sub", "mul", "neg", "le", "lt", "ge", "gt", "eq", "ne", "where", "masked_fill", "logical_and", "logical_or",
    "logical_xor", "logical_not", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "tril", "triu", "cumsum",
    "new_ones", "new_zeros", "new_full", "new_empty", "clone", "softmax", "matmul", "__and__", "__or__", "__xor__",
    "__invert__",
}


def _may_alias(u: fx.Node) -> bool:
    if u.op == "call_function":
        return u.target not in _FRESH_FN
    if u.op == "call_method":
        return u.target not in _FRESH_METHOD
    return u.op != "output"


#: Out-of-place Python operators whose names end in "_" (``writes_in_place`` reads the
#: trailing underscore as torch's in-place convention).
_NOT_INPLACE = {operator.and_, operator.or_, operator.not_, operator.is_}


def _written(u: fx.Node) -> fx.Node | None:
    if u.op == "call_function" and u.target in _NOT_INPLACE:
        return None
    if not writes_in_place(u):
        return None
    out = u.kwargs.get("out")
    if isinstance(out, fx.Node):
        return out
    return u.args[0] if u.args and isinstance(u.args[0], fx.Node) else None


# -- the interpreter ---------------------------------------------------------------------------

_REL = {
    operator.le: operator.le, torch.le: operator.le, "le": operator.le, "__le__": operator.le,
    operator.lt: operator.lt, torch.lt: operator.lt, "lt": operator.lt, "__lt__": operator.lt,
    operator.ge: operator.ge, torch.ge: operator.ge, "ge": operator.ge, "__ge__": operator.ge,
    operator.gt: operator.gt, torch.gt: operator.gt, "gt": operator.gt, "__gt__": operator.gt,
    operator.eq: operator.eq, torch.eq: operator.eq, "eq": operator.eq, "__eq__": operator.eq,
    operator.ne: operator.ne, torch.ne: operator.ne, "ne": operator.ne, "__ne__": operator.ne,
}
_SYMPY_REL = {operator.le: sympy.Le, operator.lt: sympy.Lt, operator.ge: sympy.Ge, operator.gt: sympy.Gt,
              operator.eq: sympy.Eq, operator.ne: sympy.Ne}
_ARITH = {
    operator.add: operator.add, torch.add: operator.add, "add": operator.add, "__add__": operator.add, "__radd__": operator.add,
    operator.sub: operator.sub, torch.sub: operator.sub, "sub": operator.sub, "__sub__": operator.sub,
    operator.mul: operator.mul, torch.mul: operator.mul, "mul": operator.mul, "__mul__": operator.mul, "__rmul__": operator.mul,
}
# (logical: converts operands to bool; bitwise: logical on bools, bitwise on integers)
_LOGIC = {
    torch.logical_and: ("logical", sympy.And, operator.and_), "logical_and": ("logical", sympy.And, operator.and_),
    torch.logical_or: ("logical", sympy.Or, operator.or_), "logical_or": ("logical", sympy.Or, operator.or_),
    torch.logical_xor: ("logical", sympy.Xor, operator.xor), "logical_xor": ("logical", sympy.Xor, operator.xor),
    operator.and_: ("bitwise", sympy.And, operator.and_), torch.bitwise_and: ("bitwise", sympy.And, operator.and_),
    "bitwise_and": ("bitwise", sympy.And, operator.and_), "__and__": ("bitwise", sympy.And, operator.and_),
    operator.or_: ("bitwise", sympy.Or, operator.or_), torch.bitwise_or: ("bitwise", sympy.Or, operator.or_),
    "bitwise_or": ("bitwise", sympy.Or, operator.or_), "__or__": ("bitwise", sympy.Or, operator.or_),
    operator.xor: ("bitwise", sympy.Xor, operator.xor), torch.bitwise_xor: ("bitwise", sympy.Xor, operator.xor),
    "bitwise_xor": ("bitwise", sympy.Xor, operator.xor), "__xor__": ("bitwise", sympy.Xor, operator.xor),
}
_NOT = {operator.invert: "bitwise", torch.bitwise_not: "bitwise", "bitwise_not": "bitwise", "__invert__": "bitwise",
        torch.logical_not: "logical", "logical_not": "logical"}
_CASTS = {"to", "float", "double", "half", "bfloat16", "bool", "long", "int", "short", "char", "byte", "type", "type_as"}
_IDENTITY = {"contiguous", "clone", "detach", torch.clone, torch.detach}
_FILLED = {torch.zeros: 0, torch.ones: 1, torch.zeros_like: 0, torch.ones_like: 1, "new_zeros": 0, "new_ones": 1}


def _key(n: fx.Node) -> Any:
    return n.target


class _Interpreter:
    """Symbolic values of the mask's nodes. ``inputs``: integer graph inputs read as unknown
    values (:class:`_InputRead`, one subclass each, in ``input_class``); every cumsum found to
    number documents of one of them is recorded in ``documents``, with that input's class in
    ``document_source``."""

    def __init__(self, graph: fx.Graph, inputs: Iterable[fx.Node] = ()) -> None:
        self.input_class = {n: type(f"_in_{n.name}", (_InputRead,), {}) for n in inputs}
        self.documents: list[fx.Node] = []
        self.document_source: type | None = None
        self.memo: dict[fx.Node, _Sym] = {}
        self.pos = {n: k for k, n in enumerate(graph.nodes)}
        self.writers: dict[fx.Node, list[fx.Node]] = {}
        for u in graph.nodes:
            w = _written(u)
            if w is not None:
                self.writers.setdefault(w, []).append(u)

    # -- entry points --------------------------------------------------------------------------
    def value(self, x: Any) -> _Sym:
        if isinstance(x, fx.Node):
            if x not in self.memo:
                sym = self.node(x)
                if self.writers.get(x):
                    sym = self.apply_writes(x, sym)
                self.memo[x] = sym
            return self.memo[x]
        if isinstance(x, (bool, int, float)):
            return _scalar(x)
        raise NotProvable(f"the mask uses a constant of type {type(x).__name__}")

    def check_hidden_writes(self, mask: fx.Node) -> None:
        """Refuse if a tensor the mask reads is written through a view (or a write of
        another tensor may land in it): the values the graph shows are not what is read."""
        cone, stack = set(), [mask]
        while stack:
            n = stack.pop()
            if n in cone:
                continue
            cone.add(n)
            stack.extend(n.all_input_nodes)
            stack.extend(a for w in self.writers.get(n, []) for a in w.all_input_nodes)
        for n in cone:
            seen, stack = {n}, [u for u in n.users if _may_alias(u)]
            while stack:
                u = stack.pop()
                if u in seen:
                    continue
                seen.add(u)
                if self.writers.get(u):
                    raise NotProvable(f"the mask's tensor {n.name} is written in place through a view ({self.writers[u][0].name})")
                stack.extend(x for x in u.users if _may_alias(x))

    # -- nodes ---------------------------------------------------------------------------------
    def out(self, n: fx.Node) -> tuple[tuple, torch.dtype]:
        val = example_value(n)
        if not isinstance(val, torch.Tensor):
            raise NotProvable(f"unknown shape for {n.name} in the mask")
        return tuple(val.shape), val.dtype

    def node(self, n: fx.Node) -> _Sym:
        if n.op == "placeholder":
            if n in self.input_class:
                return self.input_read(n)
            if isinstance(example_value(n), torch.Tensor):
                raise NotProvable(_describe_inputs([n]))
            return self.symint(n)
        if n.op == "get_attr":
            raise NotProvable(f"the mask reads the stored tensor {n.target!r} (values only known at run time)")
        if n.op not in ("call_function", "call_method"):
            raise NotProvable(f"the mask is computed by {n.op} {n.target}")
        val = example_value(n)
        if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
            return self.symint(n)
        t = _key(n)
        if _written(n) is not None:
            return self.writer_result(n)
        if t is torch.arange:
            return self.arange(n)
        if t in _FILLED or t in (torch.full, torch.full_like, "new_full", torch.tensor, torch.scalar_tensor, torch.as_tensor):
            return self.filled(n)
        if t in (torch.empty, torch.empty_like, "new_empty"):
            raise NotProvable("the mask starts from uninitialized memory (empty)")
        if t in _REL:
            return self.compare(n, _REL[t])
        if t in _ARITH:
            if n.kwargs.get("alpha", 1) != 1:
                raise NotProvable("arithmetic with alpha in the mask")
            return self.arith(n, _ARITH[t], n.args[0], n.args[1])
        if t in (operator.neg, torch.neg, "neg", "__neg__"):
            return self.arith(n, lambda a, b: -a, n.args[0], 0, unary=True)
        if t in _LOGIC:
            return self.logic(n, *_LOGIC[t])
        if t in _NOT:
            return self.logical_not(n, _NOT[t])
        if t is operator.getitem:
            return self.getitem(n)
        if t in ("unsqueeze", torch.unsqueeze):
            return self.unsqueeze(n)
        if t in ("squeeze", torch.squeeze):
            return self.squeeze(n)
        if t in ("expand", "expand_as", "broadcast_to", torch.broadcast_to):
            return self.expand(n)
        if t in ("view", "reshape", "view_as", "reshape_as", torch.reshape, "flatten", torch.flatten):
            return self.reshape(n)
        if t in ("permute", torch.permute, "transpose", torch.transpose, "t", torch.t, "swapaxes", "swapdims"):
            return self.permute(n)
        if t in _IDENTITY:
            return self.identity(n)
        if t in (torch.where, "where"):
            return self.where(n)
        if t in ("masked_fill", torch.masked_fill):
            return self.masked_fill(n, n.args[0], arg_of(n, 1, "mask"), arg_of(n, 2, "value"))
        if t in (torch.tril, "tril", torch.triu, "triu"):
            return self.tri(n, lower=t in (torch.tril, "tril"))
        if t in (torch.cumsum, "cumsum"):
            return self.cumsum(n)
        if t in (torch.diff, "diff"):
            return self.diff(n)
        if t in _CASTS:
            return self.cast(n)
        raise NotProvable(f"the mask is built with {getattr(t, '__name__', t)}, which the causal-mask prover does not model")

    def symint(self, n: fx.Node) -> _Sym:
        val = example_value(n)
        if isinstance(val, bool) or not isinstance(val, (int, torch.SymInt)):
            raise NotProvable(f"the mask uses {n.name}, which is not a tensor or an integer")
        expr = _size_expr(val)
        return _Sym((), int, lambda idx: expr)

    # -- sources -------------------------------------------------------------------------------
    def input_read(self, n: fx.Node) -> _Sym:
        shape, dtype = self.out(n)
        cls = self.input_class[n]
        if len(shape) != 2 or dtype not in (torch.int64, torch.int32, torch.bool):
            raise NotProvable(f"the input {_user_name(n)!r} is not an integer [batch, length] tensor")
        if dtype == torch.bool:  # a boolean element is its integer image compared with 0
            return _Sym(shape, dtype, lambda idx: sympy.Ne(cls(*idx), 0))
        return _Sym(shape, dtype, lambda idx: cls(*idx))

    def arange(self, n: fx.Node) -> _Sym:
        shape, dtype = self.out(n)
        args = list(n.args)
        if len(args) <= 1:
            start, step = 0, 1
        elif len(args) == 2:
            start, step = args[0], 1
        else:
            start, step = args[0], args[2]
        start = n.kwargs.get("start", start)
        step = n.kwargs.get("step", step)
        ends = [a for a in args + [n.kwargs.get("end")] if a is not None]
        if any(isinstance(a, float) for a in ends + [start, step]):
            raise NotProvable("arange with float bounds")
        if not isinstance(start, int) or not isinstance(step, int) or isinstance(start, bool):
            raise NotProvable("arange with a start or step only known at run time (a cache offset?)")
        if dtype not in _EXACT_INDEX_DTYPES:
            raise NotProvable(f"arange in {_dtype_name(dtype)} (not exact for every length)")
        if abs(start) > _INT_LIMIT or abs(step) > _INT_LIMIT:
            raise NotProvable("arange with a huge start or step")
        return _Sym(shape, dtype, lambda idx: start + step * idx[0])

    def filled(self, n: fx.Node) -> _Sym:
        shape, dtype = self.out(n)
        t = n.target
        if t in _FILLED:
            fill: Any = _FILLED[t]
        elif t is torch.full:
            fill = arg_of(n, 1, "fill_value")
        elif t is torch.full_like:
            fill = arg_of(n, 1, "fill_value")
        elif t == "new_full":
            fill = arg_of(n, 2, "fill_value")
        else:  # torch.tensor / scalar_tensor / as_tensor
            fill = n.args[0] if n.args else n.kwargs.get("data")
            if shape != ():
                raise NotProvable("a tensor literal with several values in the mask")
        if isinstance(fill, fx.Node) or not isinstance(fill, (bool, int, float)):
            raise NotProvable("a fill value only known at run time in the mask")
        try:
            v = _num(torch.full((), fill, dtype=dtype).item())
        except Exception as e:
            raise NotProvable(f"cannot fill {_dtype_name(dtype)} with {fill!r} ({e})") from None
        return _Sym(shape, dtype, lambda idx: v)

    # -- elementwise ---------------------------------------------------------------------------
    def broadcast(self, s: _Sym, shape: tuple) -> Callable[[list], Any]:
        """``s`` read at the indices of a tensor of ``shape`` it is broadcast to."""
        pad = len(shape) - s.rank
        if pad < 0:
            raise NotProvable("internal: broadcasting to a smaller rank")
        for k, size in enumerate(s.shape):
            if not (s.size_one[k] or _same_size(size, shape[k + pad])):
                raise NotProvable(f"cannot tell how a dim of size {size} broadcasts to {shape[k + pad]}")
        return lambda idx: s.at(idx[pad:])

    def compare(self, n: fx.Node, op: Callable) -> _Sym:
        shape, dtype = self.out(n)
        a, b = self.value(n.args[0]), self.value(arg_of(n, 1, "other"))
        fa, fb = self.broadcast(a, shape), self.broadcast(b, shape)
        try:
            compute = torch.result_type(_dummy(a), _dummy(b))
        except Exception as e:
            raise NotProvable(f"cannot compare these dtypes ({e})") from None
        rel = _SYMPY_REL[op]

        def leaf(x, y):
            if _is_number(x) and _is_number(y):
                return _torch_leaf(op, [x, y], [a, b])
            _check_exact_symbolic([x, y], compute, "a comparison")
            return _normalize(rel(x, y))

        return _Sym(shape, dtype, lambda idx: _lift(leaf, _as_numbers(fa(idx)), _as_numbers(fb(idx))))

    def arith(self, n: fx.Node, op: Callable, x: Any, y: Any, unary: bool = False) -> _Sym:
        shape, dtype = self.out(n)
        a = self.value(x)
        b = a if unary else self.value(y)
        fa, fb = self.broadcast(a, shape), self.broadcast(b, shape)
        torch_op = (lambda p, q: -p) if unary else op

        def leaf(p, q):
            if _is_number(p) and _is_number(q):
                return _torch_leaf(torch_op, [p, q], [a, b])
            _check_exact_symbolic([p, q], dtype, "arithmetic")
            if op is operator.mul:
                # Index values grow with T: a product stays exact only by a small constant.
                factor = p if _is_number(p) else q if _is_number(q) else None
                if factor is None or abs(int(factor)) > 2**10 or dtype == torch.int32:
                    raise NotProvable("a product of index values in the mask (overflow is not modelled)")
            return sympy.expand(op(p, q))

        return _Sym(shape, dtype, lambda idx: _lift(leaf, _as_numbers(fa(idx)), _as_numbers(fb(idx))))

    def logic(self, n: fx.Node, kind: str, sym_op: Callable, py_op: Callable) -> _Sym:
        shape, dtype = self.out(n)
        a, b = self.value(n.args[0]), self.value(arg_of(n, 1, "other"))
        fa, fb = self.broadcast(a, shape), self.broadcast(b, shape)
        bools = all(s.dtype in (torch.bool, bool) for s in (a, b))
        if kind == "logical" or bools:
            if dtype != torch.bool:
                raise NotProvable(f"a logical op with a {_dtype_name(dtype)} result")
            return _Sym(shape, dtype, lambda idx: sym_op(_cast(fa(idx), a, torch.bool), _cast(fb(idx), b, torch.bool)))

        def leaf(p, q):
            if _is_number(p) and _is_number(q):
                return _torch_leaf(py_op, [p, q], [a, b])
            raise NotProvable("bitwise arithmetic on index values in the mask")

        return _Sym(shape, dtype, lambda idx: _lift(leaf, _as_numbers(fa(idx)), _as_numbers(fb(idx))))

    def logical_not(self, n: fx.Node, kind: str) -> _Sym:
        shape, dtype = self.out(n)
        a = self.value(n.args[0])
        fa = self.broadcast(a, shape)
        if kind == "logical" or a.dtype in (torch.bool, bool):
            if dtype != torch.bool:
                raise NotProvable(f"a logical not with a {_dtype_name(dtype)} result")
            return _Sym(shape, dtype, lambda idx: sympy.Not(_cast(fa(idx), a, torch.bool)))

        def leaf(p):
            if _is_number(p):
                return _torch_leaf(operator.invert, [p], [a])
            _check_exact_symbolic([p], dtype, "bitwise not")
            return sympy.expand(-p - 1)

        return _Sym(shape, dtype, lambda idx: _lift(leaf, fa(idx)))

    def where(self, n: fx.Node) -> _Sym:
        if n.op == "call_method":  # x.where(cond, y)
            x, cond, y = n.args[0], arg_of(n, 1, "condition"), arg_of(n, 2, "other")
        else:
            if len(n.args) + len(n.kwargs) < 3:
                raise NotProvable("torch.where with one argument in the mask")
            cond, x, y = arg_of(n, 0, "condition"), arg_of(n, 1, "input"), arg_of(n, 2, "other")
        return self.select(n, cond, x, y)

    def masked_fill(self, n: fx.Node, x: Any, mask: Any, value: Any) -> _Sym:
        return self.select(n, mask, value, x)

    def select(self, n: fx.Node, cond: Any, x: Any, y: Any) -> _Sym:
        shape, dtype = self.out(n)
        c, a, b = self.value(cond), self.value(x), self.value(y)
        if c.dtype not in (torch.bool, bool):
            raise NotProvable(f"a {_dtype_name(c.dtype)} condition in where/masked_fill")
        fc, fa, fb = self.broadcast(c, shape), self.broadcast(a, shape), self.broadcast(b, shape)

        def fn(idx):
            return _select([(_cast(fa(idx), a, dtype), fc(idx)), (_cast(fb(idx), b, dtype), _TRUE)])

        return _Sym(shape, dtype, fn)

    def tri(self, n: fx.Node, lower: bool) -> _Sym:
        shape, dtype = self.out(n)
        a = self.value(n.args[0])
        k = arg_of(n, 1, "diagonal", 0)
        if not isinstance(k, int) or isinstance(k, bool):
            raise NotProvable("tril/triu with a diagonal only known at run time")
        if a.rank < 2 or a.rank != len(shape):
            raise NotProvable("tril/triu of a tensor with fewer than 2 dims")
        fa = self.broadcast(a, shape)
        zero = _FALSE if dtype == torch.bool else _ZERO
        zeroed = tuple(_is_one(s) for s in shape)

        def fn(idx):
            r = _ZERO if zeroed[-2] else idx[-2]
            c = _ZERO if zeroed[-1] else idx[-1]
            keep = _normalize(sympy.Le(c - r, k) if lower else sympy.Ge(c - r, k))
            return _select([(_cast(fa(idx), a, dtype), keep), (zero, _TRUE)])

        return _Sym(shape, dtype, fn)

    def cast(self, n: fx.Node) -> _Sym:
        shape, dtype = self.out(n)
        a = self.value(n.args[0])
        if not a.is_tensor:
            raise NotProvable("a cast of a non-tensor in the mask")
        if a.rank != len(shape):
            raise NotProvable("internal: a cast that changes the shape")
        fa = self.broadcast(a, shape)
        return _Sym(shape, dtype, lambda idx: _cast(fa(idx), a, dtype))

    # -- shape ops -----------------------------------------------------------------------------
    def identity(self, n: fx.Node) -> _Sym:
        shape, dtype = self.out(n)
        a = self.value(n.args[0])
        if a.dtype != dtype or a.rank != len(shape):
            raise NotProvable("internal: an identity op that changes dtype or rank")
        return _Sym(shape, dtype, a.at)

    def expand(self, n: fx.Node) -> _Sym:
        shape, dtype = self.out(n)
        a = self.value(n.args[0])
        if a.dtype != dtype:
            raise NotProvable("internal: expand changed the dtype")
        return _Sym(shape, dtype, self.broadcast(a, shape))

    def unsqueeze(self, n: fx.Node) -> _Sym:
        shape, dtype = self.out(n)
        a = self.value(n.args[0])
        d = arg_of(n, 1, "dim")
        if not isinstance(d, int):
            raise NotProvable("unsqueeze with a dim only known at run time")
        d = d if d >= 0 else d + a.rank + 1
        if len(shape) != a.rank + 1 or not 0 <= d <= a.rank:
            raise NotProvable("internal: unsqueeze shape mismatch")
        return _Sym(shape, dtype, lambda idx: a.at(list(idx[:d]) + list(idx[d + 1 :])))

    def squeeze(self, n: fx.Node) -> _Sym:
        shape, dtype = self.out(n)
        a = self.value(n.args[0])
        dims = arg_of(n, 1, "dim")
        dims = list(range(a.rank)) if dims is None else list(dims) if isinstance(dims, (tuple, list)) else [dims]
        dims = [d + a.rank if d < 0 else d for d in dims]
        removed = []
        for d in dims:
            if a.size_one[d]:
                removed.append(d)
            elif not statically_known_true(a.shape[d] != 1) if isinstance(a.shape[d], torch.SymInt) else False:
                raise NotProvable("squeeze of a dim whose size may be 1")
        keep = [d for d in range(a.rank) if d not in removed]
        if len(keep) != len(shape):
            raise NotProvable("internal: squeeze shape mismatch")

        def fn(idx):
            src = [_ZERO] * a.rank
            for o, d in enumerate(keep):
                src[d] = idx[o]
            return a.at(src)

        return _Sym(shape, dtype, fn)

    def reshape(self, n: fx.Node) -> _Sym:
        """Only reshapes that add or remove size-1 dims (anything else mixes indices)."""
        shape, dtype = self.out(n)
        a = self.value(n.args[0])
        if a.dtype != dtype:
            raise NotProvable("a view that reinterprets the mask's bits as another dtype")
        src_dims = [d for d in range(a.rank) if not a.size_one[d]]
        out_dims = [d for d in range(len(shape)) if not _is_one(shape[d])]
        if len(src_dims) != len(out_dims) or not all(_same_size(a.shape[s], shape[o]) for s, o in zip(src_dims, out_dims)):
            raise NotProvable("a reshape that merges or splits dims in the mask")

        def fn(idx):
            src = [_ZERO] * a.rank
            for s, o in zip(src_dims, out_dims):
                src[s] = idx[o]
            return a.at(src)

        return _Sym(shape, dtype, fn)

    def permute(self, n: fx.Node) -> _Sym:
        shape, dtype = self.out(n)
        a = self.value(n.args[0])
        name = n.target if isinstance(n.target, str) else n.target.__name__
        if name == "permute":
            dims = list(n.args[1:]) or [n.kwargs.get("dims")]
            dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
            if not all(isinstance(x, int) for x in dims):
                raise NotProvable("a permutation only known at run time")
        elif name == "t":
            dims = list(range(a.rank))[::-1] if a.rank == 2 else list(range(a.rank))
        else:
            d0, d1 = arg_of(n, 1, "dim0"), arg_of(n, 2, "dim1")
            dims = list(range(a.rank))
            d0, d1 = d0 % a.rank, d1 % a.rank
            dims[d0], dims[d1] = dims[d1], dims[d0]
        dims = [d % a.rank for d in dims]
        if sorted(dims) != list(range(a.rank)) or len(shape) != a.rank:
            raise NotProvable("internal: permutation mismatch")

        def fn(idx):
            src = [_ZERO] * a.rank
            for o, d in enumerate(dims):
                src[d] = idx[o]
            return a.at(src)

        return _Sym(shape, dtype, fn)

    def getitem(self, n: fx.Node) -> _Sym:
        src_node, index = n.args
        shape, dtype = self.out(n)
        a = self.value(src_node)
        if not a.is_tensor:
            raise NotProvable("indexing a non-tensor in the mask")
        index = index if isinstance(index, tuple) else (index,)
        tensors = []
        for i in index:
            if isinstance(i, fx.Node):
                v = example_value(i)
                if not isinstance(v, torch.Tensor):
                    raise NotProvable("indexing the mask with a position only known at run time")
                if v.dtype not in (torch.int64, torch.int32):
                    raise NotProvable(f"indexing the mask with a {_dtype_name(v.dtype)} tensor (a boolean mask?)")
                tensors.append(i)
            elif not (i is None or i is Ellipsis or isinstance(i, slice) or (isinstance(i, int) and not isinstance(i, bool))):
                raise NotProvable(f"indexing the mask with {i!r}")
        if sum(1 for i in index if i is Ellipsis) > 1:
            raise NotProvable("indexing with two ellipses")
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        if consumed > a.rank:
            raise NotProvable("internal: too many indices")
        if Ellipsis in index:
            k = index.index(Ellipsis)
            index = index[:k] + (slice(None),) * (a.rank - consumed) + index[k + 1 :]
        else:
            index = index + (slice(None),) * (a.rank - consumed)
        if tensors:
            return self.advanced_index(n, a, index, shape, dtype)

        # Basic indexing: output dim -> (source dim, start, step); ints fix a source index.
        plan: list[tuple[int, Any, int] | None] = []
        fixed: dict[int, Any] = {}
        d = 0
        for i in index:
            if i is None:
                plan.append(None)
            elif isinstance(i, slice):
                start, step = _slice_start(i, a.shape[d])
                plan.append((d, start, step))
                d += 1
            else:
                fixed[d] = _int_index(i, a.shape[d])
                d += 1
        if len(plan) != len(shape):
            raise NotProvable("internal: indexing shape mismatch")

        def fn(idx):
            src = [_ZERO] * a.rank
            for dd, v in fixed.items():
                src[dd] = v
            for o, p in enumerate(plan):
                if p is not None:
                    dd, start, step = p
                    src[dd] = start + step * idx[o]
            return a.at(src)

        return _Sym(shape, dtype, fn)

    def advanced_index(self, n: fx.Node, a: _Sym, index: tuple, shape: tuple, dtype: torch.dtype) -> _Sym:
        if any(i is None or (isinstance(i, int) and not isinstance(i, slice)) for i in index):
            raise NotProvable("indexing that mixes index tensors with None or integers")
        adv = [k for k, i in enumerate(index) if isinstance(i, fx.Node)]
        idx_syms = [self.value(index[k]) for k in adv]
        brank = max(s.rank for s in idx_syms)
        contiguous = adv == list(range(adv[0], adv[-1] + 1))
        slices = [k for k, i in enumerate(index) if isinstance(i, slice)]
        if len(shape) != brank + len(slices):
            raise NotProvable("internal: advanced indexing shape mismatch")
        # torch (like NumPy) puts the broadcast index dims where the index tensors are when
        # they are adjacent, else first.
        before = [k for k in slices if k < adv[0]] if contiguous else []
        after = [k for k in slices if k not in before]
        b0 = len(before)
        bshape = shape[b0 : b0 + brank]
        index_fns = [self.broadcast(s, bshape) for s in idx_syms]
        out_of = {k: p for p, k in enumerate(before)}  # source slice dim -> output dim
        out_of.update({k: b0 + brank + p for p, k in enumerate(after)})
        starts = {k: _slice_start(index[k], a.shape[k]) for k in slices}

        def fn(idx):
            bidx = idx[b0 : b0 + brank]
            src = [_ZERO] * a.rank
            for k, f in zip(adv, index_fns):
                v = f(bidx)
                if not _nonnegative(v):
                    raise NotProvable("an index tensor whose values may be negative (wrap-around is not modelled)")
                src[k] = v
            for k in slices:
                start, step = starts[k]
                src[k] = start + step * idx[out_of[k]]
            return a.at(src)

        return _Sym(shape, dtype, fn)

    # -- scans ---------------------------------------------------------------------------------
    def diff(self, n: fx.Node) -> _Sym:
        shape, dtype = self.out(n)
        a = self.value(n.args[0])
        order = arg_of(n, 1, "n", 1)
        dim = arg_of(n, 2, "dim", -1)
        pre, app = arg_of(n, 3, "prepend"), arg_of(n, 4, "append")
        if order != 1 or not isinstance(dim, int):
            raise NotProvable("diff of an order other than 1")
        dim = dim % a.rank
        parts = []  # (sym, length along dim)
        for extra in (pre, "x", app):
            if extra is None:
                continue
            s = a if extra == "x" else self.value(extra)
            if not s.is_tensor or s.rank != a.rank or s.dtype != a.dtype:
                raise NotProvable("diff with a prepend/append of another rank or dtype")
            for k in range(a.rank):
                if k != dim and not (s.size_one[k] and a.size_one[k] or _same_size(s.shape[k], a.shape[k])):
                    raise NotProvable("diff with a prepend/append of another shape")
            length = s.shape[dim]
            if s is not a and not isinstance(length, int):
                raise NotProvable("diff with a prepend/append of dynamic length")
            parts.append((s, _size_expr(length)))
        if a.dtype != dtype and not (dtype == torch.bool):
            raise NotProvable("internal: diff changed the dtype")

        def z(idx, m):
            pairs, offset = [], _ZERO
            for k, (s, length) in enumerate(parts):
                at = list(idx)
                at[dim] = m - offset
                cond = _TRUE if k == len(parts) - 1 else _normalize(sympy.Lt(m, offset + length))
                if cond is not _FALSE:
                    pairs.append((s.at(at), cond))
                offset = offset + length
                if cond is _TRUE:
                    break
            return _select(pairs)

        def leaf(p, q):
            if dtype == torch.bool:
                return sympy.Xor(p, q)
            if _is_number(p) and _is_number(q):
                return _torch_leaf(operator.sub, [p, q], [a, a])
            _check_exact_symbolic([p, q], dtype, "diff")
            return sympy.expand(p - q)

        def fn(idx):
            k = idx[dim]
            hi, lo = z(idx, k + 1), z(idx, k)
            if dtype == torch.bool:
                return sympy.Xor(hi, lo)
            return _lift(leaf, hi, lo)

        return _Sym(shape, dtype, fn)

    def cumsum(self, n: fx.Node) -> _Sym:
        shape, dtype = self.out(n)
        a = self.value(n.args[0])
        dim = arg_of(n, 1, "dim")
        if not isinstance(dim, int) or a.rank == 0:
            raise NotProvable("cumsum over a dim only known at run time")
        dim = dim % a.rank
        if a.rank != len(shape):
            raise NotProvable("internal: cumsum shape mismatch")
        if a.size_one[dim]:
            return _Sym(shape, dtype, lambda idx: _cast(a.at(idx), a, dtype))
        syms = _index_symbols(a.rank, "c")
        k = syms[dim]
        summand = _normalize(_cast(a.at(syms), a, dtype))
        if _reads(summand):
            return self.document_ids(n, shape, dtype, dim, syms, summand)
        free = summand.free_symbols if isinstance(summand, sympy.Basic) else set()
        if free - {k}:
            raise NotProvable("cumsum of a summand that varies across other dims")
        values = set()
        for lo, hi, leaf in _intervals(summand, k, lower=0):
            if lo != hi and leaf.has(k):
                if sympy.expand(leaf) != 0:
                    raise NotProvable("cumsum of a varying summand (only all-zero or constant summands are modelled)")
                leaf = _ZERO
            values.add(leaf)
        if len(values) != 1:
            raise NotProvable("cumsum of a varying summand (only all-zero or constant summands are modelled)")
        (c,) = values
        if c == 0:
            zero = _FALSE if dtype == torch.bool else _ZERO
            return _Sym(shape, dtype, lambda idx: zero)
        if dtype not in (torch.int64, torch.int32) or not c.is_Integer:
            raise NotProvable(f"cumsum of a nonzero constant in {_dtype_name(dtype)}")
        return _Sym(shape, dtype, lambda idx: sympy.expand((idx[dim] + 1) * c))

    def document_ids(self, n: fx.Node, shape: tuple, dtype: torch.dtype, dim: int, syms: list, summand: Any) -> _Sym:
        """A cumsum over the caller's positions is accepted only as transformers' document
        numbering, ``(diff(pos, prepend=pos[:, :1] - 1) != 1).cumsum(-1)``: its summand must
        be 0 at ``t = 0`` and, at ``t ≥ 1``, a function of the step ``pos[t] − pos[t−1]``
        alone that is 0 exactly at step 1. Then the value at ``t`` counts the position
        breaks in ``[1, t]``: two tokens share it iff no break lies between them, and inside
        one document ``pos[t] − t`` is constant (what :func:`_within_documents` uses)."""
        if len(shape) != 2 or dim != 1 or dtype not in (torch.int64, torch.int32):
            raise NotProvable("a cumsum over the positions that is not a [batch, length] document numbering")
        row, k = syms
        if _normalize(summand.subs(k, 0)) not in (_ZERO, _FALSE):
            raise NotProvable("the positions' document numbering counts a break at the first token")
        kappa = sympy.Symbol("_kappa", integer=True, nonnegative=True)
        base, step = sympy.Symbol("_base", integer=True), sympy.Symbol("_step", integer=True)
        later = summand.subs(k, kappa + 1)
        reads = _reads(later)
        rows, sources = {r.args[0] for r in reads}, {r.func for r in reads}
        if len(rows) != 1 or len(sources) != 1 or not {r.args[1] for r in reads} <= {kappa, kappa + 1}:
            raise NotProvable("a cumsum of the positions that is not a function of one step pos[t] - pos[t-1]")
        (pos_row,), (source,) = rows, sources
        later = _normalize(later.xreplace({source(pos_row, kappa + 1): base + step, source(pos_row, kappa): base}))
        if later.free_symbols - {step}:
            raise NotProvable("a cumsum of the positions that is not a function of one step pos[t] - pos[t-1]")
        for lo, hi, value in _intervals(later, step, extra=(1,)):
            value = _normalize(value)
            if isinstance(value, sympy.Basic) and value.free_symbols:
                raise NotProvable("a cumsum of the positions whose summand varies with the step")
            if value not in ((_ZERO, _FALSE) if lo == hi == 1 else (sympy.Integer(1), _TRUE)):
                raise NotProvable("a cumsum of the positions that does not count steps other than +1")
        if pos_row not in (_ZERO, row):
            raise NotProvable("a document numbering that reads another row of the positions")
        if self.document_source not in (None, source):
            raise NotProvable("the mask numbers documents of two different inputs")
        self.documents.append(n)
        self.document_source = source
        by_row = pos_row == row
        return _Sym(shape, dtype, lambda idx: _Document(idx[0] if by_row else _ZERO, idx[1]))

    # -- in-place writes -----------------------------------------------------------------------
    def apply_writes(self, x: fx.Node, sym: _Sym) -> _Sym:
        writers = sorted(self.writers[x], key=self.pos.__getitem__)
        last = self.pos[writers[-1]]
        for u in list(x.users) + [v for w in writers for v in w.users]:
            if u not in writers and self.pos[u] < last:
                raise NotProvable(f"the mask's tensor {x.name} is read before it is written in place ({writers[-1].name})")
        for w in writers:
            sym = self.write(w, sym)
        return sym

    def write(self, w: fx.Node, current: _Sym) -> _Sym:
        name = w.target if isinstance(w.target, str) else getattr(w.target, "__name__", str(w.target))
        if w.kwargs.get("out") is not None:
            raise NotProvable(f"the mask is written by {name}(out=...)")
        target = w.args[0]
        saved = self.memo.get(target)
        self.memo[target] = current  # the op reads the value before its own write
        try:
            if name == "masked_fill_":
                return self.masked_fill(w, target, arg_of(w, 1, "mask"), arg_of(w, 2, "value"))
            if name in ("tril_", "triu_"):
                return self.tri(w, lower=name == "tril_")
            if name in ("fill_", "zero_"):
                shape, dtype = self.out(w)
                fill = 0 if name == "zero_" else arg_of(w, 1, "value")
                if not isinstance(fill, (bool, int, float)):
                    raise NotProvable("the mask is filled with a value only known at run time")
                v = _num(torch.full((), fill, dtype=dtype).item())
                return _Sym(shape, dtype, lambda idx: v)
            raise NotProvable(f"the mask is written in place by {name}, which the causal-mask prover does not model")
        finally:
            if saved is None:
                self.memo.pop(target, None)
            else:
                self.memo[target] = saved

    def writer_result(self, n: fx.Node) -> _Sym:
        # ``y = x.masked_fill_(...)``: y is x after all its writes (checked in apply_writes).
        target = _written(n)
        return self.value(target)



def arg_of(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _slice_start(sl: slice, size: Any) -> tuple[Any, int]:
    step = 1 if sl.step is None else sl.step
    if not isinstance(step, int) or step < 1:
        raise NotProvable("a slice with a step only known at run time")
    start = sl.start
    if start is None:
        return _ZERO, step
    if not isinstance(start, int) or isinstance(start, bool):
        raise NotProvable("a slice starting at a position only known at run time")
    if start >= 0:
        return sympy.Integer(min(start, size) if isinstance(size, int) else start), step
    if isinstance(size, int):
        return sympy.Integer(max(size + start, 0)), step
    raise NotProvable("a slice counted from the end of a dynamic dim")


def _int_index(i: int, size: Any) -> Any:
    if i >= 0:
        return sympy.Integer(i)
    if isinstance(size, int):
        return sympy.Integer(size + i)
    raise NotProvable("an index counted from the end of a dynamic dim")


def _nonnegative(v: Any) -> bool:
    if isinstance(v, sympy.Piecewise):
        return all(_nonnegative(e) for e, _ in v.args)
    return isinstance(v, sympy.Expr) and bool(v.is_nonnegative) and bool(v.is_integer)


def _index_symbols(rank: int, prefix: str) -> list:
    return [sympy.Symbol(f"_{prefix}{k}", integer=True, nonnegative=True) for k in range(rank)]


# -- deciding a predicate over the integers ----------------------------------------------------


def _intervals(expr: Any, var: sympy.Symbol, *, lower: int | None = None, extra: Iterable[int] = ()):
    """Split the integers (≥ ``lower``) into intervals on which every relational atom of
    ``expr`` has one truth value; yield ``(lo, hi, leaf)`` per interval, ``leaf`` being
    ``expr`` with the atoms decided (a number/boolean for a one-point interval, else an
    expression that may still contain ``var`` in its values). ``lo``/``hi`` may be ±inf.

    Every atom must be affine in ``var``: ``a·var + c ⋈ 0`` changes its truth value only
    between two of ``p-1, p, p+1`` for ``p = floor(-c/a)``, so those points bound the
    intervals.
    """
    atoms = [r for r in (expr.atoms(Relational) if isinstance(expr, sympy.Basic) else ()) if var in r.free_symbols]
    points = set(extra)
    for r in atoms:
        e = sympy.expand(r.lhs - r.rhs)
        if e.free_symbols - {var}:
            raise NotProvable("the mask compares index expressions the prover cannot separate")
        try:
            poly = sympy.Poly(e, var)
        except sympy.PolynomialError:
            raise NotProvable("the mask compares non-polynomial index expressions") from None
        if poly.degree() != 1:
            raise NotProvable("the mask compares non-affine index expressions")
        a, c = poly.all_coeffs()
        if not (a.is_number and c.is_number and a.is_finite and c.is_finite):
            raise NotProvable("the mask compares index expressions with non-finite coefficients")
        p = int(sympy.floor(-c / a))
        points.update((p - 1, p, p + 1))
    bps = sorted(points)
    if lower is not None:
        bps = [b for b in bps if b >= lower]
    intervals = []
    start = -math.inf if lower is None else lower
    for b in bps:
        if start <= b - 1:
            intervals.append((start, b - 1))
        intervals.append((b, b))
        start = b + 1
    intervals.append((start, math.inf))
    for lo, hi in intervals:
        rep = lo if lo != -math.inf else hi
        if rep == math.inf:
            rep = 0 if lower is None else lower
        decided = expr.xreplace({r: r.subs(var, rep) for r in atoms}) if atoms else expr
        if lo == hi:
            decided = _normalize(decided.subs(var, rep)) if isinstance(decided, sympy.Basic) else decided
        yield lo, hi, decided


# -- the proof ---------------------------------------------------------------------------------


def prove_causal(mask: fx.Node, *, additive: bool) -> None:
    """Prove that ``mask`` (``[..., T, S]``) is the top-left-aligned causal mask.

    Args:
        mask: the node computing the mask.
        additive: True for a float mask added to the scores (kept: 0, removed: a value at
            or below :data:`MASKED_THRESHOLD`), False for a boolean mask (True = keep).
    Raises:
        NotProvable: with the reason, when the mask is not (provably) causal.
    """
    window = prove_band(mask, additive=additive)
    if window is not None:
        raise NotProvable(f"the mask is a sliding window of {window} keys, not the causal mask")


def prove_band(mask: fx.Node, *, additive: bool) -> int | None:
    """Prove that ``mask`` is causal or a causal band, for every sequence length.

    Returns None for the causal mask (keep ``j ≤ i``) and ``w ≥ 1`` for a sliding window
    (keep ``i − w < j ≤ i``: the query and the ``w − 1`` keys before it), whatever
    inequalities the model wrote it with — ``w`` is read off the kept set, so an off-by-one
    in a model's spelling gives the window that model really uses.

    Raises:
        NotProvable: with the reason, when the mask is neither (provably), or separates documents.
    """
    proof = prove_mask(mask, additive=additive)
    if proof.documents is not None:
        raise NotProvable("the mask separates packed documents (their ids come from the caller's positions)")
    if proof.key_padding is not None:
        raise NotProvable("the mask removes padded keys (the attention_mask input)")
    return proof.window


def prove_mask(mask: fx.Node, *, additive: bool) -> MaskProof:
    """Prove that ``mask`` is causal or a causal band, possibly within packed documents.

    Documents: a mask that reads the caller's positions is accepted when it keeps a pair only
    if both tokens lie in one document as transformers numbers them (a break wherever a
    position is not its predecessor + 1, ``masking_utils.find_packed_sequence_indices``), and
    inside every document it is causal or a band for every ``T`` whatever the positions are.
    The pair is then kept iff the document ids at ``i`` and ``j`` agree and ``j − i`` is in
    the band; :attr:`MaskProof.documents` is the node computing those ids.

    Raises:
        NotProvable: with the reason, when the mask is none of these (provably).
    """
    try:
        return _prove(mask, additive)
    except NotProvable:
        raise
    except RecursionError:
        raise NotProvable("the mask's computation is too deep to analyse") from None
    except Exception as e:  # a modelling gap, never a proof: refuse and say so
        raise NotProvable(f"internal: the prover failed ({type(e).__name__}: {e})") from e


def _prove(mask: fx.Node, additive: bool) -> MaskProof:
    inputs = mask_inputs(mask)
    readable = [n for n in inputs if _maybe_index_input(n)]
    if len(inputs) != len(readable) or len(readable) > 2:
        raise NotProvable(_describe_inputs(inputs))
    interp = _Interpreter(mask.graph, readable)
    interp.check_hidden_writes(mask)
    proof: dict[str, Any] = {}
    try:
        sym = interp.value(mask)
        if not sym.is_tensor or sym.rank < 2:
            raise NotProvable("the mask has fewer than 2 dims")
        if additive and not sym.dtype.is_floating_point:
            raise NotProvable(f"a {_dtype_name(sym.dtype)} mask added to the scores (only 0 and -inf-like values are exact masking)")
        if not additive and sym.dtype != torch.bool:
            raise NotProvable(f"a {_dtype_name(sym.dtype)} mask used as a boolean keep-mask")
        idx = _index_symbols(sym.rank, "x")
        i, j = idx[-2], idx[-1]
        expr = sym.at(idx)
        if readable and len(idx) != 4:
            raise NotProvable("a mask over graph inputs that is not [batch, heads, T, S]")
        if interp.documents:
            if len(set(interp.documents)) != 1:
                raise NotProvable("the mask numbers documents more than once")
            expr, row = _within_documents(expr, idx, additive, interp.document_source)
            proof.update(documents=interp.documents[0], document_row=_row(row, idx))
        for node, cls in interp.input_class.items():
            if _reads(expr, cls):
                expr, row = _without_padded_keys(expr, idx, additive, cls)
                proof.update(key_padding=node, key_padding_row=_row(row, idx))
        if _reads(expr):
            raise NotProvable("the mask reads a graph input as neither packed positions nor a key padding mask")
        window = _band(expr, i, j, additive)
    except NotProvable as why:
        if not readable:
            raise
        raise NotProvable(f"{_describe_inputs(readable)}: {why}") from None
    return MaskProof(window, **proof)


def _row(row: Any, idx: list) -> int | None:
    return None if row == idx[0] else int(row)


def _maybe_index_input(n: fx.Node) -> bool:
    """An input the prover may read as unknown values: integer or boolean ``[batch, length]``.
    (It only proves a mask that uses it as transformers' packed positions or as a key padding
    mask; anything else refuses.)"""
    v = example_value(n)
    return (isinstance(v, torch.Tensor) and v.dim() == 2 and v.dtype in (torch.int64, torch.int32, torch.bool)
            and not isinstance(v, torch.nn.Parameter))


def _split_on(expr: Any, tests: dict, additive: bool, what: str) -> Any:
    """``expr`` with every test in ``tests`` (relational → its value when the pair is allowed)
    decided: the pair must be removed whatever else holds when the tests say "not allowed",
    and the expression for allowed pairs is returned."""
    apart = _normalize(expr.xreplace({r: sympy.false if ok else sympy.true for r, ok in tests.items()}))
    removed = apart is _FALSE if not additive else (
        isinstance(apart, sympy.Expr) and (apart is -sympy.oo or (apart.is_number and apart.is_finite and apart <= MASKED_THRESHOLD)))
    if not removed:
        raise NotProvable(f"the mask may keep {what}")
    return expr.xreplace({r: sympy.true if ok else sympy.false for r, ok in tests.items()})


def _within_documents(expr: Any, idx: list, additive: bool, source: type) -> tuple[Any, Any]:
    """``keep(i, j)`` over the caller's positions → ``(keep inside one document, row)``.

    Every test of the document ids must be ``doc[r, i] == doc[r, j]`` (or ``!=``) for one row
    ``r`` (the batch index, or one fixed row). With it false the mask must remove the pair
    whatever the positions are; with it true, positions are read only at ``[r, i]`` and
    ``[r, j]``, and inside a document ``pos[r, t] = β + t`` for one unknown ``β``, so the
    rest of the proof sees index arithmetic only.
    """
    i, j = idx[-2], idx[-1]
    tests = [r for r in expr.atoms(Relational) if r.has(_Document)] if isinstance(expr, sympy.Basic) else []
    if not tests:
        raise NotProvable("the mask numbers documents but does not keep them apart")
    rows, same = set(), {}
    for r in tests:
        diff = sympy.expand(r.lhs - r.rhs)
        rows |= {dd.args[0] for dd in diff.atoms(_Document)}
        if not isinstance(r, (sympy.Eq, sympy.Ne)) or len(rows) != 1:
            raise NotProvable("the mask compares document ids other than by equality in one row")
        (r_row,) = rows
        if diff not in (_Document(r_row, i) - _Document(r_row, j), _Document(r_row, j) - _Document(r_row, i)):
            raise NotProvable("the mask compares document ids other than doc[i] == doc[j]")
        same[r] = isinstance(r, sympy.Eq)
    (row,) = rows
    if row not in (_ZERO, idx[0]):
        raise NotProvable("the document ids are read in a row other than the batch row")
    inside = _split_on(expr, same, additive, "pairs from two different documents")
    base = sympy.Symbol("_base", integer=True)
    allowed = {source(row, i): base + i, source(row, j): base + j}
    if not _reads(inside, source) <= set(allowed):
        raise NotProvable("the mask reads positions other than the query's and the key's in the document row")
    return _normalize(inside.xreplace(allowed)), row


def _without_padded_keys(expr: Any, idx: list, additive: bool, cls: type) -> tuple[Any, Any]:
    """``keep(i, j)`` reading a padding input ``pad`` → ``(keep for real keys, row)``.

    The input must be read only at the key, ``pad[r, j]``, for one row ``r``, and only tested
    against 0 (``pad[r, j] != 0``: a real key, the boolean cast transformers applies). With
    the key padded the mask must remove the pair whatever else holds; the rest is proven
    with the test true. Queries are not restricted: a padded query sees the real keys before
    it, as in the model.
    """
    j = idx[-1]
    reads = _reads(expr, cls)
    rows = {r.args[0] for r in reads}
    if len(rows) != 1 or {r.args[1] for r in reads} != {j}:
        raise NotProvable("the mask reads its padding input elsewhere than at the key (a query-side or shifted mask)")
    (row,) = rows
    if row not in (_ZERO, idx[0]):
        raise NotProvable("the padding input is read in a row other than the batch row")
    real = {}
    for r in expr.atoms(Relational):
        if not _reads(r, cls):
            continue
        if not isinstance(r, (sympy.Eq, sympy.Ne)) or sympy.expand(r.lhs - r.rhs) not in (cls(row, j), -cls(row, j)):
            raise NotProvable("the mask uses its padding input other than as 'nonzero: a real key'")
        real[r] = isinstance(r, sympy.Ne)
    if _reads(expr.xreplace({r: sympy.true for r in real}), cls):
        raise NotProvable("the mask uses its padding input's values, not only whether they are 0")
    return _split_on(expr, real, additive, "padded keys"), row


def _band(expr: Any, i: sympy.Symbol, j: sympy.Symbol, additive: bool) -> int | None:
    """The window of ``keep(i, j)`` (None: causal) if it depends on ``j − i`` only."""
    d = sympy.Symbol("d", integer=True)
    expr = _normalize(expr.subs(j, i + d) if isinstance(expr, sympy.Basic) else expr)
    extra = (expr.free_symbols if isinstance(expr, sympy.Basic) else set()) - {d}
    if extra:
        raise NotProvable("the mask depends on more than the query-key distance (a length-dependent window, a batch- or head-dependent mask)")
    # The kept distances d = j - i, interval by interval (d = 0 is an interval of its own).
    runs: list[tuple[float, float, bool]] = []
    for lo, hi, value in _intervals(expr, d, extra=(0,)):
        if isinstance(value, sympy.Basic) and value.has(d):
            raise NotProvable("the mask's values vary with the query-key distance")
        if additive:
            if not (isinstance(value, sympy.Expr) and value.is_number):
                raise NotProvable("the mask value is not a number")
            kept = bool(value.is_zero)
            removed = value is -sympy.oo or (value.is_finite and value <= MASKED_THRESHOLD)
            if not (kept or removed):
                shown = float(value) if value.is_finite or value in (sympy.oo, -sympy.oo) else value
                raise NotProvable(f"the mask adds {shown} to some scores (only 0 and -inf-like values are exact masking)")
        else:
            if value not in (_TRUE, _FALSE):
                raise NotProvable("the boolean mask does not reduce to True/False")
            kept = value is _TRUE
        runs.append((lo, hi, kept))
    return _band_of(runs)


def _band_of(runs: list[tuple[float, float, bool]]) -> int | None:
    """The window of a kept set given as ordered intervals of ``d = j − i``: it must be one
    run of kept distances ending exactly at 0 (None when it reaches −∞: causal)."""
    for lo, hi, kept in runs:
        if kept and hi > 0:
            raise NotProvable(f"the mask is not causal (it keeps key - query = {max(lo, 1)})")
        if not kept and lo <= 0 <= hi:
            raise NotProvable("the mask is not causal (differs at key - query = 0)")
    kept_runs = [(lo, hi) for lo, hi, kept in runs if kept]
    first = kept_runs[0][0]
    for (_, hi), (lo, _) in zip(kept_runs, kept_runs[1:]):
        if lo != hi + 1:
            raise NotProvable(f"the mask is not causal (differs at key - query = {hi + 1})")
    return None if first == -math.inf else int(1 - first)

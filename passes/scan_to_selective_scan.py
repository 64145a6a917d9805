"""``scan`` higher-order op with a linear selective-scan body → canonical selective scan.

Dynamo captures ``torch._higher_order_ops.scan.scan(body, init, xs)`` as one node,
``torch.ops.higher_order.scan(body_gm, [init...], [xs...], [additional...])`` (``dim`` and
``reverse`` already turned into ``movedim``/``flip`` in the outer graph, so the node scans
forward along dim 0). Its autograd keeps every per-step intermediate: O(T·B·D·N). When the
body is a selective-scan step we replace the node by the canonical op::

    before:  def body(h, (Δ_t, B_t, u_t, C_t)):            # h: [B, D, N], A: [D, N] closure
                 h = exp(Δ_t[..., None] * A) * h + (Δ_t * u_t)[..., None] * B_t[:, None, :]
                 return h, (h * C_t[:, None, :]).sum(-1) (+ D * u_t)
             final, ys = scan(body, h0, (Δ, B, u, C))       # xs: [T, B, D] / [T, B, N]
    after:   res = longctx.selective_scan_fwd(u.permute(1, 2, 0), Δ.permute(1, 2, 0), A,
                       B.permute(1, 2, 0), C.permute(1, 2, 0), D, None, None, False, h0,
                       0, "exact", 0)                        # chunk_size 0: planned later
             final = res[1] ; ys = res[0].permute(2, 0, 1)

The number of nodes added is fixed: the graph never grows with T.

**Proof obligations** (each failure is a refusal with its reason; the node is left as is):

1. *Linearity.* Walking the body from the carry placeholder, every carry-dependent value must
   be an affine form ``a ⊙ h + b`` with ``a, b`` carry-independent: allowed are products with
   carry-independent values, sums/differences with carry-independent values or with other
   affine forms, negation, ``clone``/``contiguous`` and casts that do not narrow. Anything
   else (``tanh(h)``, ``h * h``, a gate computed from ``h``, ``where``...) is refused:
   "body is not linear in the carry: <op>".
2. *Selective-scan form.* ``a`` is ``exp(Δ_t ⊙ A)`` and ``b`` is ``Δ_t ⊙ B_t ⊙ u_t`` with
   the same Δ, where Δ_t/u_t are scanned ``[B, D]`` slices, B_t a scanned ``[B, N]`` slice
   and A a ``[D, N]`` tensor constant over steps (an additional input). Broadcast axes are
   tracked through ``x[..., None]``/``unsqueeze`` views, so each factor's axes are known as
   batch/channel/state; transposed operands are permuted back in the outer graph.
3. *Readout.* The per-step output, if any, is ``Σ_n C_t ⊙ h_t`` of the *updated* state
   (``(h * C).sum(-1)`` or ``(h @ C[..., None]).squeeze(-1)``), optionally ``+ D ⊙ u_t`` with
   D ``[D]`` constant and u the same input as in b. Returning the per-step states themselves
   is refused: that output *is* the O(T·D·N) tensor.
4. One ``[B, D, N]`` carry, at most one per-step output, real floating dtypes. The op
   computes in the promotion of its tensors and at least float32 (activations of different
   dtypes are widened to their promotion, exactly). Every body value must be computed in at
   most that dtype (a readout summed in float64 in a float32 body is refused: the op would be
   less precise); where the body computes in a narrower one — a readout rounded down
   (``.sum(-1, dtype=float32)``, ``.float()`` in a float64 body), 16-bit products, a readout
   ``matmul`` autocast runs in bfloat16 — the op is more precise than the original, its
   outputs keep the original's dtypes, and ``details["precision"]`` says what the original
   rounded. Rounding the *state* (``h.float()`` in a float64 body) changes the recurrence and
   stays refused.

Linear bodies that are not expressible (a precomputed or constant decay, a time-varying A,
an extra factor in b, ...) are refused with the precise reason.

**associative_scan.** On CPU, ``associative_scan`` (``combine_mode="generic"``, what
``transformers`` uses) is traced into an unrolled log-depth tree of combine calls: there is
no single node, and pattern-matching a tree whose size grows with T is exactly what we must
not do. Those scans are recognised one level up, at capture time: the library function that
contains them is substituted by :mod:`longctx_compiler.capture`. The ``"pointwise"`` mode
(CUDA only) stays one ``torch.ops.higher_order.associative_scan`` node; its operands are the
precomputed per-step decays and inputs (``[.., T, .., N]`` tensors already materialised in
the outer graph), so it is analysed (the combine must be the affine composition) and refused
with the reason: raising it would need the producers of those tensors, not the scan.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx

# Importing the op module registers torch.ops.longctx.selective_scan_fwd/_bwd.
from longctx_compiler.kernels.selective_scan import op as _op  # noqa: F401
from longctx_compiler.kernels.selective_scan.schema import FINAL_STATE, Y, ScanArgs
from longctx_compiler.passes.adjoint_sharded_scan import PRECISION_META, RAISED_KEY, SCAN_OP
from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext
from longctx_compiler.passes.analysis.fx_utils import example_value, getitem, insert_call, is_call, propagate_example_value

__all__ = ["ScanToSelectiveScanPass", "analyse_scan_body", "ScanPlan"]

_SCAN_HOP = getattr(torch.ops.higher_order, "scan", None)
_ASSOC_HOP = getattr(torch.ops.higher_order, "associative_scan", None)

_MUL = (operator.mul, torch.mul, "mul")
_ADD = (operator.add, torch.add, "add")
_SUB = (operator.sub, torch.sub, "sub")
_NEG = (operator.neg, torch.neg, "neg")
_IDENTITY = ("clone", torch.clone, "contiguous")
_CASTS = ("to", "float", "double", "half", "bfloat16", "type_as")
_EXP = (torch.exp, "exp")
_SUM = (torch.sum, "sum")
_MATMUL = (operator.matmul, torch.matmul, "matmul")
_SQUEEZE = ("squeeze", torch.squeeze)
_UNSQUEEZE = ("unsqueeze", torch.unsqueeze)

_FRAME = ("b", "d", "n")


def _fmt(node: Any) -> str:
    if isinstance(node, fx.Node):
        if node.op == "call_method":
            return f".{node.target}()"
        t = node.target
        return getattr(t, "__name__", None) or str(t)
    return repr(node)


# -- the body's algebra ---------------------------------------------------------------------
@dataclass
class _Affine:
    """A carry-dependent value ``(Σ products in a) ⊙ h + Σ products in b``.

    Each product is a list of carry-independent factors (nodes or Python numbers).
    """

    a: list[list[Any]]
    b: list[list[Any]] = field(default_factory=list)


@dataclass
class _Readout:
    """``Σ_n (affine ⊙ C)`` over the state axis (+ carry-independent terms)."""

    affine: _Affine
    c: Any  # the carry-independent factor multiplied with the state (node)
    c_amap: tuple  # frame axis -> c's axis, for (b, d, n)
    extra: list[Any] = field(default_factory=list)  # added carry-independent terms
    squeezed: bool = True  # False while the matmul form still has its trailing 1


@dataclass
class ScanPlan:
    """What the analysis proved: the roles of the body's inputs."""

    delta: tuple[int, tuple[str, ...]]  # (xs index, axis labels of the slice)
    u: tuple[int, tuple[str, ...]]
    B: tuple[int, tuple[str, ...]]
    A: tuple[int, tuple[str, ...]]  # (additional-input index, labels)
    C: tuple[int, tuple[str, ...]] | None = None
    D: tuple[int, tuple[str, ...]] | None = None
    has_y: bool = False


@dataclass
class _Leaf:
    node: fx.Node
    labels: tuple[str, ...] | None  # frame label of each of the node's axes (None: not a leaf view)


def _scale(p: list[list[Any]], f: Any) -> list[list[Any]]:
    return [q + [f] for q in p]


def _dtype_of(node: Any) -> torch.dtype | None:
    v = example_value(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _linear_forms(body: fx.GraphModule, carry: fx.Node) -> dict[fx.Node, Any]:
    """Affine/readout forms of every carry-dependent node, or CantApply."""
    forms: dict[fx.Node, Any] = {carry: _Affine(a=[[]])}
    for node in body.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or node in forms:
            continue
        deps = [a for a in node.all_input_nodes if a in forms]
        if not deps:
            continue
        args = list(node.args)
        form = lambda x: forms.get(x) if isinstance(x, fx.Node) else None  # noqa: E731
        if is_call(node, *_MUL) and len(args) == 2:
            fa, fb = form(args[0]), form(args[1])
            if fa is not None and fb is not None:
                raise CantApply(f"body is not linear in the carry: {_fmt(node)} of two state-dependent values (quadratic in the state)")
            lin, other = (fa, args[1]) if fa is not None else (fb, args[0])
            if isinstance(lin, _Affine):
                forms[node] = _Affine(_scale(lin.a, other), _scale(lin.b, other))
                continue
            raise CantApply(f"the per-step output is multiplied after the readout ({_fmt(node)}): only + D·u is supported there")
        if (is_call(node, *_ADD) or is_call(node, *_SUB)) and len(args) == 2:
            if node.kwargs.get("alpha", 1) != 1:
                raise CantApply(f"body is not linear in the carry: {_fmt(node)} with alpha")
            sign = -1 if is_call(node, *_SUB) else 1
            fa, fb = form(args[0]), form(args[1])
            if isinstance(fa, _Readout) or isinstance(fb, _Readout):
                if fa is not None and fb is not None:
                    raise CantApply("the per-step output adds two state-dependent terms")
                r, other = (fa, args[1]) if fa is not None else (fb, args[0])
                if sign < 0:
                    raise CantApply("the per-step output subtracts from the readout: only + D·u is supported")
                forms[node] = _Readout(r.affine, r.c, r.c_amap, r.extra + [other], r.squeezed)
                continue
            if fa is not None and fb is not None:
                forms[node] = _Affine(fa.a + (_scale(fb.a, -1) if sign < 0 else fb.a), fa.b + (_scale(fb.b, -1) if sign < 0 else fb.b))
                continue
            if fa is not None:
                forms[node] = _Affine(fa.a, fa.b + [[args[1]] + ([-1] if sign < 0 else [])])
                continue
            # constant - h
            forms[node] = _Affine(_scale(fb.a, sign), _scale(fb.b, sign) + [[args[0]]])
            continue
        if is_call(node, *_NEG):
            f = forms[args[0]]
            if not isinstance(f, _Affine):
                raise CantApply("the per-step output is negated after the readout")
            forms[node] = _Affine(_scale(f.a, -1), _scale(f.b, -1))
            continue
        if is_call(node, *_IDENTITY) or is_call(node, *_CASTS):
            if not (isinstance(args[0], fx.Node) and args[0] in forms) or len(deps) != 1:
                raise CantApply(f"body is not linear in the carry: {_fmt(node)} with the state as its second operand")
            src, dst = _dtype_of(args[0]), _dtype_of(node)
            # Rounding the state changes the recurrence; rounding the readout (the output
            # only) is a lossy cast the op does not reproduce: more precise, and reported.
            if isinstance(forms[args[0]], _Affine) and src is not None and dst is not None and src != dst and torch.promote_types(src, dst) != dst:
                raise CantApply(f"the state is rounded from {src} to {dst} every step ({_fmt(node)})")
            forms[node] = forms[args[0]]
            continue
        if is_call(node, *_SUM):
            f = forms[args[0]]
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = node.kwargs.get("keepdim", False) or (len(node.args) > 2 and node.args[2])
            if not isinstance(f, _Affine) or not _is_last_axis(dims, args[0]) or keep:
                raise CantApply(f"body is not linear in the carry: {_fmt(node)} (only Σ over the state axis of C ⊙ h reads the state out)")
            forms[node] = _readout_of_sum(f, args[0], forms)
            continue
        if is_call(node, *_MATMUL) and len(args) == 2:
            f, c = forms.get(args[0]), args[1]
            if not isinstance(f, _Affine) or isinstance(c, fx.Node) and c in forms:
                raise CantApply(f"body is not linear in the carry: {_fmt(node)} with the state on the right")
            forms[node] = _Readout(f, c, (0, None, 1), [], squeezed=False)
            continue
        if is_call(node, *_SQUEEZE) or (is_call(node, operator.getitem) and isinstance(forms.get(args[0]), _Readout)):
            r = forms.get(args[0])
            if isinstance(r, _Readout) and not r.squeezed and _squeezes_last(node):
                forms[node] = _Readout(r.affine, r.c, r.c_amap, r.extra, True)
                continue
            raise CantApply(f"body is not linear in the carry: {_fmt(node)} on a state-dependent value")
        raise CantApply(f"body is not linear in the carry: {_fmt(node)}")
    return forms


def _is_last_axis(dims: Any, node: fx.Node) -> bool:
    v = example_value(node)
    rank = v.dim() if isinstance(v, torch.Tensor) else 3
    if isinstance(dims, (list, tuple)):
        if len(dims) != 1:
            return False
        dims = dims[0]
    return isinstance(dims, int) and dims in (-1, rank - 1)


def _squeezes_last(node: fx.Node) -> bool:
    if is_call(node, *_SQUEEZE):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim in (-1, 2)
    idx = node.args[1]
    return isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and idx[1] == 0


def _readout_of_sum(f: _Affine, prod: fx.Node, forms: dict) -> _Readout:
    # Σ_n over (affine ⊙ c): the affine's last product factor that is not part of the
    # state's own update is C. The update `h_new` was multiplied by c to get `prod`.
    if not is_call(prod, *_MUL):
        raise CantApply("the readout Σ_n is not over C ⊙ h")
    x, y = prod.args
    lin, c = (forms.get(x), y) if isinstance(x, fx.Node) and x in forms else (forms.get(y), x)
    if not isinstance(lin, _Affine) or not isinstance(c, fx.Node):
        raise CantApply("the readout Σ_n is not over C ⊙ h")
    return _Readout(lin, c, (0, 1, 2), [], True)


# -- factors of carry-independent products ---------------------------------------------------
def _view_map(node: fx.Node) -> tuple[fx.Node, list[int | None]] | None:
    """For a broadcast view (``x[..., None]``, ``x[:, None, :]``, ``unsqueeze``): (x, result
    axis -> x axis or None); None if ``node`` is not such a view."""
    if is_call(node, *_UNSQUEEZE):
        x = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        xv = example_value(x)
        if not isinstance(xv, torch.Tensor) or not isinstance(dim, int):
            return None
        rank = xv.dim() + 1
        dim = dim + rank if dim < 0 else dim
        return x, [None if i == dim else (i if i < dim else i - 1) for i in range(rank)]
    if is_call(node, operator.getitem):
        x, idx = node.args
        xv = example_value(x)
        if not isinstance(xv, torch.Tensor):
            return None
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not all(i is None or i is Ellipsis or i == slice(None, None, None) for i in idx):
            return None
        n_slices = sum(1 for i in idx if isinstance(i, slice))
        if sum(1 for i in idx if i is Ellipsis) > 1:
            return None
        out: list[int | None] = []
        axis = 0
        for i in idx:
            if i is None:
                out.append(None)
            elif i is Ellipsis:
                for _ in range(xv.dim() - n_slices):
                    out.append(axis)
                    axis += 1
            else:
                out.append(axis)
                axis += 1
        out.extend(range(axis, xv.dim()))
        return x, out
    return None


def _factors(node: Any, amap: tuple, out: list) -> None:
    """Flatten a carry-independent product into factors, tracking frame axes.

    ``amap[i]`` is the axis of ``node`` that frame axis i (b, d, n, or a prefix) maps to, or
    None where ``node`` is broadcast. Appends ``(leaf_or_node, labels)`` with ``labels[k]``
    the frame label of the node's axis k (``None`` when an axis does not map to the frame).
    """
    if not isinstance(node, fx.Node):
        out.append((node, None))
        return
    if is_call(node, *_MUL) and len(node.args) == 2:
        rv = example_value(node)
        rank = rv.dim() if isinstance(rv, torch.Tensor) else 0
        for x in node.args:
            xv = example_value(x)
            r = xv.dim() if isinstance(xv, torch.Tensor) else 0
            shift = rank - r
            sub = tuple(None if a is None or a < shift else a - shift for a in amap)
            # A size-1 axis of an operand broadcast against a larger one is not that axis.
            if isinstance(xv, torch.Tensor):
                sub = tuple(None if a is not None and _static_one(xv.shape[a]) and not _static_one(rv.shape[a + shift]) else a for a in sub)
            _factors(x, sub, out)
        return
    view = _view_map(node)
    if view is not None:
        x, m = view
        _factors(x, tuple(None if a is None else m[a] for a in amap), out)
        return
    src = _dtype_cast_source(node)
    if src is not None:
        # A factor cast to another float dtype is the same factor to the op, which computes
        # in its own dtype; what the cast rounded is reported (or refused when it widens
        # beyond the op's dtype) by _body_precision.
        _factors(src, amap, out)
        return
    v = example_value(node)
    rank = v.dim() if isinstance(v, torch.Tensor) else 0
    labels: list[str | None] = [None] * rank
    for frame_axis, a in enumerate(amap):
        if a is not None:
            if not 0 <= a < rank:
                raise CantApply(f"{_fmt(node)} does not line up with the [batch, channel, state] frame (broadcast axis {a} of a {rank}-D value)")
            labels[a] = _FRAME[frame_axis] if len(amap) == 3 else ("b", "d")[frame_axis]
    out.append((node, tuple(labels)))


def _frame_map(node: Any, frame_rank: int = 3) -> tuple:
    """The axis map of a value broadcast against the ``frame_rank``-D frame (aligned from the
    right, as broadcasting aligns): frame axis i -> the value's axis, or None."""
    v = example_value(node)
    rank = v.dim() if isinstance(v, torch.Tensor) else 0
    shift = frame_rank - rank
    return tuple(None if i < shift else i - shift for i in range(frame_rank))


def _dtype_cast_source(node: fx.Node) -> fx.Node | None:
    """``x`` when ``node`` only changes ``x``'s float dtype (``.float()``, ``.to(dtype)``, ...)."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if not is_call(node, *_CASTS):
        return None
    src, dst = example_value(node.args[0]), example_value(node)
    if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)) or src.shape != dst.shape or src.device != dst.device:
        return None
    if not (src.dtype.is_floating_point and dst.dtype.is_floating_point):
        return None
    if is_call(node, "to") and (len(node.args) != 2 or not isinstance(node.args[1], torch.dtype)) and set(node.kwargs) - {"dtype"}:
        return None
    return node.args[0]


def _static_one(s: Any) -> bool:
    return isinstance(s, int) and s == 1


class _Roles:
    """Body placeholders by role: carry, scanned slices, additional inputs."""

    def __init__(self, body: fx.GraphModule, n_init: int, n_xs: int) -> None:
        ph = [n for n in body.graph.nodes if n.op == "placeholder"]
        self.carry = ph[:n_init]
        self.xs = ph[n_init : n_init + n_xs]
        self.extra = ph[n_init + n_xs :]

    def describe(self, node: Any) -> str:
        if not isinstance(node, fx.Node):
            return f"the constant {node!r}"
        if node in self.xs:
            return f"scanned input #{self.xs.index(node)}"
        if node in self.extra:
            return f"closure/additional input #{self.extra.index(node)}"
        return f"a value computed inside the body ({_fmt(node)})"

    def leaf(self, entry: tuple, want: set[str], role: str, where: str, *, scanned: bool) -> tuple[int, tuple[str, ...]]:
        node, labels = entry
        pool = self.xs if scanned else self.extra
        if not isinstance(node, fx.Node) or node not in pool:
            other = "a scanned [T, ...] input" if scanned else "a tensor constant over steps"
            raise CantApply(f"{where}: {role} is {self.describe(node)}, not {other}")
        if labels is None or any(lbl is None for lbl in labels) or set(labels) != want or len(labels) != len(want):
            raise CantApply(f"{where}: {role} ({self.describe(node)}) broadcasts over axes {labels}, expected {sorted(want)} of the [batch(b), channel(d), state(n)] state")
        return pool.index(node), labels


def analyse_scan_body(body: fx.GraphModule, n_init: int, n_xs: int) -> ScanPlan:
    """Prove a scan body is a selective-scan step; return the roles of its inputs (or CantApply)."""
    if n_init != 1:
        raise CantApply(f"the scan carries {n_init} tensors; a selective scan carries one [B, D, N] state")
    roles = _Roles(body, n_init, n_xs)
    carry = roles.carry[0]
    cv = example_value(carry)
    if not isinstance(cv, torch.Tensor) or cv.dim() != 3:
        raise CantApply(f"the carry is not a [B, D, N] state (shape {tuple(cv.shape) if isinstance(cv, torch.Tensor) else '?'})")
    out = next(n for n in body.graph.nodes if n.op == "output")
    results = list(out.args[0])
    new_carry, ys = results[0], results[1:]
    forms = _linear_forms(body, carry)
    if len(ys) > 1:
        raise CantApply(f"the body returns {len(ys)} per-step outputs; a selective scan has one (y)")
    fc = forms.get(new_carry) if isinstance(new_carry, fx.Node) else None
    if not isinstance(fc, _Affine):
        raise CantApply("the new carry does not depend on the carry (not a recurrence)")

    # h' = a ⊙ h + b with a = exp(Δ ⊙ A)
    if len(fc.a) != 1 or len(fc.a[0]) != 1:
        raise CantApply(f"the decay a in h' = a·h + b is {'1 (h + b: no decay)' if fc.a == [[]] else 'a sum or product of several terms'}, not exp(Δ·A)")
    dec = fc.a[0][0]
    if not is_call(dec, *_EXP):
        base = dec
        while isinstance(base, fx.Node) and _view_map(base) is not None:
            base = _view_map(base)[0]
        raise CantApply(f"the decay a in h' = a·h + b is {roles.describe(base)}, not exp(Δ·A) (a precomputed or constant decay has no [D, N] A)")
    arg_factors: list = []
    _factors(dec.args[0], _frame_map(dec.args[0]), arg_factors)
    if len(arg_factors) != 2:
        raise CantApply(f"the decay's exponent is a product of {len(arg_factors)} factors, not Δ·A")
    scanned = [f for f in arg_factors if isinstance(f[0], fx.Node) and f[0] in roles.xs]
    if len(scanned) != 1:
        if not scanned and all(isinstance(f[0], fx.Node) and f[0] in roles.extra for f in arg_factors):
            raise CantApply("the decay exp(Δ·A) does not vary with time: Δ is not a scanned input")
        bad = next((f for f in arg_factors if not (isinstance(f[0], fx.Node) and (f[0] in roles.xs or f[0] in roles.extra))), None)
        if bad is not None:
            raise CantApply(f"the decay's exponent has {roles.describe(bad[0])}; Δ must be a scanned input and A a constant [D, N] tensor")
        raise CantApply("the decay's exponent multiplies two scanned inputs: A varies with time (the canonical op needs a per-channel A [D, N])")
    d_entry = scanned[0]
    a_entry = next(f for f in arg_factors if f is not d_entry)
    delta = roles.leaf(d_entry, {"b", "d"}, "Δ", "decay exp(Δ·A)", scanned=True)
    A = roles.leaf(a_entry, {"d", "n"}, "A", "decay exp(Δ·A)", scanned=False)

    # b = Δ ⊙ B ⊙ u
    if len(fc.b) != 1:
        raise CantApply(f"the input term b in h' = a·h + b is {'missing' if not fc.b else 'a sum of several terms'}, not Δ·B·u")
    b_factors: list = []
    for f in fc.b[0]:
        _factors(f, _frame_map(f), b_factors)
    if len(b_factors) != 3:
        raise CantApply(f"the input term b is a product of {len(b_factors)} factors ({', '.join(roles.describe(f[0]) for f in b_factors)}), not Δ·B·u")
    d_in_b = [f for f in b_factors if f[0] is d_entry[0] and f[1] == d_entry[1]]
    if not d_in_b:
        raise CantApply("the input term b does not contain the decay's Δ (b must be Δ·B·u with the same Δ)")
    rest = list(b_factors)
    rest.remove(d_in_b[0])
    b_n = [f for f in rest if f[1] is not None and "n" in f[1]]
    b_d = [f for f in rest if f[1] is not None and "n" not in f[1]]
    if len(b_n) != 1 or len(b_d) != 1:
        raise CantApply(f"the input term b is Δ·({', '.join(roles.describe(f[0]) for f in rest)}), not Δ·B·u with B [batch, state] and u [batch, channel]")
    Bm = roles.leaf(b_n[0], {"b", "n"}, "B", "input term Δ·B·u", scanned=True)
    u = roles.leaf(b_d[0], {"b", "d"}, "u", "input term Δ·B·u", scanned=True)
    plan = ScanPlan(delta=delta, u=u, B=Bm, A=A)

    if ys:
        y = ys[0]
        fy = forms.get(y) if isinstance(y, fx.Node) else None
        if isinstance(fy, _Affine):
            raise CantApply("the body returns the per-step state itself: that stacked [T, B, D, N] output is the memory the rewrite removes")
        if not isinstance(fy, _Readout) or not fy.squeezed:
            raise CantApply("the per-step output does not read the state (it is computed from the inputs only)")
        if fy.affine is not fc:
            raise CantApply("the per-step output reads the state before the update (y_t = C·h_{t-1}); the selective scan reads h_t")
        c_factors: list = []
        _factors(fy.c, fy.c_amap, c_factors)
        if len(c_factors) != 1:
            raise CantApply(f"the readout multiplies the state by {len(c_factors)} factors, not by C")
        plan.C = roles.leaf(c_factors[0], {"b", "n"}, "C", "readout Σ_n C·h", scanned=True)
        if len(fy.extra) > 1:
            raise CantApply("the per-step output adds several terms to the readout; only D·u is supported")
        if fy.extra:
            d_factors: list = []
            _factors(fy.extra[0], _frame_map(fy.extra[0], 2), d_factors)
            if len(d_factors) != 2:
                raise CantApply("the term added to the readout is not D·u")
            u_like = [f for f in d_factors if f[0] is b_d[0][0]]
            if not u_like:
                raise CantApply("the term added to the readout is not D·u with the same u as in Δ·B·u")
            other = next(f for f in d_factors if f is not u_like[0])
            plan.D = roles.leaf(other, {"d"}, "D", "skip term D·u", scanned=False)
        plan.has_y = True
    return plan


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Ops that move or relabel numbers without rounding them (a view of a bfloat16 input is no
# rounding; the arithmetic on it is).
_NO_ROUNDING = {"getitem", "unsqueeze", "squeeze", "view", "reshape", "permute", "transpose", "expand", "contiguous", "clone", "detach", "select", "t", "movedim"}


def _promote(*dtypes: torch.dtype) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _bits(dtype: torch.dtype) -> int:
    return round(-math.log2(torch.finfo(dtype).eps))


def _op_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _body_precision(body: fx.GraphModule, cdt: torch.dtype) -> str | None:
    """The report's note where the body computes in a narrower dtype than the op (``cdt``):
    a readout summed with ``dtype=float32`` or cast down in a float64 body, 16-bit activations'
    products, a readout ``matmul`` autocast runs in bfloat16. CantApply where it computes in a
    *wider* one (``.double()``, ``sum(dtype=float64)`` in a float32 body): the op would be less
    precise than the original."""
    rounded: dict[str, torch.dtype] = {}
    for n in body.graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        v = example_value(n)
        if not isinstance(v, torch.Tensor) or v.dtype not in _FLOATS:
            continue
        name = _op_name(n)
        if _bits(v.dtype) > _bits(cdt):
            raise CantApply(f"the body computes `{name}` in {str(v.dtype).replace('torch.', '')}, wider than the scan's "
                            f"{str(cdt).replace('torch.', '')}: the selective scan would be less precise than the original")
        if _bits(v.dtype) < _bits(cdt) and name not in _NO_ROUNDING:
            rounded.setdefault(name, v.dtype)
    if not rounded:
        return None
    what = ", ".join(f"`{k}` in {str(d).replace('torch.', '')}" for k, d in rounded.items())
    return f"computes in {str(cdt).replace('torch.', '')} where the original body computed {what}"


def _cast(graph: fx.Graph, x: fx.Node, dtype: torch.dtype | None) -> fx.Node:
    if dtype is None or _dtype_of(x) == dtype:
        return x
    node = graph.call_method("to", (x, dtype))
    propagate_example_value(node)
    return node


def _canonical_perm(labels: tuple[str, ...], order: tuple[str, ...], time_axis: bool) -> list[int]:
    """Permutation taking a tensor with axes ``[T?] + labels`` to ``order + [T?]``."""
    off = 1 if time_axis else 0
    perm = [labels.index(x) + off for x in order]
    return perm + ([0] if time_axis else [])


class ScanToSelectiveScanPass(Pass):
    """``higher_order.scan`` with a linear selective-scan body → ``longctx::selective_scan_fwd``."""

    name = "scan_to_selective_scan"
    kind = "scan -> selective_scan"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.config.ssm.enabled

    def kind_of(self, match: Match) -> str:
        return f"{match.data['hop']} -> selective_scan"

    def describe(self, match: Match, ctx: PassContext) -> dict[str, Any]:
        p: ScanPlan = match.data["plan"]
        precision = match.data.get("precision")
        return {
            "readout": p.has_y, "skip_D": p.D is not None, "chunk_size": "planned by adjoint_sharded_scan",
            "compute_dtype": str(match.data["cdt"]).replace("torch.", ""),
            **({"precision": precision} if precision else {}),
        }

    def match(self, gm: fx.GraphModule, ctx: PassContext) -> Iterable[Match]:
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if _SCAN_HOP is not None and node.target is _SCAN_HOP:
                yield Match(anchor=node, nodes=[node], data={"hop": "scan"})
            elif _ASSOC_HOP is not None and node.target is _ASSOC_HOP:
                yield Match(anchor=node, nodes=[node], data={"hop": "associative_scan"})

    def check(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> None:
        node = match.anchor
        body = _body(gm, node)
        if match.data["hop"] == "associative_scan":
            raise CantApply(_associative_reason(body))
        init, xs, extra = node.args[1], node.args[2], node.args[3] if len(node.args) > 3 else []
        match.data["plan"] = plan = analyse_scan_body(body, len(init), len(xs))
        outer = {"init": list(init), "xs": list(xs), "extra": list(extra)}
        tensors = [init[0], xs[plan.delta[0]], xs[plan.u[0]], xs[plan.B[0]], extra[plan.A[0]]]
        if plan.C is not None:
            tensors.append(xs[plan.C[0]])
        if plan.D is not None:
            tensors.append(extra[plan.D[0]])
        dtypes = [_dtype_of(t) for t in tensors]
        if not all(d in _FLOATS for d in dtypes):
            raise CantApply(f"the scan's tensors have dtypes {sorted({str(d) for d in dtypes})}; the selective scan is defined for real floating dtypes")
        # The op computes in the promotion of its inputs and at least float32 (mamba's rule);
        # activations of different dtypes are widened to their promotion first (exact).
        acts = [xs[i] for i in (plan.delta[0], plan.u[0], plan.B[0])] + ([xs[plan.C[0]]] if plan.C is not None else [])
        match.data["act_dtype"] = _promote(*(_dtype_of(t) for t in acts))
        match.data["cdt"] = cdt = _promote(torch.float32, *dtypes)
        match.data["precision"] = _body_precision(body, cdt)
        users = list(node.users)
        if not all(is_call(u, operator.getitem) and isinstance(u.args[1], int) for u in users):
            raise CantApply("the scan's result is used other than by indexing its outputs")
        match.data["outer"] = outer

    def apply(self, gm: fx.GraphModule, match: Match, ctx: PassContext) -> list[fx.Node]:
        node = match.anchor
        plan: ScanPlan = match.data["plan"]
        outer = match.data["outer"]
        xs, extra = outer["xs"], outer["extra"]
        graph = gm.graph

        act = match.data["act_dtype"]

        def scanned(entry, order):
            idx, labels = entry
            x = insert_call(graph, torch.permute, (xs[idx], _canonical_perm(labels, order, True)))
            return _cast(graph, x, act)  # widening only: the activations' promotion

        with graph.inserting_before(node):
            u = scanned(plan.u, ("b", "d"))
            delta = scanned(plan.delta, ("b", "d"))
            Bm = scanned(plan.B, ("b", "n"))
            # Without a readout, C is irrelevant to the final state: any [B, N, T] tensor does.
            Cm = scanned(plan.C, ("b", "n")) if plan.C is not None else Bm
            A = extra[plan.A[0]]
            if plan.A[1] != ("d", "n"):
                A = insert_call(graph, torch.permute, (A, _canonical_perm(plan.A[1], ("d", "n"), False)))
            D = extra[plan.D[0]] if plan.D is not None else None
            res = insert_call(graph, SCAN_OP, tuple(ScanArgs(u, delta, A, Bm, Cm, D, h0=outer["init"][0])))
            res.meta[RAISED_KEY] = match.data["hop"]
            if match.data.get("precision"):
                res.meta[PRECISION_META] = match.data["precision"]
            # The outputs keep the original's dtypes (a body that rounds its readout, or runs
            # it under autocast, returns y in that dtype): same graph downstream, and the op's
            # extra precision is in the value only.
            want = {user.args[1]: _dtype_of(user) for user in node.users}
            final = _cast(graph, getitem(graph, res, FINAL_STATE), want.get(0))
            ys = None
            if plan.has_y:
                y = getitem(graph, res, Y)
                ys = _cast(graph, insert_call(graph, torch.permute, (y, [2, 0, 1])), want.get(1))
        for user in list(node.users):
            target = final if user.args[1] == 0 else ys
            user.replace_all_uses_with(target)
            graph.erase_node(user)
        graph.erase_node(node)
        return []


def _body(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule:
    ref = node.args[0]
    if not (isinstance(ref, fx.Node) and ref.op == "get_attr"):
        raise CantApply("the scan body is not a get_attr of a GraphModule")
    obj: Any = gm
    for part in str(ref.target).split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, fx.GraphModule):
        raise CantApply("the scan body is not a GraphModule")
    return obj


def _associative_reason(body: fx.GraphModule) -> str:
    # The combine of a linear recurrence composes two affine maps:
    # (a_l, b_l) ∘ (a_r, b_r) = (a_l·a_r, a_r·b_l + b_r). Check that it is one (linear in
    # the left operand's b) and say why it still is not raised.
    ph = [n for n in body.graph.nodes if n.op == "placeholder"]
    verdict = "its combine is not the affine composition (a_l·a_r, a_r·b_l + b_r)"
    if len(ph) >= 4:
        try:
            forms = _linear_forms(body, ph[1])
            out = next(n for n in body.graph.nodes if n.op == "output")
            res = list(out.args[0])
            if len(res) == 2 and isinstance(forms.get(res[1]), _Affine) and res[0] not in forms:
                verdict = "its combine is the affine composition of a linear recurrence"
        except CantApply as why:
            verdict = f"its combine is not linear ({why.reason})"
    return (
        f"associative_scan (pointwise) node: {verdict}, but its operands are per-step decays "
        "and inputs already materialised as [.., T, .., N] tensors in the outer graph; raising "
        "needs their producers (exp(Δ·A), Δ·B·u), which this pass does not trace. Left as is"
    )

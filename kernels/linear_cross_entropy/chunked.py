"""Sequence-tiled LM head + cross-entropy in plain torch: the implementation of the op.

Shapes (see ``reference.py``): ``h [N, H]``, ``weight [V, H]``, ``bias [V]`` or None,
``labels [N]`` int64, optional precomputed ``logits [N, V]``; ``lse [N]`` in the
accumulation dtype (float32, float64 for float64 inputs).

Memory: the largest temporaries are one tile's logits (shifted by the row max in place) and
their exponentials (which become the logits' gradient in place), ``[C, V]`` each in the
accumulation dtype for ``C`` tokens (:func:`tile_rows`), plus the ``[V, H]`` weight-gradient
accumulator; never ``[N, V]``. The Python loops run ``⌈N / C⌉`` iterations; everything inside
a tile is vectorised (two matmuls, a log-sum-exp, a gather and a scatter).

Numerics: tile logits are ``F.linear`` in the input dtype, then upcast, exactly as
``transformers`` computes logits before its ``.float()``; a forward given precomputed logits
and a forward computing them itself therefore see the same numbers, and backward recomputes
the same tile logits it used. The loss sum is accumulated in float64 (a scalar), the weight and
bias gradients in the accumulation dtype across tiles (cast to the weight's dtype at the end);
``dh`` is written tile by tile, its matmul run in the weight's dtype like the original
``linear``'s backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import accumulation_dtype, transform_logits

__all__ = ["linear_cross_entropy_forward", "linear_cross_entropy_backward", "tiles", "tile_rows", "AUTO"]

#: ``chunk_size`` value meaning "choose the tile from the shapes" (see :func:`tile_rows`).
AUTO = 0
#: Fewest rows in an automatic tile: below this the Python loop, not memory, dominates.
MIN_AUTO_ROWS = 64
#: Most logits in an automatic tile (16 MiB in float32): the loss's working memory stops
#: growing with the sequence there, so a long sequence's step peak is set by its ``[T, H]``
#: tensors, not by the loss.
MAX_AUTO_TILE = 1 << 22


def tile_rows(n: int, hidden: int, vocab: int, chunk_size: int) -> int:
    """Rows per tile: ``chunk_size``, or for :data:`AUTO` the most rows whose ``[rows, V]``
    logits hold no more numbers than the ``[N, H]`` hidden states themselves
    (``⌈N·H / V⌉``) and no more than :data:`MAX_AUTO_TILE`, at least :data:`MIN_AUTO_ROWS`.
    The loss's working memory then stays below the size of its input, and bounded at every
    length.
    """
    if chunk_size != AUTO:
        return chunk_size
    vocab = max(vocab, 1)
    return max(MIN_AUTO_ROWS, min(-(-n * hidden // vocab), MAX_AUTO_TILE // vocab))


def tiles(n: int, chunk_size: int):
    """``(start, end)`` of each tile of ``chunk_size`` rows covering ``range(n)``."""
    for s in range(0, n, chunk_size):
        yield s, min(s + chunk_size, n)


def _tile_logits(h: Tensor, weight: Tensor, bias: Tensor | None, s: int, e: int, acc: torch.dtype) -> Tensor:
    return F.linear(h[s:e], weight, bias).to(acc)


def _exp_and_rest(shifted: Tensor) -> tuple[Tensor, Tensor]:
    """``(exp(shifted), δ)`` with ``Σ_j exp(shifted_j) = 1 + δ`` per row (``shifted = z − max``):
    ``δ`` is the sum without one maximal entry (its ``exp`` is exactly 1). ``log Σ = log1p(δ)``
    then keeps ``δ`` whole for a confident token, where a float32 ``Σ = 1 + δ`` would round
    ``δ`` away below 2^-24. (An all ``-inf`` row gives ``δ = -1``: ``log1p`` → ``-inf``, as
    ``logsumexp``.) One ``[rows, V]`` tensor is allocated: the exponentials."""
    e = shifted.exp()
    top = shifted.argmax(dim=-1, keepdim=True)
    e.scatter_(1, top, 0.0)
    rest = e.sum(dim=-1)
    e.scatter_(1, top, shifted.gather(1, top).exp())
    # A row whose maximum is -inf has no entry equal to 1 to take out.
    return e, torch.where(shifted.amax(dim=-1).isfinite(), rest, rest - 1)


def _shift_by_row_max(z: Tensor, owned: bool) -> tuple[Tensor, Tensor]:
    """``(z − m, m)`` with ``m`` the row max (0 for an all ``-inf`` row, as ``logsumexp``);
    in place when the tile is ``owned`` (a temporary of this op), so a tile costs one
    ``[rows, V]`` tensor, not two."""
    m = z.amax(dim=-1, keepdim=True)
    m = torch.where(m.isfinite(), m, 0)
    return (z.sub_(m) if owned else z - m), m


def linear_cross_entropy_forward(
    h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, logits: Tensor | None,
    ignore_index: int, reduction: str, chunk_size: int, logit_scale: float = 1.0, softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """``(loss, lse)``: the scalar loss and the per-token log-sum-exp ``[N]`` (of the transformed
    logits), tile by tile.

    ``logits`` (``[N, V]``), when given, are the already-computed ``F.linear(h, weight, bias)``
    and are read tile by tile instead of multiplying again; they carry no gradient.
    ``logit_scale``/``softcap``: the transform applied to each tile's logits before the loss
    (:func:`~.reference.transform_logits`).
    """
    acc = accumulation_dtype(h.dtype)
    n = h.shape[0]
    lse = torch.empty((n,), dtype=acc, device=h.device)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for s, e in tiles(n, tile_rows(n, h.shape[1], weight.shape[0], chunk_size)):
        if logits is not None:
            # The caller's logits: a view unless the upcast copied them; never written to.
            z, owned = logits[s:e].to(acc), logits.dtype != acc
        else:
            z, owned = _tile_logits(h, weight, bias, s, e, acc), True
        if logit_scale != 1.0 or softcap:
            z, owned = transform_logits(z, logit_scale, softcap), True
        y = labels[s:e]
        valid = y != ignore_index
        # The loss as log_softmax computes it: log Σ exp(z − m) − (z_y − m) with m the row max.
        # (lse − z_y would cancel where z_y is the max and the loss ≪ lse.)
        shifted, m = _shift_by_row_max(z, owned)
        log_s = torch.log1p(_exp_and_rest(shifted)[1])
        target = shifted.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
        total += torch.where(valid, log_s - target, 0).sum(dtype=torch.float64)
        lse[s:e] = log_s + m.squeeze(1)
    if reduction == "mean":
        # 0 / 0 = NaN when every label is ignored, as F.cross_entropy gives.
        total = total / (labels != ignore_index).sum()
    return total.to(acc), lse


def linear_cross_entropy_backward(
    dloss: Tensor | None, dlse: Tensor | None, h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
    lse: Tensor, ignore_index: int, reduction: str, chunk_size: int, logit_scale: float = 1.0, softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(dh, dweight, dbias)`` from the loss cotangent (and an optional ``lse`` cotangent).

    Per tile, with ``P = softmax(f)`` (from the row max, as ``F.softmax``) of the recomputed,
    transformed logits
    ``f = cap·tanh(s·z / cap)`` (or ``s·z``)::

        df = c_i · (P − onehot(y_i))   (+ dlse_i · P)
        dz = df · (1 − tanh²(s·z / cap)) · s       (the transform's derivative)

    where ``c_i`` is the loss cotangent (divided by the number of non-ignored tokens for
    ``"mean"``) and ``0`` for ignored tokens, so no NaN appears even when every label is
    ignored (``F.cross_entropy``'s gradient is zero there too).
    """
    acc = accumulation_dtype(h.dtype)
    n, V = h.shape[0], weight.shape[0]
    valid_all = labels != ignore_index
    if dloss is None:
        g = torch.zeros((), dtype=acc, device=h.device)
    else:
        g = dloss.to(acc)
    if reduction == "mean":
        # inf when nothing is valid; masked to 0 below for every (ignored) row.
        g = g / valid_all.sum().to(acc)
    dh = torch.empty_like(h)
    dw = torch.zeros((V, h.shape[1]), dtype=acc, device=h.device)
    db = torch.zeros((V,), dtype=acc, device=h.device) if bias is not None else None
    for s, e in tiles(n, tile_rows(n, h.shape[1], V, chunk_size)):
        z = _tile_logits(h, weight, bias, s, e, acc)
        capped = None
        if logit_scale != 1.0:
            z.mul_(logit_scale)
        if softcap:
            capped = torch.tanh(z.div_(softcap))
            z = torch.mul(capped, softcap, out=z)
        y = labels[s:e]
        valid = valid_all[s:e]
        # P as softmax computes it, exp(z − m) / Σ exp(z − m) from the row max m, rather than
        # exp(z − lse): lse = m + log Σ carries round-off of the size of |m|, which swamps
        # 1 − P_y for a confident token (dz_y = c·(P_y − 1)).
        p, rest = _exp_and_rest(_shift_by_row_max(z, True)[0])
        del z
        p.div_(1 + rest.unsqueeze(1))
        coef = torch.where(valid, g, torch.zeros((), dtype=acc, device=h.device))
        # dz = c·P − c·onehot(y) (+ dlse·P), in P's own storage.
        dz = p.mul_((coef if dlse is None else coef + dlse[s:e].to(acc)).unsqueeze(1))
        dz.scatter_add_(1, torch.where(valid, y, 0).unsqueeze(1), -coef.unsqueeze(1))
        if capped is not None:
            dz.mul_(capped.mul_(capped).neg_().add_(1))
            del capped
        if logit_scale != 1.0:
            dz.mul_(logit_scale)
        dh[s:e] = torch.matmul(dz.to(weight.dtype), weight).to(h.dtype)
        dw.addmm_(dz.t(), h[s:e].to(acc))
        if db is not None:
            db += dz.sum(0)
    return dh, dw.to(weight.dtype), (db.to(bias.dtype) if db is not None else None)
